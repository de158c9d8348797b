"""A local stand-in for the Hugging Face Hub: the endpoints huggingface_hub 2.4 calls for
`create_repo`, `create_branch`, `create_commit` (preupload + commit, regular non-LFS uploads),
`list_repo_files` and `snapshot_download` (repo info, tree, file resolve), and for dataset
repositories the file resolve (GET and HEAD) that `hf_hub_download(repo_type="dataset")` calls.
Served by werkzeug on 127.0.0.1 in a thread, repositories held in memory as commits of
{path: bytes}.

What it checks like the Hub: a write needs `Authorization: Bearer <token>`; a private repository
is invisible without it; a commit to a missing branch is RevisionNotFound; README.md metadata is
validated as YAML. What it does not do: LFS/Xet uploads (every file is a regular git blob),
pull requests, tags. It never records the Authorization header, only whether it matched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import yaml
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:  # no access log on stderr
        pass


def git_blob_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def commit(self, branch: str, message: str, files: dict[str, bytes]) -> Commit:
        parent = self.branches.get(branch)
        body = json.dumps({"parent": parent, "message": message,
                           "files": {p: git_blob_sha1(c) for p, c in sorted(files.items())}}, sort_keys=True)
        commit = Commit(hashlib.sha1(body.encode()).hexdigest(), parent, message, dict(files))
        self.commits[commit.oid] = commit
        self.branches[branch] = commit.oid
        return commit

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubStandIn:
    """The server: `start()`, `.url`, `.repos`, `.requests` (method, path, authorized), `stop()`."""

    def __init__(self, token: str, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.datasets: dict[str, Repo] = {}  # dataset repositories (add_dataset), served by the resolve endpoint
        self.requests: list[tuple[str, str, bool]] = []
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> HubStandIn:
        self._server = make_server("127.0.0.1", 0, self._app, threaded=True, request_handler=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ dispatch
    def _app(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        raw = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.path
        segments = [unquote(s) for s in raw.split("?", 1)[0].split("/") if s]
        authorized = request.headers.get("Authorization") == f"Bearer {self.token}"
        with self._lock:
            self.requests.append((request.method, "/" + "/".join(segments), authorized))
            response = self._route(request, segments, authorized)
        return response(environ, start_response)

    def _route(self, request: Request, seg: list[str], authorized: bool) -> Response:
        method = request.method
        if seg[:3] == ["api", "repos", "create"] and method == "POST":
            return self._create_repo(request, authorized)
        if seg[:2] == ["api", "validate-yaml"] and method == "POST":
            return self._validate_yaml(request)
        if seg[:2] == ["api", "models"] and len(seg) >= 4:
            repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
            repo = self._visible(repo_id, authorized)
            if repo is None:
                return _error(404, "RepoNotFound", f"Repository {repo_id} not found")
            if not rest and method == "GET":
                return self._info(repo, "main")
            if rest[0] == "revision" and len(rest) == 2 and method == "GET":
                return self._info(repo, rest[1])
            if rest[0] == "tree" and len(rest) >= 2 and method == "GET":
                return self._tree(repo, rest[1], "/".join(rest[2:]), request)
            if not authorized:
                return _error(401, None, "Invalid credentials in Authorization header")
            if rest[0] == "preupload" and len(rest) == 2 and method == "POST":
                return self._preupload(repo, rest[1], request)
            if rest[0] == "commit" and len(rest) == 2 and method == "POST":
                return self._commit(repo, rest[1], request)
            if rest[0] == "branch" and len(rest) == 2 and method == "POST":
                return self._branch(repo, rest[1], request)
        if len(seg) >= 6 and seg[0] == "datasets" and seg[3] == "resolve" and method in ("GET", "HEAD"):
            dataset = self.datasets.get(f"{seg[1]}/{seg[2]}")
            if dataset is None or (dataset.private and not authorized):
                return _error(404, "RepoNotFound", "Repository not found")
            return self._resolve(dataset, seg[4], "/".join(seg[5:]))
        if len(seg) >= 5 and seg[2] == "resolve" and method in ("GET", "HEAD"):
            repo = self._visible(f"{seg[0]}/{seg[1]}", authorized)
            if repo is None:
                return _error(404, "RepoNotFound", "Repository not found")
            return self._resolve(repo, seg[3], "/".join(seg[4:]))
        return _error(404, None, f"no such endpoint: {method} /{'/'.join(seg)}")

    def _visible(self, repo_id: str, authorized: bool) -> Repo | None:
        repo = self.repos.get(repo_id)
        return None if repo is None or (repo.private and not authorized) else repo

    # ------------------------------------------------------------------ endpoints
    def _create_repo(self, request: Request, authorized: bool) -> Response:
        if not authorized:
            return _error(401, None, "Invalid credentials in Authorization header")
        body = request.get_json()
        if body.get("type", "model") != "model":
            return _error(400, None, "this stand-in holds model repositories only")
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        if repo_id in self.repos:
            return _json({"error": "You already created this model repo", "url": f"{self._base(request)}/{repo_id}"},
                         409)
        repo = Repo(repo_id, private=body.get("visibility") == "private" or bool(body.get("private")))
        repo.commit("main", "initial commit", {".gitattributes": GITATTRIBUTES})
        self.repos[repo_id] = repo
        return _json({"url": f"{self._base(request)}/{repo_id}", "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: Request) -> Response:
        content = request.get_json()["content"]
        if content.startswith("---\n"):
            try:
                metadata = yaml.safe_load(content[4:content.index("\n---", 4)])
            except (yaml.YAMLError, ValueError) as exc:
                return _json({"errors": [{"message": f"invalid YAML: {exc}"}], "warnings": []}, 400)
            if not isinstance(metadata, dict):
                return _json({"errors": [{"message": "metadata must be a mapping"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _info(self, repo: Repo, revision: str) -> Response:
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return _json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                      "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": [], "downloads": 0,
                      "likes": 0})

    def _tree(self, repo: Repo, revision: str, prefix: str, request: Request) -> Response:
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = request.args.get("recursive", "false").lower() in ("true", "1")
        entries, folders = [], set()
        for path, content in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rest = path[len(prefix) + 1:] if prefix else path
            if "/" in rest and not recursive:
                folders.add((f"{prefix}/" if prefix else "") + rest.split("/", 1)[0])
                continue
            if recursive:
                parts = path.split("/")[:-1]
                folders.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
            entries.append({"type": "file", "path": path, "size": len(content), "oid": git_blob_sha1(content)})
        entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0}
                    for f in sorted(folders) if not prefix or f.startswith(prefix + "/")]
        return _json(entries)

    def _preupload(self, repo: Repo, revision: str, request: Request) -> Response:
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = []
        for entry in request.get_json()["files"]:
            existing = commit.files.get(entry["path"])
            files.append({"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False,
                          "oid": git_blob_sha1(existing) if existing is not None else None})
        return _json({"files": files, "commitOid": commit.oid})

    def _commit(self, repo: Repo, revision: str, request: Request) -> Response:
        if revision not in repo.branches:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        files = dict(repo.commits[repo.branches[revision]].files)
        header: dict[str, Any] = {}
        for line in request.get_data().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
                parent = value.get("parentCommit")
                if parent and not repo.branches[revision].startswith(parent):
                    return _error(412, None, "parent commit is not the head of the branch")
            elif key == "file":
                if value.get("encoding") != "base64":
                    return _error(400, None, "files must be base64-encoded")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return _error(404, "EntryNotFound", "A file with this name doesn't exist")
                del files[value["path"]]
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:  # lfsFile, copies: not supported by this stand-in
                return _error(400, None, f"unsupported commit operation {key!r} (regular uploads only)")
        commit = repo.commit(revision, header.get("summary", ""), files)
        return _json({"commitUrl": f"{self._base(request)}/{repo.repo_id}/commit/{commit.oid}",
                      "commitOid": commit.oid, "pullRequestUrl": None, "success": True})

    def _branch(self, repo: Repo, branch: str, request: Request) -> Response:
        if branch in repo.branches:
            return _error(409, None, f"Branch {branch} already exists")
        start = (request.get_json(silent=True) or {}).get("startingPoint") or "main"
        commit = repo.resolve(start)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {start}")
        repo.branches[branch] = commit.oid
        return _json({})

    def _resolve(self, repo: Repo, revision: str, path: str) -> Response:
        commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        content = commit.files.get(path)
        if content is None:
            response = _error(404, "EntryNotFound", f"{path} does not exist at {revision}")
            response.headers["X-Repo-Commit"] = commit.oid
            return response
        response = Response(content, 200, content_type="application/octet-stream")  # werkzeug drops a HEAD's body
        response.headers["X-Repo-Commit"] = commit.oid
        response.headers["ETag"] = f'"{git_blob_sha1(content)}"'
        return response

    @staticmethod
    def _base(request: Request) -> str:
        return request.host_url.rstrip("/")

    # ------------------------------------------------------------------ test helpers
    def add_dataset(self, repo_id: str, files: dict[str, bytes], branch: str = "main",
                    private: bool = False) -> str:
        """Commit `files` to a dataset repository (created if new) on `branch`; returns the commit."""
        with self._lock:
            repo = self.datasets.setdefault(repo_id, Repo(repo_id, private=private))
            return repo.commit(branch, "add files", files).oid

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        return dict(commit.files) if commit else {}


def _json(payload: Any, status: int = 200) -> Response:
    return Response(json.dumps(payload), status, content_type="application/json")


def _error(status: int, code: str | None, message: str) -> Response:
    response = _json({"error": message}, status)
    if code:
        response.headers["X-Error-Code"] = code
    response.headers["X-Error-Message"] = message
    return response
