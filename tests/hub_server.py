"""A loopback Hugging Face Hub for tests: the part of the Hub HTTP API that huggingface_hub uses.

No machine running these tests reaches the real Hub, so ``FakeHub`` serves, on 127.0.0.1 and
a free port, the endpoints that ``huggingface_hub`` (2.x, the installed client) calls to
create a repo, commit to it and download from it:

====================================================  ========================================
``POST /api/repos/create``                            create a repo (409 when it exists)
``POST /api/validate-yaml``                           README front matter check
``GET  /api/models/{repo}[/revision/{rev}]``          repo info; resolves a revision to a sha
``GET  /api/models/{repo}/tree/{rev}[/{path}]``       file listing (``recursive``)
``POST /api/models/{repo}/branch/{branch}``           create a branch
``POST /api/models/{repo}/preupload/{rev}``           regular or LFS upload mode per file
``POST /{repo}.git/info/lfs/objects/batch``           LFS batch: upload (basic or multipart)
``PUT  /_lfs/{oid}`` / ``PUT /_lfs/{oid}/part/{n}``   LFS blob, whole or one part
``POST /_lfs/{oid}`` / ``POST /_lfs/{oid}/verify``    multipart completion / LFS verify
``POST /api/models/{repo}/commit/{rev}``              NDJSON commit (inline base64 + lfsFile)
``HEAD|GET /{repo}/resolve/{rev}/{path}``             download, with ``X-Repo-Commit`` and ETag
====================================================  ========================================

Repos live in memory: each has branches (``refs``) pointing to commits, each commit a full
``{path: StoredFile}`` snapshot.  Errors carry the headers the client turns into typed
exceptions (``X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound``).

Large files: huggingface_hub 2.x picks Xet for LFS uploads purely on the client side
(``is_xet_available()``: hf_xet installed and ``HF_HUB_DISABLE_XET`` unset), so a server
cannot steer it; tests must set ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` (see the
fixture in ``test_hub.py``).  This server advertises no Xet endpoint or header, so downloads
always take the plain HTTP path, and uploads take the classic LFS batch path.

Faults: ``fail(method, path_regex, status)`` makes the next matching request(s) fail;
``tokens`` decides who may write where (a wrong token gets 401 everywhere, like the Hub);
``echo_credentials`` makes error bodies repeat the Authorization header, to prove that the
client side never lets a token through even when a server is careless with it.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

# The Hub's default .gitattributes sends these through LFS whatever their size.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".h5",
                ".msgpack", ".onnx", ".pkl", ".model", ".gguf", ".tar", ".zip")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def pointer(self) -> bytes:
        return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\n"
                f"size {len(self.data)}\n").encode()

    @property
    def blob_id(self) -> str:
        """Git oid: of the content for regular files, of the LFS pointer for LFS files."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        """What /resolve answers as ETag: sha256 for LFS files, the git oid otherwise."""
        return self.sha256 if self.lfs else self.blob_id

    @property
    def upload_oid(self) -> str:
        """What /preupload answers as ``oid``; huggingface_hub compares it to its local oid."""
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    next_pr: int = 1

    def resolve(self, rev: str) -> Commit | None:
        if rev in self.refs:
            return self.commits[self.refs[rev]]
        if re.fullmatch(r"[0-9a-f]{40}", rev):
            return self.commits.get(rev)
        return None


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int
    times: int
    message: str


class HubError(Exception):
    """Raised inside a handler: becomes an HTTP error response."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


class FakeHub:
    """An in-memory Hub on a loopback port.  Use as a context manager or start()/stop().

    ``tokens`` maps a token to the namespaces it may write to.  ``lfs_threshold`` is the size
    from which any file is uploaded through LFS; ``multipart_chunk_size`` (when set) makes LFS
    objects larger than it go through the multipart transfer.
    """

    def __init__(self, tokens: dict[str, list[str]] | None = None, *,
                 lfs_threshold: int = 10 * 1024 * 1024, multipart_chunk_size: int | None = None):
        self.tokens = dict(tokens or {})
        self.lfs_threshold = lfs_threshold
        self.multipart_chunk_size = multipart_chunk_size
        self.echo_credentials = False
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_parts: dict[tuple[str, int], bytes] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request served
        self._lock = threading.RLock()
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._httpd is not None, "FakeHub is not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- test helpers -----------------------------------------------------------------------

    def fail(self, method: str, path_regex: str, status: int, *, times: int = 1,
             message: str = "injected failure") -> None:
        """Make the next ``times`` requests matching ``method`` and ``path_regex`` fail."""
        with self._lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times, message))

    def create_repo(self, repo_id: str, files: dict[str, bytes] | None = None,
                    private: bool = False) -> str:
        """Create a repo directly (no HTTP) with one commit holding ``files``; return its sha."""
        with self._lock:
            repo = Repo(repo_id, private)
            self.repos[repo_id] = repo
            init = {".gitattributes": StoredFile(GITATTRIBUTES.encode(), False)}
            init.update({p: StoredFile(d, self._is_lfs(p, len(d))) for p, d in (files or {}).items()})
            for sf in init.values():
                if sf.lfs:
                    self.lfs_objects[sf.sha256] = sf.data
            return self._commit(repo, "main", "initial commit", init)

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``rev`` as ``{path: bytes}``."""
        with self._lock:
            commit = self.repos[repo_id].resolve(rev)
            assert commit is not None, f"no revision {rev} in {repo_id}"
            return {p: f.data for p, f in commit.files.items()}

    def head(self, repo_id: str, rev: str = "main") -> str:
        with self._lock:
            return self.repos[repo_id].refs[rev]

    def is_lfs(self, repo_id: str, path: str, rev: str = "main") -> bool:
        with self._lock:
            return self.repos[repo_id].resolve(rev).files[path].lfs  # type: ignore[union-attr]

    # -- internals --------------------------------------------------------------------------

    def _is_lfs(self, path: str, size: int) -> bool:
        return size >= self.lfs_threshold or path.endswith(LFS_SUFFIXES)

    def _commit(self, repo: Repo, ref: str, message: str, files: dict[str, StoredFile],
                parent: str | None = None) -> str:
        self._counter += 1
        parent = parent if parent is not None else repo.refs.get(ref)
        h = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{self._counter}\n{time.time()}".encode())
        for p in sorted(files):
            h.update(f"{p}:{files[p].blob_id}\n".encode())
        oid = h.hexdigest()
        repo.commits[oid] = Commit(oid, parent, message, dict(files))
        repo.refs[ref] = oid
        return oid


def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
    if len(parts) < 2:
        raise HubError(404, "Repository not found", "RepoNotFound")
    return f"{parts[0]}/{parts[1]}", parts[2:]


class _Handler(BaseHTTPRequestHandler):
    """Routes one request; every route reads/writes ``self.hub`` under its lock."""

    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the httpx client expects

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return

    # -- plumbing ---------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self._send(status, json.dumps(obj).encode(), headers, content_type)

    def _error(self, err: HubError) -> None:
        message = err.message
        if self.hub.echo_credentials:
            message += f" (received Authorization: {self.headers.get('Authorization')})"
        headers = {"X-Error-Message": message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json(err.status, {"error": message}, headers)

    def _user(self, required: bool) -> list[str] | None:
        """Namespaces the request's token may write to; 401 for a wrong token (read or write)."""
        auth = self.headers.get("Authorization")
        if not auth:
            if required:
                raise HubError(401, "You must be authenticated to access this resource")
            return None
        token = auth.split(" ", 1)[1] if " " in auth else auth
        if token not in self.hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.hub.tokens[token]

    def _can_write(self, repo_id: str) -> None:
        namespaces = self._user(required=True)
        if repo_id.split("/")[0] not in (namespaces or []):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and repo_id.split("/")[0] not in (self._user(False) or [])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        raw_parts = [p for p in split.path.split("/") if p]
        parts = [unquote(p) for p in raw_parts]
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        method = self.command
        body = self._body() if method in ("POST", "PUT") else b""
        hub = self.hub
        with hub._lock:
            hub.requests.append((method, unquote(split.path)))
            for fault in hub.faults:
                if fault.times > 0 and fault.method == method and fault.pattern.search(unquote(split.path)):
                    fault.times -= 1
                    raise HubError(fault.status, fault.message)
            self._user(required=False)  # a wrong token is refused everywhere, as on the Hub
            self._route(method, parts, query, body)

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> None:
        if parts[:1] == ["_lfs"]:
            return self._lfs_transfer(method, parts[1:], body)
        if parts[:1] == ["api"]:
            if parts[1:3] == ["repos", "create"] and method == "POST":
                return self._create_repo(json.loads(body or b"{}"))
            if parts[1:2] == ["validate-yaml"] and method == "POST":
                return self._validate_yaml(json.loads(body or b"{}"))
            if parts[1:2] == ["models"]:
                repo_id, rest = _split_repo(parts[2:])
                return self._model_api(method, repo_id, rest, query, body)
            raise HubError(404, "Not found")
        if len(parts) >= 2 and parts[1].endswith(".git") and parts[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(f"{parts[0]}/{parts[1][:-4]}", json.loads(body or b"{}"))
        repo_id, rest = _split_repo(parts)
        if rest[:1] == ["resolve"] and len(rest) >= 3 and method in ("GET", "HEAD"):
            return self._resolve(repo_id, rest[1], "/".join(rest[2:]))
        raise HubError(404, "Not found")

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        try:
            self._dispatch()
        except HubError as err:
            self._error(err)
        except Exception as err:  # a bug in the fake: answer 500 rather than hang the client
            self._error(HubError(500, f"fake hub bug: {err.__class__.__name__}: {err}"))

    # -- repos ------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> None:
        name, org = payload.get("name"), payload.get("organization")
        if not name or not org:
            raise HubError(400, "this fake Hub needs 'organization/name' repo ids")
        repo_id = f"{org}/{name}"
        self._can_write(repo_id)
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:  # the Hub's 409 carries the url: create_repo(exist_ok) reads it
            return self._json(409, {"error": "You already created this model repo", "url": url},
                              {"X-Error-Message": "You already created this model repo"})
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        self.hub.create_repo(repo_id, private=private)
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        if match:
            try:
                meta = yaml.safe_load(match.group(1))
            except yaml.YAMLError as err:
                self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
                return
            if meta is not None and not isinstance(meta, dict):
                self._json(400, {"errors": [{"message": "metadata must be a YAML mapping"}]})
                return
        self._json(200, {"errors": [], "warnings": []})

    def _model_api(self, method: str, repo_id: str, rest: list[str], query: dict[str, str],
                   body: bytes) -> None:
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = self._repo(repo_id)
            commit = self._commit_at(repo, rest[1] if len(rest) > 1 else "main")
            return self._json(200, {
                "id": repo_id, "modelId": repo_id, "sha": commit.oid, "private": repo.private,
                "tags": [], "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                "lastModified": "2026-01-01T00:00:00.000Z"})
        if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
            return self._tree(repo_id, rest[1], "/".join(rest[2:]),
                              query.get("recursive", "").lower() in ("true", "1"))
        if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
            return self._preupload(repo_id, rest[1], json.loads(body or b"{}"))
        if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
            return self._commit(repo_id, rest[1], body, query.get("create_pr") == "1")
        if method == "POST" and rest[:1] == ["branch"] and len(rest) >= 2:
            return self._branch(repo_id, "/".join(rest[1:]), json.loads(body or b"{}"))
        raise HubError(404, "Not found")

    def _tree(self, repo_id: str, rev: str, path: str, recursive: bool) -> None:
        commit = self._commit_at(self._repo(repo_id), rev)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict] = {}
        for p, f in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix):].split("/")
            for depth in range(1, len(rel)):  # folders on the way
                folder = prefix + "/".join(rel[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "path": folder,
                                                "oid": git_blob_sha1(folder.encode())})
            if recursive or len(rel) == 1:
                entry = {"type": "file", "path": p, "size": len(f.data), "oid": f.blob_id}
                if f.lfs:
                    entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": len(f.pointer)}
                entries[p] = entry
        if prefix and not entries:
            raise HubError(404, f"{path} does not exist", "EntryNotFound")
        self._json(200, list(entries.values()))

    def _branch(self, repo_id: str, branch: str, payload: dict) -> None:
        self._can_write(repo_id)
        repo = self._repo(repo_id)
        if branch in repo.refs:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.refs[branch] = start.oid
        self._json(200, {})

    # -- upload -----------------------------------------------------------------------------

    def _preupload(self, repo_id: str, rev: str, payload: dict) -> None:
        self._can_write(repo_id)
        repo = self._repo(repo_id)
        commit = repo.resolve(rev)
        files = []
        for item in payload.get("files", []):
            remote = commit.files.get(item["path"]) if commit is not None else None
            files.append({"path": item["path"], "shouldIgnore": False,
                          "uploadMode": "lfs" if self.hub._is_lfs(item["path"], int(item["size"])) else "regular",
                          "oid": remote.upload_oid if remote is not None else None})
        self._json(200, {"files": files, "commitOid": commit.oid if commit else None})

    def _lfs_batch(self, repo_id: str, payload: dict) -> None:
        self._can_write(repo_id)
        self._repo(repo_id)
        chunk = self.hub.multipart_chunk_size
        objects = []
        transfer = "basic"
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:
                href = f"{self.hub.url}/_lfs/{oid}"
                header: dict[str, str] = {}
                if chunk is not None and size > chunk:
                    transfer = "multipart"
                    header["chunk_size"] = str(chunk)
                    for n in range(1, -(-size // chunk) + 1):
                        header[str(n)] = f"{href}/part/{n}"
                entry["actions"] = {"upload": {"href": href, "header": header},
                                    "verify": {"href": f"{href}/verify"}}
            objects.append(entry)
        self._json(200, {"transfer": transfer, "objects": objects},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_transfer(self, method: str, rest: list[str], body: bytes) -> None:
        """The storage side of LFS (an S3 stand-in): no Hub token involved."""
        if not rest:
            raise HubError(404, "Not found")
        oid = rest[0]
        if method == "PUT" and len(rest) == 1:
            return self._store_lfs(oid, body)
        if method == "PUT" and len(rest) == 3 and rest[1] == "part":
            self.hub.lfs_parts[(oid, int(rest[2]))] = body
            return self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
        if method == "POST" and len(rest) == 1:  # multipart completion
            payload = json.loads(body or b"{}")
            data = bytearray()
            for part in sorted(payload.get("parts", []), key=lambda p: p["partNumber"]):
                chunk = self.hub.lfs_parts.pop((oid, part["partNumber"]), None)
                if chunk is None or part["etag"].strip('"') != hashlib.md5(chunk).hexdigest():
                    raise HubError(400, f"multipart upload of {oid}: bad part {part['partNumber']}")
                data += chunk
            return self._store_lfs(oid, bytes(data))
        if method == "POST" and rest[1:] == ["verify"]:
            payload = json.loads(body or b"{}")
            stored = self.hub.lfs_objects.get(oid)
            if stored is None or len(stored) != int(payload.get("size", -1)):
                raise HubError(404, f"LFS object {oid} not found")
            return self._json(200, {})
        raise HubError(404, "Not found")

    def _store_lfs(self, oid: str, data: bytes) -> None:
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"content does not match oid {oid}")
        self.hub.lfs_objects[oid] = data
        self._send(200, b"")

    def _commit(self, repo_id: str, rev: str, body: bytes, create_pr: bool) -> None:
        self._can_write(repo_id)
        repo = self._repo(repo_id)
        base = self._commit_at(repo, rev)
        if create_pr and rev not in repo.refs:
            raise HubError(400, f"cannot open a pull request against {rev}: not a branch")
        files = dict(base.files)
        header: dict = {}
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "only base64 file content is supported")
                files[value["path"]] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                data = self.hub.lfs_objects.get(value["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                files[value["path"]] = StoredFile(data, True)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {p: f for p, f in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        if not header.get("summary"):
            raise HubError(400, "commit summary is required")
        parent = header.get("parentCommit")
        if parent and not base.oid.startswith(parent):
            raise HubError(412, f"parent commit {parent} is not the head of {rev}")
        pr_url = None
        if create_pr:
            num = repo.next_pr
            repo.next_pr += 1
            oid = self.hub._commit(repo, f"refs/pr/{num}", header["summary"], files, parent=base.oid)
            pr_url = f"{self.hub.url}/{repo_id}/discussions/{num}"
        else:
            oid = self.hub._commit(repo, rev, header["summary"], files)
        self._json(200, {"success": True, "commitOid": oid,
                         "commitUrl": f"{self.hub.url}/{repo_id}/commit/{oid}",
                         "pullRequestUrl": pr_url})

    # -- download ---------------------------------------------------------------------------

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        commit = self._commit_at(self._repo(repo_id), rev)
        f = commit.files.get(path)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        data = f.data
        status = 200
        rng = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", self.headers.get("Range", ""))
        if rng:
            start = int(rng.group(1))
            end = int(rng.group(2)) if rng.group(2) else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start:end + 1], 206
        self._send(status, data, headers, content_type="application/octet-stream")
