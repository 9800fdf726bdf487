"""A tiny stand-in for the Hugging Face Hub's file API, served on 127.0.0.1 for download tests.

It answers the requests huggingface_hub's `snapshot_download` makes (read from the installed
huggingface_hub: hf_api.repo_info / list_repo_tree and file_download.get_hf_file_metadata / http_get):
  GET  /api/models/{repo}/revision/{rev}   repo info with `sha`
  GET  /api/models/{repo}/tree/{rev}       recursive file listing (type, path, size, oid)
  HEAD /{repo}/resolve/{rev}/{file}        X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}        the bytes, honouring `Range: bytes=N-` with 206
Unknown repos answer 404 with X-Error-Code RepoNotFound, unknown files EntryNotFound.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    commit: str = COMMIT


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo]
    # file name -> bytes to send before dropping the connection, for the next GET of that file only
    cut_next_get: dict[str, int] = field(default_factory=dict)
    range_requests: list[tuple[str, str]] = field(default_factory=list)  # (file, Range header)
    slow_files: set[str] = field(default_factory=set)  # streamed in 16 KB pieces, 10 ms apart
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_HubHandler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/]+)$")


class _HubHandler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        return None

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        if match := _API.match(path):
            self._api(match["repo"], match["kind"])
        elif match := _RESOLVE.match(path):
            self._file(match["repo"], match["file"], send_body=True)
        else:
            self._error(404, "RepoNotFound")

    def do_HEAD(self) -> None:
        path = unquote(urlparse(self.path).path)
        if match := _RESOLVE.match(path):
            self._file(match["repo"], match["file"], send_body=False)
        else:
            self._error(404, "RepoNotFound")

    def _api(self, repo_id: str, kind: str) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound")
            return
        if kind == "revision":
            body = {
                "id": repo_id,
                "sha": repo.commit,
                "siblings": [{"rfilename": name} for name in repo.files],
            }
        else:
            body = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in repo.files.items()
            ]
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _file(self, repo_id: str, filename: str, send_body: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound")
            return
        data = repo.files.get(filename)
        if data is None:
            self._error(404, "EntryNotFound", commit=repo.commit)
            return
        start = 0
        range_header = self.headers.get("Range")
        if send_body and range_header:
            self.fake.range_requests.append((filename, range_header))
            start = int(re.match(r"bytes=(\d+)-", range_header).group(1))
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not send_body:
            return
        cut = self.fake.cut_next_get.pop(filename, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True  # the client sees a body shorter than Content-Length
            return
        if filename in self.fake.slow_files:
            for offset in range(0, len(body), 16_384):
                self.wfile.write(body[offset : offset + 16_384])
                self.wfile.flush()
                time.sleep(0.01)
            return
        self.wfile.write(body)

    def _error(self, status: int, code: str, commit: str | None = None) -> None:
        payload = json.dumps({"error": code}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
