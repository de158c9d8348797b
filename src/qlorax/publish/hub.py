"""Publish target `hub`: the Hugging Face Hub, one commit that makes a branch hold exactly the snapshot.

huggingface_hub is imported only inside `upload_to_hub`, so no other command pays for it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlorax import __version__, layout
from qlorax.errors import EXIT_BAD_INPUT, EXIT_RESOURCES, QloraxError
from qlorax.publish.errors import PublishError
from qlorax.publish.target import Published, PublishRequest, Snapshot

DEFAULT_ENDPOINT = "https://huggingface.co"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(text: str) -> bool:
    """True for OWNER/NAME as the Hub spells repository ids."""
    return bool(_HUB_ID.match(text))


def check_repo_id(repo_id: str) -> None:
    """OWNER/NAME, or exit 2 before anything is read or sent."""
    if not is_hub_id(repo_id):
        raise QloraxError(f"--repo-id {repo_id!r}: expected OWNER/NAME (letters, digits, '-', '_', '.').")


@dataclass
class HubCommit:
    """What the Hub answered: the commit id and its URL, and what the commit changed."""

    oid: str
    url: str
    uploaded: list[str]
    deleted: list[str]


def upload_to_hub(staging: Path, files: dict[str, str], repo_id: str, token: str, *, private: bool = False,
                  revision: str | None = None, endpoint: str | None = None) -> HubCommit:
    """One commit that makes `revision` hold exactly the snapshot: create the repo (and branch) when
    missing, add every staged file, delete files an earlier publish left that this snapshot lacks
    (the Hub's own .gitattributes stays). PublishError (exit 3; 2 for a refused token) on failure."""
    import httpx2
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token, library_name="qlorax", library_version=__version__)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision))
        stale = sorted(p for p in remote - set(files) if p not in layout.HUB_HOUSEKEEPING_FILES)
        operations: list[Any] = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(Path(staging) / rel))
                                 for rel in sorted(files)]
        operations += [CommitOperationDelete(path_in_repo=rel) for rel in stale]
        message = f"qlorax publish: adapter {files.get(layout.ADAPTER_WEIGHTS, '')[:12]}"
        commit = api.create_commit(repo_id, operations, revision=revision, commit_message=message)
    except OfflineModeIsEnabled:
        raise PublishError("cannot publish: HF_HUB_OFFLINE is set (publishing needs the Hub); unset it.") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        code = EXIT_BAD_INPUT if status in (401, 403) else EXIT_RESOURCES
        raise PublishError(f"the Hub refused the publish to {repo_id} (HTTP {status}): {_first_line(exc)}",
                           code) from None
    except (OSError, httpx2.TransportError) as exc:  # connection refused, DNS, time-outs
        raise PublishError(f"cannot reach the Hub at {endpoint or DEFAULT_ENDPOINT}: {_first_line(exc)}") from None
    except ValueError as exc:  # the client's own checks (e.g. metadata the Hub's validation rejected)
        raise PublishError(f"publishing to {repo_id} failed: {_first_line(exc)}", EXIT_BAD_INPUT) from None
    return HubCommit(oid=str(commit.oid), url=str(commit.commit_url), uploaded=sorted(files), deleted=stale)


def _first_line(exc: BaseException) -> str:
    from qlorax.ops.secrets import scrub_text

    text = str(exc).strip().splitlines()
    return scrub_text(text[0] if text else exc.__class__.__name__)


class HubTarget:
    """`--to hub`: a Hub repository OWNER/NAME, written with a token from --token-file."""

    audit_name = "huggingface_hub"

    def check(self, request: PublishRequest) -> None:
        """--repo-id and --token-file are required; the repo id must be OWNER/NAME."""
        if request.repo_id is None or request.token_file is None:
            raise QloraxError("--to hub needs --repo-id OWNER/NAME and --token-file FILE (a token with write access).")
        check_repo_id(request.repo_id)

    def card_names(self, request: PublishRequest) -> tuple[str, str | None]:
        """The card names the Hub repository; there is no registered model."""
        assert request.repo_id is not None
        return request.repo_id, None

    def publish(self, snapshot: Snapshot, request: PublishRequest) -> Published:
        """One commit to the repository's branch (main unless --revision)."""
        assert request.repo_id is not None and request.token is not None
        commit = upload_to_hub(snapshot.directory, snapshot.files, request.repo_id, request.token,
                               private=request.private, revision=request.revision, endpoint=request.endpoint)
        revision = request.revision or "main"
        return Published(
            rows=[("repository", request.repo_id), ("revision", revision), ("commit", commit.oid), ("url", commit.url)],
            audit={"repo_id": request.repo_id, "revision": revision, "endpoint": request.endpoint or DEFAULT_ENDPOINT,
                   "commit": commit.oid, "commit_url": commit.url, "deleted": commit.deleted},
        )


TARGET = HubTarget()
