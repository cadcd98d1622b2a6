"""A stand-in for the Hugging Face Hub on loopback, for tests (the real one is unreachable here).

It speaks the part of the Hub's HTTP API that huggingface_hub uses to list a model repository and
download its files: GET /api/models/OWNER/REPO[/revision/REV] (files with sizes and LFS sha256),
HEAD and GET /OWNER/REPO/resolve/REV/PATH (X-Repo-Commit, ETag, Content-Length, byte ranges), and
the errors it answers with X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo).
Faults on demand: a transfer cut half-way once, a file served with other bytes than its checksum.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    gated: bool = False  # downloads need the token below
    cut_once: set[str] = field(default_factory=set)  # first GET of these stops half-way
    corrupt: set[str] = field(default_factory=set)  # served with one byte changed


class FakeHub:
    TOKEN = "hf_granted"

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._serve(self, body=False)

            def do_GET(self):
                hub._serve(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def downloads(self, name: str) -> list[str | None]:
        """The Range header of every GET of a file named `name` (None: from the start)."""
        return [r for m, p, r in self.requests if m == "GET" and "/resolve/" in p and p.endswith("/" + name)]

    # -- answering ---------------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            return self._info(h, m[1], m[2])
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._file(h, m[1], m[2], m[3], body)
        self._error(h, 404, None, "not found")

    def _repo(self, h, repo_id: str, revision: str | None) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self._error(h, 401, "RepoNotFound", "Repository not found")
        elif revision not in (None, "main", repo.commit):
            self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {revision}", repo.commit)
        else:
            return repo
        return None

    def _info(self, h, repo_id: str, revision: str | None) -> None:
        repo = self._repo(h, repo_id, revision)
        if repo is None:
            return
        siblings = []
        for name, data in repo.files.items():
            entry = {"rfilename": name, "size": len(data), "blobId": hashlib.sha1(data).hexdigest()}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "size": len(data),
                    "pointerSize": 134,
                }
            siblings.append(entry)
        info = {
            "_id": "0" * 24,
            "id": repo_id,
            "modelId": repo_id,
            "sha": repo.commit,
            "private": False,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }
        self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _file(self, h, repo_id: str, revision: str, name: str, body: bool) -> None:
        repo = self._repo(h, repo_id, revision)
        if repo is None:
            return
        if repo.gated and h.headers.get("Authorization") != f"Bearer {self.TOKEN}":
            status = 403 if h.headers.get("Authorization") else 401
            return self._error(
                h, status, "GatedRepo", f"Access to model {repo_id} is restricted.", repo.commit
            )
        if name not in repo.files:
            return self._error(h, 404, "EntryNotFound", f"{name} does not exist", repo.commit)
        data = repo.files[name]
        etag = (
            hashlib.sha256(data).hexdigest()
            if name.endswith(LFS_SUFFIXES)
            else hashlib.sha1(data).hexdigest()
        )
        if name in repo.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        start = 0
        if body and (m := re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")):
            start = int(m[1])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        if not body:
            return self._send(h, 200, b"", {**headers, "Content-Length": str(len(data))}, head=True)
        payload = data[start:]
        if name in repo.cut_once:  # promise everything, send half, hang up
            repo.cut_once.discard(name)
            h.send_response(206 if start else 200)
            for k, v in {**headers, "Content-Length": str(len(payload))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(payload[: len(payload) // 2])
            h.wfile.flush()
            h.close_connection = True
            return
        self._send(h, 206 if start else 200, payload, headers)

    def _error(self, h, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = message
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head=h.command == "HEAD")

    @staticmethod
    def _send(h, status: int, payload: bytes, headers: dict[str, str], head: bool = False) -> None:
        h.send_response(status)
        headers.setdefault("Content-Length", str(len(payload)))
        for k, v in headers.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(payload)
