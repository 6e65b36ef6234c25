"""A local HTTP server that serves files the way the Hugging Face Hub's resolve endpoint does
(HEAD and GET on /{repo}/resolve/{revision}/{filename} with X-Repo-Commit and ETag, and the
file listing GET /api/models/{repo}/tree/{revision}), so the
`huggingface_hub` download path runs without network (HF_ENDPOINT points here)."""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import threading
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repo: str, files: dict[str, Path]):
        self.repo, self.files, self.requests = repo, files, []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path))
                m = re.fullmatch(r"/(?:api/models/)?(.+?)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not m or m.group(1) != hub.repo or m.group(3) not in hub.files:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = hub.files[m.group(3)].read_bytes()
                etag = hashlib.sha256(data).hexdigest()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Linked-ETag", f'"{etag}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):
                self._serve(False)

            def do_GET(self):
                m = re.fullmatch(r"/api/models/(.+?)/tree/([^/?]+)", self.path.split("?")[0])
                if m and m.group(1) == hub.repo:  # the listing list_repo_files reads
                    hub.requests.append((self.command, self.path.split("?")[0]))
                    body = json.dumps([{"type": "file", "path": n, "size": p.stat().st_size,
                                        "oid": hashlib.sha1(p.read_bytes()).hexdigest()}
                                       for n, p in hub.files.items()]).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._serve(True)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
