"""A small in-memory Hugging Face Hub, served over real HTTP on 127.0.0.1, for offline tests.

It implements the slice of the Hub's HTTP API that `huggingface_hub` (1.x and 2.x) calls to publish a
model repo and that `transformers` / `hf_hub_download` call to load one back:

  GET  /api/whoami-v2                                   token check
  POST /api/repos/create                                create a model repo (409 when it exists)
  POST /api/validate-yaml                               parse the README front matter (400 on bad YAML)
  GET  /api/models/{repo}[/revision/{rev}]              model_info / repo_info
  GET  /api/models/{repo}/refs                          list_repo_refs
  GET  /api/models/{repo}/tree/{rev}[/{path}]           list_repo_tree / list_repo_files
  POST /api/models/{repo}/paths-info/{rev}              get_paths_info
  POST /api/models/{repo}/branch/{branch}               create_branch
  POST /api/models/{repo}/preupload/{rev}               upload mode per file ("regular" or "lfs")
  POST /{repo}.git/info/lfs/objects/batch               LFS batch API ("basic" transfer)
  PUT  /__lfs/upload/{sha256}, POST /__lfs/verify       LFS object upload and verification
  POST /api/models/{repo}/commit/{rev}[?create_pr=1]    NDJSON commit (base64 files, lfsFile, deletions)
  POST /api/models/{repo}/discussions                   open a pull request (refs/pr/N)
  GET  /api/models/{repo}/discussions/{num}             pull request details
  HEAD/GET /{repo}/resolve/{rev}/{path}                 file download, with X-Repo-Commit, ETag,
                                                        X-Linked-Etag / X-Linked-Size for LFS files

Which files go through LFS is decided the way the Hub does it: by the `.gitattributes` of the
target revision (the initial commit writes one that tracks `*.safetensors`, `*.bin`, ...) or by size.
Xet storage is not implemented: clients must run with `HF_HUB_DISABLE_XET` (the documented switch),
or only push files the server classifies as "regular" (see `lfs=False`).

Errors carry the `X-Error-Code` header values (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`)
that `huggingface_hub` turns into its typed exceptions. Only loopback addresses are ever bound.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.onnx", "*.msgpack", "*.model")
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub stores larger files through LFS whatever .gitattributes says


def git_blob_oid(content: bytes) -> str:
    """The git object id of a blob, which the Hub reports as a regular file's ETag / oid."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    size: int
    oid: str  # git blob id (of the pointer file for LFS files)
    content: Optional[bytes] = None  # regular files
    sha256: Optional[str] = None  # LFS files; content lives in FakeHub.lfs_objects

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    message: str
    files: dict[str, StoredFile]
    created: float


@dataclass
class PullRequest:
    num: int
    title: str
    description: str
    author: str
    base: str
    created: float

    @property
    def ref(self) -> str:
        return f"refs/pr/{self.num}"


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    pull_requests: list[PullRequest] = field(default_factory=list)


class HubError(Exception):
    """Turned into an HTTP error response carrying the Hub's error headers."""

    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None,
                 extra: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        self.extra = extra or {}  # more fields of the JSON error body


class FakeHub:
    """The server state plus the HTTP server; use as a context manager or call start()/stop().

    tokens: bearer token -> user name. `lfs=False` makes the server classify every file as a regular
    git blob (inline base64 in the commit), the path `upload_folder` takes without any LFS/Xet call.
    """

    def __init__(self, tokens: Optional[dict[str, str]] = None, *, lfs: bool = True, host: str = "127.0.0.1"):
        if host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError("the fake hub only binds loopback addresses")
        self.tokens = dict(tokens or {})
        self.lfs = lfs
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._connections: set[socket.socket] = set()  # open keep-alive connections, closed by stop()
        self._server = ThreadingHTTPServer((host, 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        # Handler threads keep serving keep-alive connections after the listening socket is closed; a
        # client's pooled connection would then still reach this (stopped) hub's state. Cut them.
        with self.lock:
            connections, self._connections = list(self._connections), set()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- state helpers (also handy in tests) -------------------------------------------------------

    def user_for(self, authorization: Optional[str]) -> Optional[str]:
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        return self.tokens.get(authorization[7:].strip())

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        with self.lock:
            repo = self.repos[repo_id]
            stored = repo.commits[self.resolve_revision(repo, revision)].files[path]
            return stored.content if not stored.is_lfs else self.lfs_objects[stored.sha256]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        with self.lock:
            repo = self.repos[repo_id]
            return dict(repo.commits[self.resolve_revision(repo, revision)].files)

    def resolve_revision(self, repo: Repo, revision: str) -> str:
        if revision in repo.refs:
            return repo.refs[revision]
        if revision in repo.commits:
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def new_commit(self, repo: Repo, parent: Optional[str], message: str, files: dict[str, StoredFile]) -> Commit:
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_id}\0{parent}\0{message}\0{next(self._counter)}\0".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].oid}\0".encode())
        commit = Commit(digest.hexdigest(), parent, message, files, time.time())
        repo.commits[commit.oid] = commit
        return commit


def _iso(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(timestamp))


def _make_handler(hub: FakeHub):
    class Handler(_HubHandler):
        pass

    Handler.hub = hub
    return Handler


class _HubHandler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    server_version = "FakeHub/1.0"

    # -- plumbing ----------------------------------------------------------------------------------

    def log_message(self, format, *args):  # keep test output clean
        pass

    def setup(self):
        super().setup()
        with self.hub.lock:
            self.hub._connections.add(self.connection)

    def finish(self):
        with self.hub.lock:
            self.hub._connections.discard(self.connection)
        super().finish()

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after each chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, payload, status: int = 200, headers: Optional[dict] = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.query = parse_qs(parts.query)
        raw_path = parts.path
        with self.hub.lock:
            self.hub.requests.append((method, raw_path))
        try:
            body = self._read_body() if method in ("POST", "PUT") else b""
            self.user = self.hub.user_for(self.headers.get("Authorization"))
            if not self._route(method, raw_path, body):
                raise HubError(404, f"fake hub: no route for {method} {raw_path}")
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            self._json({"error": err.message, **err.extra}, err.status, headers)
        except Exception as err:  # a bug in the fake: report it loudly to the client
            self._json({"error": f"fake hub internal error: {type(err).__name__}: {err}"}, 500)

    def _route(self, method: str, raw: str, body: bytes) -> bool:
        segments = raw.strip("/").split("/")
        if raw == "/api/whoami-v2" and method == "GET":
            return self._whoami()
        if raw == "/api/repos/create" and method == "POST":
            return self._create_repo(json.loads(body or b"{}"))
        if raw == "/api/validate-yaml" and method == "POST":
            return self._validate_yaml(json.loads(body or b"{}"))
        if raw == "/__lfs/verify" and method == "POST":
            return self._lfs_verify(json.loads(body or b"{}"))
        if len(segments) == 3 and segments[:2] == ["__lfs", "upload"] and method == "PUT":
            return self._lfs_put(segments[2], body)
        if len(segments) >= 4 and segments[:2] == ["api", "models"]:
            repo_id = f"{unquote(segments[2])}/{unquote(segments[3])}"
            return self._api_model(method, repo_id, segments[4:], body)
        if len(segments) == 6 and segments[1].endswith(".git") and segments[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{segments[0]}/{segments[1][:-4]}", json.loads(body or b"{}"))
        if len(segments) >= 5 and segments[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
            return self._resolve(repo_id, unquote(segments[3]), unquote("/".join(segments[4:])))
        return False

    # -- auth and repos ----------------------------------------------------------------------------

    def _require_user(self) -> str:
        if self.user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.user

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        repo = self.hub.repos.get(repo_id)
        visible = repo is not None and (not repo.private or self.user == repo.owner)
        if not visible:
            # The Hub answers the same for "missing" and "private, not yours", so as not to leak names.
            raise HubError(401 if self.user is None else 404, "Repository not found", "RepoNotFound")
        if write:
            if self.user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            if self.user != repo.owner:
                raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _whoami(self) -> bool:
        user = self._require_user()
        self._json({"type": "user", "name": user, "fullname": user, "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}}})
        return True

    def _create_repo(self, payload: dict) -> bool:
        user = self._require_user()
        repo_type = payload.get("type") or "model"
        if repo_type != "model":
            raise HubError(400, f"the fake hub only hosts model repos, not {repo_type!r}")
        namespace = payload.get("organization") or user
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo under {namespace!r}")
        name = payload.get("name") or ""
        if not name or "/" in name:
            raise HubError(400, f"invalid repo name {name!r}")
        repo_id = f"{namespace}/{name}"
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                # like the Hub, the conflict answer still carries the URL (create_repo(exist_ok=True) reads it)
                raise HubError(409, "You already created this model repo", extra={"url": f"{self.hub.url}/{repo_id}"})
            repo = Repo(repo_id, user, private)
            content = DEFAULT_GITATTRIBUTES.encode()
            initial = self.hub.new_commit(repo, None, "initial commit",
                                          {".gitattributes": StoredFile(len(content), git_blob_oid(content), content)})
            repo.refs["main"] = initial.oid
            self.hub.repos[repo_id] = repo
        self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": repo_id})
        return True

    def _validate_yaml(self, payload: dict) -> bool:
        content = payload.get("content", "")
        errors = []
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end < 0:
                errors.append({"message": "front matter is not closed by a '---' line"})
            else:
                try:
                    data = yaml.safe_load(content[3:end])
                    if data is not None and not isinstance(data, dict):
                        errors.append({"message": "front matter must be a YAML mapping"})
                except yaml.YAMLError as err:
                    errors.append({"message": f"invalid YAML: {err}"})
        if errors:
            self._json({"errors": errors, "warnings": []}, 400)
        else:
            self._json({"errors": [], "warnings": []})
        return True

    # -- /api/models/{repo}/... --------------------------------------------------------------------

    def _api_model(self, method: str, repo_id: str, rest: list[str], body: bytes) -> bool:
        with self.hub.lock:
            if not rest and method == "GET":
                return self._model_info(repo_id, "main")
            action = rest[0] if rest else ""
            if action == "revision" and len(rest) >= 2 and method == "GET":
                return self._model_info(repo_id, unquote("/".join(rest[1:])))
            if action == "refs" and method == "GET":
                return self._refs(repo_id)
            if action == "tree" and len(rest) >= 2 and method == "GET":
                return self._tree(repo_id, unquote(rest[1]), unquote("/".join(rest[2:])))
            if action == "paths-info" and len(rest) == 2 and method == "POST":
                return self._paths_info(repo_id, unquote(rest[1]), body)
            if action == "branch" and len(rest) == 2 and method == "POST":
                return self._create_branch(repo_id, unquote(rest[1]), json.loads(body or b"{}"))
            if action == "preupload" and len(rest) == 2 and method == "POST":
                return self._preupload(repo_id, unquote(rest[1]), json.loads(body or b"{}"))
            if action == "commit" and len(rest) == 2 and method == "POST":
                return self._commit(repo_id, unquote(rest[1]), body)
            if action == "discussions" and len(rest) == 1 and method == "POST":
                return self._open_pull_request(repo_id, json.loads(body or b"{}"))
            if action == "discussions" and len(rest) == 2 and method == "GET":
                return self._pull_request_details(repo_id, int(rest[1]))
        return False

    def _entry(self, path: str, stored: StoredFile, *, rfilename: bool = False) -> dict:
        entry = {"type": "file", "oid": stored.oid, "size": stored.size, "path": path}
        if rfilename:
            entry = {"rfilename": path, "size": stored.size, "blobId": stored.oid}
        if stored.is_lfs:
            pointer_size = len(lfs_pointer(stored.sha256, stored.size))
            # the tree API names the sha256 "oid", model_info's siblings name it "sha256"
            entry["lfs"] = {"sha256" if rfilename else "oid": stored.sha256, "size": stored.size, "pointerSize": pointer_size}
        return entry

    def _model_info(self, repo_id: str, revision: str) -> bool:
        repo = self._repo(repo_id)
        commit = repo.commits[self.hub.resolve_revision(repo, revision)]
        config = None
        if "config.json" in commit.files and not commit.files["config.json"].is_lfs:
            try:
                config = json.loads(commit.files["config.json"].content)
            except ValueError:
                config = None
        self._json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo.owner, "sha": commit.oid, "lastModified": _iso(commit.created),
            "createdAt": _iso(repo.commits[min(repo.commits, key=lambda oid: repo.commits[oid].created)].created),
            "private": repo.private, "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [],
            "config": config,
            "siblings": [self._entry(path, stored, rfilename=True) for path, stored in sorted(commit.files.items())],
        })
        return True

    def _refs(self, repo_id: str) -> bool:
        repo = self._repo(repo_id)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                    for name, oid in repo.refs.items() if not name.startswith("refs/")]
        payload = {"branches": branches, "converts": [], "tags": []}
        if self.query.get("include_prs"):
            payload["pullRequests"] = [{"name": pr.ref, "ref": pr.ref, "targetCommit": repo.refs[pr.ref]}
                                       for pr in repo.pull_requests]
        self._json(payload)
        return True

    def _tree(self, repo_id: str, revision: str, prefix: str) -> bool:
        repo = self._repo(repo_id)
        files = repo.commits[self.hub.resolve_revision(repo, revision)].files
        prefix = prefix.strip("/")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        base = f"{prefix}/" if prefix else ""
        if prefix and not any(p.startswith(base) for p in files):
            raise HubError(404, f"{prefix} does not exist", "EntryNotFound")
        entries, folders = [], set()
        for path, stored in sorted(files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                parts = rest.split("/")
                for depth in range(1, len(parts) if recursive else 2):
                    folders.add(base + "/".join(parts[:depth]))
                if not recursive:
                    continue
            entries.append(self._entry(path, stored))
        tree_oid = lambda p: hashlib.sha1(p.encode()).hexdigest()  # noqa: E731 - a stable fake tree id
        self._json([{"type": "directory", "oid": tree_oid(f), "size": 0, "path": f} for f in sorted(folders)] + entries)
        return True

    def _paths_info(self, repo_id: str, revision: str, body: bytes) -> bool:
        repo = self._repo(repo_id)
        files = repo.commits[self.hub.resolve_revision(repo, revision)].files
        content_type = self.headers.get("Content-Type", "")
        if "json" in content_type:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        result = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                result.append(self._entry(path, files[path]))
            elif any(p.startswith(path + "/") for p in files):
                result.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._json(result)
        return True

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> bool:
        repo = self._repo(repo_id, write=True)
        if branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name {branch!r}")
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: {branch}")
        start = payload.get("startingPoint") or "main"
        repo.refs[branch] = self.hub.resolve_revision(repo, start)
        self._json({})
        return True

    def _lfs_tracked(self, files: dict[str, StoredFile], path: str, size: int) -> bool:
        if not self.hub.lfs:
            return False
        if size >= LFS_SIZE_THRESHOLD:
            return True
        attributes = files.get(".gitattributes")
        text = attributes.content.decode() if attributes is not None and attributes.content is not None else ""
        name = path.rsplit("/", 1)[-1]
        for line in text.splitlines():
            fields = line.split()
            if len(fields) >= 2 and "filter=lfs" in fields[1:]:
                if fnmatch.fnmatch(path, fields[0]) or fnmatch.fnmatch(name, fields[0]):
                    return True
        return False

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> bool:
        repo = self._repo(repo_id, write=True)
        base = "main" if self.query.get("create_pr") else revision
        files = repo.commits[self.hub.resolve_revision(repo, base)].files
        answer = []
        for item in payload.get("files", []):
            path, size = item["path"], int(item["size"])
            existing = files.get(path)
            answer.append({
                "path": path,
                "uploadMode": "lfs" if self._lfs_tracked(files, path, size) else "regular",
                "shouldIgnore": False,
                "oid": existing.oid if existing is not None else None,
            })
        self._json({"files": answer})
        return True

    def _commit(self, repo_id: str, revision: str, body: bytes) -> bool:
        repo = self._repo(repo_id, write=True)
        create_pr = bool(self.query.get("create_pr"))
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        if create_pr:
            base_oid = self.hub.resolve_revision(repo, revision)
        else:
            if revision not in repo.refs:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            base_oid = repo.refs[revision]
        if header.get("parentCommit") and header["parentCommit"] != base_oid:
            raise HubError(412, "A commit has happened since the parent commit; the commit is refused")
        files = dict(repo.commits[base_oid].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r}")
                content = base64.b64decode(value["content"])
                files[value["path"]] = StoredFile(len(content), git_blob_oid(content), content)
            elif key == "lfsFile":
                sha = value["oid"]
                if value.get("algo", "sha256") != "sha256" or sha not in self.hub.lfs_objects:
                    raise HubError(422, f"LFS object {sha} for {value.get('path')} was never uploaded")
                size = len(self.hub.lfs_objects[sha])
                files[value["path"]] = StoredFile(size, git_blob_oid(lfs_pointer(sha, size)), sha256=sha)
            elif key == "deletedFile":
                if value["path"] not in files:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                folder = value["path"].rstrip("/") + "/"
                for path in [p for p in files if p.startswith(folder)]:
                    del files[path]
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        message = header.get("summary") or "commit"
        commit = self.hub.new_commit(repo, base_oid, message, files)
        pr_url = None
        if create_pr:
            pr = PullRequest(len(repo.pull_requests) + 1, message, header.get("description", ""), self.user,
                             revision, time.time())
            repo.pull_requests.append(pr)
            repo.refs[pr.ref] = commit.oid
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{pr.num}"
        else:
            repo.refs[revision] = commit.oid
        self._json({"success": True, "commitOid": commit.oid, "commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit.oid}",
                    "pullRequestUrl": pr_url, "hookOutput": ""})
        return True

    def _open_pull_request(self, repo_id: str, payload: dict) -> bool:
        repo = self._repo(repo_id, write=True)
        if not payload.get("pullRequest"):
            raise HubError(400, "the fake hub only opens pull requests, not plain discussions")
        pr = PullRequest(len(repo.pull_requests) + 1, payload.get("title", ""), payload.get("description", ""),
                         self.user, "main", time.time())
        repo.pull_requests.append(pr)
        repo.refs[pr.ref] = repo.refs["main"]
        self._json({"num": pr.num, "url": f"{self.hub.url}/{repo_id}/discussions/{pr.num}", "pullRequest": True})
        return True

    def _pull_request_details(self, repo_id: str, num: int) -> bool:
        repo = self._repo(repo_id)
        if not 1 <= num <= len(repo.pull_requests):
            raise HubError(404, f"Discussion {num} not found")
        pr = repo.pull_requests[num - 1]
        self._json({
            "num": pr.num, "title": pr.title, "status": "draft", "isPullRequest": True,
            "createdAt": _iso(pr.created), "author": {"name": pr.author},
            "repo": {"name": repo_id, "type": "model"},
            "changes": {"base": f"refs/heads/{pr.base}"}, "filesWithConflicts": [],
            "events": [{"id": f"{pr.num:024x}", "type": "comment", "createdAt": _iso(pr.created),
                        "author": {"name": pr.author},
                        "data": {"edited": False, "hidden": False, "latest": {"raw": pr.description}}}],
        })
        return True

    # -- LFS ---------------------------------------------------------------------------------------

    def _lfs_batch(self, repo_id: str, payload: dict) -> bool:
        with self.hub.lock:
            self._repo(repo_id, write=True)
        if payload.get("operation") != "upload":
            raise HubError(400, "the fake hub's LFS batch API only accepts uploads")
        objects = []
        for item in payload.get("objects", []):
            oid, size = item["oid"], int(item["size"])
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/__lfs/upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/__lfs/verify", "header": {}},
                }
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   headers={"Content-Type": "application/vnd.git-lfs+json"})
        return True

    def _lfs_put(self, oid: str, body: bytes) -> bool:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"uploaded content does not hash to {oid}")
        with self.hub.lock:
            self.hub.lfs_objects[oid] = body
        self._send(200)
        return True

    def _lfs_verify(self, payload: dict) -> bool:
        self._require_user()
        stored = self.hub.lfs_objects.get(payload.get("oid", ""))
        if stored is None or len(stored) != int(payload.get("size", -1)):
            raise HubError(404, f"LFS object {payload.get('oid')} not found or of the wrong size")
        self._json({"success": True})
        return True

    # -- downloads ---------------------------------------------------------------------------------

    def _send_content(self, content: bytes, headers: dict) -> None:
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes="):
            start_text, _, end_text = byte_range[6:].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(content) - 1
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(content)}", "Accept-Ranges": "bytes"}
            self._send(206, content[start:end + 1], headers, "application/octet-stream")
        else:
            self._send(200, content, {**headers, "Accept-Ranges": "bytes"}, "application/octet-stream")

    def _resolve(self, repo_id: str, revision: str, path: str) -> bool:
        with self.hub.lock:
            repo = self._repo(repo_id)
            commit_oid = self.hub.resolve_revision(repo, revision)
            stored = repo.commits[commit_oid].files.get(path)
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit_oid})
        headers = {"X-Repo-Commit": commit_oid, "ETag": f'"{stored.oid}"'}
        if stored.is_lfs:
            # The Hub redirects LFS downloads to a CDN host and puts the object's sha256 and size in
            # X-Linked-Etag / X-Linked-Size. A redirect to this same host would be followed by the client
            # and lose those headers, so the content is served here directly, with the same headers.
            headers.update({"X-Linked-Etag": f'"{stored.sha256}"', "X-Linked-Size": str(stored.size)})
            self._send_content(self.hub.lfs_objects[stored.sha256], headers)
        else:
            self._send_content(stored.content, headers)
        return True


__all__ = ["FakeHub", "HubError", "StoredFile", "git_blob_oid", "lfs_pointer"]
