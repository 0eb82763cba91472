"""A loopback Hugging Face Hub: the HTTP calls ``huggingface_hub`` makes to upload and download.

Answers, for model repositories, exactly what the publishing code path uses:

* ``POST /api/repos/create`` (409 when it exists, as the Hub does);
* ``GET /api/models/<repo>/tree/<rev>/<path>?recursive=`` (files with blob id, and LFS sha256);
* ``POST /api/models/<repo>/preupload/<rev>`` (LFS for ``*.safetensors``, regular otherwise);
* ``POST /<repo>.git/info/lfs/objects/batch`` and the ``PUT`` it points at (basic transfer;
  an object already stored gets no upload action, as real LFS servers answer);
* ``POST /api/models/<repo>/commit/<rev>`` (the ndjson commit: regular files base64, LFS by oid);
* ``HEAD``/``GET /<repo>/resolve/<rev>/<path>`` (what ``hf_hub_download`` reads).

Errors carry the ``X-Error-Code`` header the client maps to its exceptions. Writes need a
``Bearer`` token. Every request is recorded in ``calls`` so a test can see what went over
the wire. Xet storage is not spoken: tests set ``HF_HUB_DISABLE_XET`` so the client uses LFS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    sha = hashlib.sha256(data).hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()


@dataclass
class Repo:
    private: bool
    files: dict[str, tuple[bytes, bool]] = field(default_factory=dict)  # path -> (content, is_lfs)
    commits: list[tuple[str, dict[str, tuple[bytes, bool]]]] = field(default_factory=list)  # (oid, snapshot)

    @property
    def head(self) -> str:
        return self.commits[-1][0] if self.commits else "0" * 40

    def snapshot(self, rev: str) -> dict[str, tuple[bytes, bool]] | None:
        if rev == "main":
            return self.files
        return next((snap for oid, snap in self.commits if oid == rev), None)


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    calls: list[tuple[str, str]] = field(default_factory=list)  # (method, path) in arrival order
    url: str = ""

    def entry(self, path: str, content: bytes, is_lfs: bool) -> dict:
        out = {"type": "file", "path": path, "size": len(content)}
        out["oid"] = git_sha1(lfs_pointer(content) if is_lfs else content)
        if is_lfs:
            sha = hashlib.sha256(content).hexdigest()
            out["lfs"] = {"oid": sha, "size": len(content), "pointerSize": len(lfs_pointer(content))}
        return out

    def commits_of(self, repo: str) -> int:
        return len(self.repos[repo].commits) if repo in self.repos else 0

    def committed_paths(self, repo: str, index: int) -> list[str]:
        """Paths whose content changed in commit ``index`` (0-based) of ``repo``."""
        snaps = [snap for _, snap in self.repos[repo].commits]
        before = snaps[index - 1] if index else {}
        return sorted(p for p, v in snaps[index].items() if before.get(p) != v)


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub  # set on the subclass the server is built with

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    # -- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, ctype="application/json"):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self) -> bool:
        if self.headers.get("Authorization", "").startswith("Bearer "):
            return True
        self._error(401, "Unauthorized", "a write needs a token")
        return False

    def _route(self, method: str) -> None:
        path = urlsplit(self.path).path
        self.hub.calls.append((method, path))
        for pattern, handler in ROUTES:
            if (m := re.fullmatch(pattern, f"{method} {path}")) is not None:
                return handler(self, *(unquote(g) if g is not None else None for g in m.groups()))
        self._error(404, "NotFound", f"no route for {method} {path}")

    def do_GET(self) -> None:
        self._route("GET")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    # -- endpoints
    def create_repo(self) -> None:
        if not self._authorized():
            return
        body = json.loads(self._body())
        repo = f"{body['organization']}/{body['name']}"
        if repo in self.hub.repos:  # the Hub's 409 still names the repo's url, which the client reads
            message = "You already created this model repo"
            return self._json(
                409, {"error": message, "url": f"{self.hub.url}/{repo}"}, {"X-Error-Message": message}
            )
        self.hub.repos[repo] = Repo(private=body.get("visibility") == "private")
        self._json(200, {"url": f"{self.hub.url}/{repo}", "name": repo})

    def _repo(self, repo: str) -> Repo | None:
        if repo not in self.hub.repos:
            self._error(404, "RepoNotFound", f"Repository Not Found for url: {self.path}")
            return None
        return self.hub.repos[repo]

    def tree(self, repo: str, rev: str, prefix: str | None) -> None:
        if (r := self._repo(repo)) is None:
            return
        snap = r.snapshot(rev)
        if snap is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        recursive = parse_qs(urlsplit(self.path).query).get("recursive", ["false"])[0].lower() == "true"
        base = f"{prefix.strip('/')}/" if prefix else ""
        names = sorted(p for p in snap if p.startswith(base) and (recursive or "/" not in p[len(base) :]))
        if prefix and not names:
            return self._error(404, "EntryNotFound", f"{prefix} does not exist on {rev}")
        self._json(200, [self.hub.entry(p, *snap[p]) for p in names])

    def preupload(self, repo: str, rev: str) -> None:
        if (r := self._repo(repo)) is None or not self._authorized():
            return
        files = []
        for f in json.loads(self._body())["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES)
            entry = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if f["path"] in r.files:
                content, was_lfs = r.files[f["path"]]
                entry["oid"] = hashlib.sha256(content).hexdigest() if was_lfs else git_sha1(content)
            files.append(entry)
        self._json(200, {"files": files, "commitOid": r.head})

    def lfs_batch(self, repo: str) -> None:
        if self._repo(repo) is None or not self._authorized():
            return
        body = json.loads(self._body())
        objects = []
        for obj in body["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {"upload": {"href": f"{self.hub.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str) -> None:
        data = self._body()
        if hashlib.sha256(data).hexdigest() != oid:
            return self._error(400, "BadContent", "sha256 does not match the oid")
        self.hub.lfs[oid] = data
        self._send(200)

    def commit(self, repo: str, rev: str) -> None:
        if (r := self._repo(repo)) is None or not self._authorized():
            return
        files = dict(r.files)
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        for item in lines[1:]:
            value = item["value"]
            if item["key"] == "file":
                files[value["path"]] = (base64.b64decode(value["content"]), False)
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.hub.lfs:
                    return self._error(422, "LfsNotFound", f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = (self.hub.lfs[value["oid"]], True)
            else:
                return self._error(400, "Unsupported", f"fake hub: no {item['key']}")
        oid = hashlib.sha1(json.dumps([lines[0], len(r.commits)]).encode()).hexdigest()
        r.files = files
        r.commits.append((oid, dict(files)))
        self._json(
            200,
            {"commitUrl": f"{self.hub.url}/{repo}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None},
        )

    def resolve(self, repo: str, rev: str, path: str) -> None:
        if (r := self._repo(repo)) is None:
            return
        snap = r.snapshot(rev)
        if snap is None or path not in snap:
            return self._error(404, "EntryNotFound", f"{path} not found at {rev}")
        content, is_lfs = snap[path]
        commit = r.head if rev == "main" else rev
        etag = hashlib.sha256(content).hexdigest() if is_lfs else git_sha1(content)
        self._send(200, content, {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, "application/octet-stream")


_REPO = r"([\w.-]+/[\w.-]+)"
ROUTES = [
    (r"POST /api/repos/create", _Handler.create_repo),
    (rf"GET /api/models/{_REPO}/tree/([^/]+)(?:/(.+))?", _Handler.tree),
    (rf"POST /api/models/{_REPO}/preupload/([^/]+)", _Handler.preupload),
    (rf"POST /{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    (r"PUT /lfs-upload/([0-9a-f]{64})", _Handler.lfs_put),
    (rf"POST /api/models/{_REPO}/commit/([^/]+)", _Handler.commit),
    (rf"(?:HEAD|GET) /{_REPO}/resolve/([^/]+)/(.+)", _Handler.resolve),
]


def serve() -> tuple[FakeHub, ThreadingHTTPServer]:
    """A running fake Hub on a free loopback port; ``server.shutdown()`` stops it."""
    hub = FakeHub()
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return hub, server


def fake_hub_env(mp, url: str, cache) -> None:
    """Point the real huggingface_hub client at a loopback fake Hub, with a token and its own cache.

    The fake speaks LFS, not Xet: ``HF_HUB_DISABLE_XET`` is read at import, so the constant is
    patched (as is ``HF_HUB_OFFLINE``, which another test may have switched on the same way).
    """
    from huggingface_hub import constants

    mp.setenv("HF_ENDPOINT", url)
    mp.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
    mp.setattr(constants, "HF_HUB_OFFLINE", False)
