"""Data from a git repository, `git+<url>@<commit-or-tag>#<path/in/repo.jsonl>`, or from a
Hugging Face Hub dataset, `hf://datasets/ORG/NAME@<commit>/<path>` (downloaded with
huggingface_hub into `$QLORAX_HOME/hub/`, pinned to a 40-hex commit the same way).

A run must name what it trained on, so a git source is pinned to a commit: a full or
abbreviated commit sha, or a tag (resolved to its commit). A branch (or any other ref that
moves, such as HEAD) is refused unless `data.allow_moving_ref: true`. The commit is
checked out once, read-only, into `$QLORAX_HOME/git/checkouts/<commit>/` (keyed by commit,
so a cached commit needs no network), and every later use first checks that the checkout
is still clean at that commit. All git work is done by the `git` command; nothing here
reads git's files by hand.

The config hash records a git source as `git:<commit>#<path>`: what it is, never where the
repository or the checkout lies. A local data file inside a git work tree gets an
informational record (its repository's commit and whether the file is modified).
Torch-free: the CLI resolves sources before it launches a training process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from qlorax import settings
from qlorax.errors import DataError, QloraxError

GIT_PREFIX = "git+"
GIT_IDENTITY_PREFIX = "git:"
URL_SCHEMES = ("file", "https", "http", "ssh")
_FULL_SHA = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_ABBREVIATED_SHA = re.compile(r"^[0-9a-f]{7,63}$")
_GIT_TIMEOUT_S = 600
EXIT_ENVIRONMENT = 3


@dataclass(frozen=True)
class GitSource:
    """A parsed `git+<url>@<ref>#<path>` data source."""

    url: str
    ref: str
    path: str

    def spec(self, ref: str | None = None) -> str:
        return f"{GIT_PREFIX}{self.url}@{ref or self.ref}#{self.path}"


@dataclass(frozen=True)
class GitCheckout:
    """A commit checked out read-only into the cache, and the data file in it."""

    source: GitSource
    commit: str
    directory: Path

    @property
    def file(self) -> Path:
        return self.directory / self.source.path


def is_git_source(spec: str) -> bool:
    return spec.startswith(GIT_PREFIX)


def parse_git_source(spec: str) -> GitSource:
    """Split `git+<url>@<ref>#<path>`; a malformed source is a DataError saying what is missing."""
    form = "git+<url>@<commit-or-tag>#<path/in/repo.jsonl>, e.g. git+file:///srv/data.git@v1#train.jsonl"
    body = spec[len(GIT_PREFIX):]
    location, hash_sign, path = body.partition("#")
    if not hash_sign or not path.strip():
        raise DataError(f"data.path {spec!r}: no file named after '#'; expected {form}")
    url, at_sign, ref = location.rpartition("@")
    scheme, sep, rest = url.partition("://")
    if not at_sign or not ref or not sep or "/" not in rest:
        raise DataError(f"data.path {spec!r}: no commit or tag named after '@'; expected {form}")
    if scheme not in URL_SCHEMES:
        raise DataError(f"data.path {spec!r}: unsupported URL scheme {scheme!r}; expected one of "
                        f"{', '.join(URL_SCHEMES)}")
    if ref.startswith("-") or any(c.isspace() for c in ref):
        raise DataError(f"data.path {spec!r}: {ref!r} is not a valid commit or tag name")
    inner = PurePosixPath(path)
    if inner.is_absolute() or ".." in inner.parts or path.endswith("/"):
        raise DataError(f"data.path {spec!r}: the file after '#' must be a relative path inside the repository, "
                        f"got {path!r}")
    return GitSource(url=url, ref=ref, path=inner.as_posix())


# --------------------------------------------------------------------------- running git


def _git_environment() -> dict[str, str]:
    """Never prompt for credentials; messages in one language so they read the same everywhere."""
    return {**settings.environ(), "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C", "LANG": "C"}


def run_git(args: list[str], cwd: Path | None = None, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one `git` command; a missing git is exit 3 (environment), a failure a DataError
    carrying git's last line of output (the caller's message says what was attempted)."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False,
                              env=_git_environment(), timeout=_GIT_TIMEOUT_S)
    except FileNotFoundError:
        raise QloraxError("data.path names a git repository, but the `git` command is not installed",
                          exit_code=EXIT_ENVIRONMENT) from None
    except subprocess.TimeoutExpired:
        raise DataError(f"git {' '.join(args[:2])} did not finish within {_GIT_TIMEOUT_S} s") from None
    if check and done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise DataError(lines[-1] if lines else f"git {args[0]} failed with exit code {done.returncode}")
    return done


def _git_ok(args: list[str], cwd: Path) -> str | None:
    """stdout (stripped) when the command succeeds, None when it fails."""
    done = run_git(args, cwd, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def git_cache_dir() -> Path:
    return settings.git_cache_dir()


def _mirror_dir(url: str) -> Path:
    return git_cache_dir() / "mirrors" / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}.git"


def checkout_dir(commit: str) -> Path:
    return git_cache_dir() / "checkouts" / commit


def _update_mirror(source: GitSource) -> Path:
    """A bare mirror of the repository's refs and objects (cloned once, then fetched)."""
    mirror = _mirror_dir(source.url)
    try:
        if (mirror / "HEAD").is_file():
            run_git(["fetch", "--quiet", "--prune", "--tags", "origin"], mirror)
        else:
            mirror.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".mirror.", dir=mirror.parent))
            try:
                run_git(["clone", "--quiet", "--mirror", "--", source.url, str(staging)])
                os.replace(staging, mirror)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except DataError as exc:
        raise DataError(f"data.path: cannot fetch the git repository {source.url}: {exc.message}") from None
    return mirror


# --------------------------------------------------------------------------- resolving a ref


def _refuse_moving(source: GitSource, what: str) -> DataError:
    return DataError(
        f"data.path: {source.ref!r} is {what} of {source.url}; it moves, so a run could not say which data it "
        f"trained on. Name a commit sha or a tag (e.g. {source.spec('<commit>')}), or set "
        "data.allow_moving_ref: true to train on wherever it points now (the commit is recorded)."
    )


def _resolve_in_mirror(source: GitSource, mirror: Path, allow_moving_ref: bool) -> str:
    ref = source.ref
    is_branch = _git_ok(["show-ref", "--verify", "--quiet", f"refs/heads/{ref}"], mirror) is not None
    is_tag = _git_ok(["show-ref", "--verify", "--quiet", f"refs/tags/{ref}"], mirror) is not None
    if is_branch:
        if not allow_moving_ref:
            raise _refuse_moving(source, "a branch")
        return str(_git_ok(["rev-parse", "--verify", "--quiet", f"refs/heads/{ref}^{{commit}}"], mirror))
    if is_tag:
        commit = _git_ok(["rev-parse", "--verify", "--quiet", f"refs/tags/{ref}^{{commit}}"], mirror)
        if commit is None:
            raise DataError(f"data.path: the tag {ref!r} of {source.url} does not point to a commit")
        return commit
    commit = _git_ok(["rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"], mirror)
    if _ABBREVIATED_SHA.match(ref) or _FULL_SHA.match(ref):
        if commit is None or not commit.startswith(ref):
            raise DataError(f"data.path: the commit {ref} does not exist in the git repository {source.url}")
        return commit
    if commit is not None and not allow_moving_ref:
        raise _refuse_moving(source, "neither a commit sha nor a tag but a relative or symbolic ref")
    if commit is None:
        raise DataError(f"data.path: {ref!r} is neither a commit, a tag nor a branch of the git repository "
                        f"{source.url}")
    return commit


def _check_file_at_commit(source: GitSource, mirror: Path, commit: str) -> None:
    kind = _git_ok(["cat-file", "-t", f"{commit}:{source.path}"], mirror)
    if kind != "blob":
        raise DataError(f"data.path: {source.path} does not exist (as a file) at commit {commit} of {source.url}")


@functools.lru_cache(maxsize=32)
def resolve_commit(spec: str, allow_moving_ref: bool = False) -> str:
    """The full commit sha a git source names. A full sha already checked out or in the
    mirror needs no network; anything else fetches the repository into its mirror first."""
    source = parse_git_source(spec)
    if _FULL_SHA.match(source.ref):
        if (checkout_dir(source.ref) / ".git").is_dir():
            return source.ref
        mirror = _mirror_dir(source.url)
        if (mirror / "HEAD").is_file() and _git_ok(["cat-file", "-e", f"{source.ref}^{{commit}}"], mirror) is not None:
            _check_file_at_commit(source, mirror, source.ref)
            return source.ref  # a commit never changes: no need to fetch again
    mirror = _update_mirror(source)
    commit = _resolve_in_mirror(source, mirror, allow_moving_ref)
    _check_file_at_commit(source, mirror, commit)
    return commit


def pinned_spec(spec: str, allow_moving_ref: bool = False) -> str:
    """The same source with its ref replaced by the full commit sha it resolves to now."""
    return parse_git_source(spec).spec(resolve_commit(spec, allow_moving_ref))


def git_identity(spec: str, allow_moving_ref: bool = False) -> str:
    """What the config hash records for a git source: `git:<commit>#<path>`. A full sha is
    taken as it is (no network); reading a commit that does not exist fails later, clearly."""
    source = parse_git_source(spec)
    commit = source.ref if _FULL_SHA.match(source.ref) else resolve_commit(spec, allow_moving_ref)
    return f"{GIT_IDENTITY_PREFIX}{commit}#{source.path}"


# --------------------------------------------------------------------------- the checkout


def _verify_checkout(directory: Path, commit: str) -> None:
    """The cached checkout is still exactly the commit: HEAD is it and nothing is modified."""
    head = _git_ok(["rev-parse", "HEAD"], directory)
    changes = _git_ok(["status", "--porcelain", "--untracked-files=all"], directory)
    if head != commit or changes is None or changes:
        shown = "; ".join(changes.splitlines()[:3]) if changes else f"HEAD is {head}"
        raise DataError(f"data.path: the cached checkout of commit {commit} in {directory} is dirty ({shown}); "
                        f"it is no longer that commit. Delete {directory} and run again to check it out afresh.")


def _make_read_only(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink() and ".git" not in path.relative_to(directory).parts:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _check_out(source: GitSource, commit: str) -> Path:
    """Clone the mirror and check out `commit` (detached) into the cache, once, atomically."""
    target = checkout_dir(commit)
    if (target / ".git").is_dir():
        return target
    mirror = _mirror_dir(source.url)
    if not (mirror / "HEAD").is_file() or _git_ok(["cat-file", "-e", f"{commit}^{{commit}}"], mirror) is None:
        mirror = _update_mirror(source)
        if _git_ok(["cat-file", "-e", f"{commit}^{{commit}}"], mirror) is None:
            raise DataError(f"data.path: the commit {commit} does not exist in the git repository {source.url}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{commit[:12]}.", dir=target.parent))
    try:
        run_git(["clone", "--quiet", "--no-checkout", "-c", "core.autocrlf=false", "--", str(mirror), str(staging)])
        run_git(["-c", "advice.detachedHead=false", "checkout", "--quiet", "--detach", commit], staging)
        _verify_checkout(staging, commit)
        _make_read_only(staging)
        try:
            os.replace(staging, target)
        except OSError:
            if not (target / ".git").is_dir():
                raise
    except DataError as exc:
        raise DataError(f"data.path: cannot check out commit {commit} of {source.url}: {exc.message}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def checkout_git_source(spec: str, allow_moving_ref: bool = False) -> GitCheckout:
    """The data file of a git source, from a clean, read-only checkout of its commit."""
    source = parse_git_source(spec)
    commit = resolve_commit(spec, allow_moving_ref)
    directory = _check_out(source, commit)
    _verify_checkout(directory, commit)
    if not (directory / source.path).is_file():
        raise DataError(f"data.path: {source.path} does not exist (as a file) at commit {commit} of {source.url}")
    return GitCheckout(source=source, commit=commit, directory=directory)


# --------------------------------------------------------------------------- Hugging Face Hub datasets

HUB_PREFIX = "hf://datasets/"
_HUB_SOURCE = re.compile(r"^hf://datasets/([^/@\s]+)/([^/@\s]+)@([^/\s]+)/(.+)$")
_HUB_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubFile:
    """A file of a Hub dataset repository at a commit, downloaded into the qlorax home."""

    repo: str
    revision: str
    path: str
    commit: str
    file: Path


def is_hub_source(spec: str) -> bool:
    return spec.startswith("hf://")


def parse_hub_source(spec: str) -> tuple[str, str, str]:
    """(repo id, revision, path in the repository) of `hf://datasets/ORG/NAME@<commit>/<path>`."""
    match = _HUB_SOURCE.match(spec)
    if match is None:
        raise DataError(f"data.path {spec!r}: expected hf://datasets/ORG/NAME@<commit>/<path/in/repo>, e.g. "
                        "hf://datasets/org/data@" + "0" * 40 + "/train.parquet")
    org, name, revision, path = match.groups()
    inner = PurePosixPath(path)
    if ".." in inner.parts or path.endswith("/"):
        raise DataError(f"data.path {spec!r}: the file after the commit must be a path inside the repository")
    return f"{org}/{name}", revision, inner.as_posix()


def hub_cache_dir() -> Path:
    return settings.qlorax_home() / "hub"


def _hub_failure(spec: str, revision: str, path: str, exc: Exception) -> DataError:
    kind = type(exc).__name__
    first = str(exc).splitlines()[0] if str(exc) else ""
    what = {"RepositoryNotFoundError": "the dataset repository does not exist (or is private: pass --token-file)",
            "GatedRepoError": "the dataset is gated: accept its terms and pass --token-file",
            "RevisionNotFoundError": f"the commit {revision} does not exist in the repository",
            "RemoteEntryNotFoundError": f"{path} does not exist at {revision}",
            "EntryNotFoundError": f"{path} does not exist at {revision}",
            "LocalEntryNotFoundError": "it is not downloaded yet and the Hub cannot be reached (HF_HUB_OFFLINE=1 "
                                       "or no network)"}.get(kind, f"{kind}: {first}")
    return DataError(f"data.path {spec}: cannot download it from the Hugging Face Hub: {what}")


@functools.lru_cache(maxsize=32)
def download_hub_source(spec: str, allow_moving_ref: bool = False) -> HubFile:
    """The file, downloaded once per commit with huggingface_hub (a file already there at a full
    commit needs no network). A revision that is not a 40-hex commit moves (a branch, a tag the
    Hub lets anyone move): refused unless `data.allow_moving_ref`, and then the commit it points
    to now is recorded. The token is huggingface_hub's own (HF_TOKEN: --token-file's value in
    the training process); nothing here writes it."""
    repo, revision, path = parse_hub_source(spec)
    if not _HUB_COMMIT.match(revision) and not allow_moving_ref:
        raise DataError(f"data.path: {revision!r} is not a 40-hex commit of the Hub dataset {repo}; a branch or "
                        "tag moves, so a run could not say which data it trained on. Name the commit (the "
                        f"dataset's 'History' page lists them: hf://datasets/{repo}@<commit>/{path}), or set "
                        "data.allow_moving_ref: true to train on wherever it points now (the commit is recorded).")
    from huggingface_hub import hf_hub_download

    try:
        local = Path(hf_hub_download(repo, path, repo_type="dataset", revision=revision,
                                     cache_dir=hub_cache_dir()))
    except Exception as exc:  # huggingface_hub's errors, named by class in the message  # noqa: BLE001
        raise _hub_failure(spec, revision, path, exc) from None
    parts = local.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision
    return HubFile(repo=repo, revision=revision, path=path, commit=commit, file=local)


def hub_commit(spec: str, allow_moving_ref: bool = False) -> str:
    """The commit a Hub data source resolves to (downloading it when it is not there yet)."""
    return download_hub_source(spec, allow_moving_ref).commit


# --------------------------------------------------------------------------- provenance (informational)


def local_git_status(path: Path) -> dict[str, Any] | None:
    """For a local file inside a git work tree: the repository, its HEAD commit, and whether
    the file is tracked and modified. None outside a work tree (or without git)."""
    path = Path(path).resolve()
    if shutil.which("git") is None or not path.is_file():
        return None
    directory = path.parent
    top = _git_ok(["rev-parse", "--show-toplevel"], directory)
    if top is None:
        return None
    head = _git_ok(["rev-parse", "--verify", "--quiet", "HEAD"], directory)
    status = _git_ok(["status", "--porcelain", "--untracked-files=all", "--", path.name], directory) or ""
    tracked = _git_ok(["ls-files", "--error-unmatch", "--", path.name], directory) is not None
    return {"repository": top, "commit": head, "tracked": tracked, "modified": bool(status.strip())}


def data_source_record(spec: str, allow_moving_ref: bool = False) -> dict[str, Any] | None:
    """Where the data came from, for training_metadata.json: a git source's URL, ref,
    commit and checkout, or a local file's git status. None for bundled data."""
    if spec.startswith("builtin:"):
        return None
    if is_git_source(spec):
        checkout = checkout_git_source(spec, allow_moving_ref)
        return {"kind": "git", "url": checkout.source.url, "ref": checkout.source.ref, "commit": checkout.commit,
                "path": checkout.source.path, "checkout": str(checkout.directory)}
    if is_hub_source(spec):
        hub = download_hub_source(spec, allow_moving_ref)
        return {"kind": "hub", "repo": hub.repo, "revision": hub.revision, "commit": hub.commit, "path": hub.path,
                "file": str(hub.file)}
    status = local_git_status(Path(spec).expanduser())
    return {"kind": "file", **({"git": status} if status else {})}
