"""Local servers for the fetch tests: an http mirror with fault injection, and the GCS emulator.

Everything binds 127.0.0.1 and is stopped when its context manager exits.
"""
from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class MirrorServer:
    """Serves `files` (url path -> bytes) with HEAD, ETag and single byte ranges.

    Faults, per url path: `cut_gets[path]` = which GETs of that path (1-based) stop
    half-way through the body and close the connection; `stall_gets[path]` = which GETs
    wait `stall_seconds` before the body; `corrupt` = paths served with one byte
    flipped; `status[path]` = an error status served instead.
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.cut_gets: dict[str, set[int]] = {}
        self.stall_gets: dict[str, set[int]] = {}
        self.stall_seconds = 1.0
        self.corrupt: set[str] = set()
        self.status: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def ranges(self, path: str) -> list[str | None]:
        return [r for m, p, r in self.requests if m == "GET" and p == path]

    def record(self, method: str, path: str, range_header: str | None) -> int:
        with self._lock:
            self.requests.append((method, path, range_header))
            return Counter(m for m, p, _ in self.requests if p == path)[method]

    def body(self, path: str) -> bytes:
        data = self.files[path]
        if path in self.corrupt:
            data = data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]
        return data

    def __enter__(self) -> "MirrorServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_for(server: MirrorServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_HEAD(self) -> None:
            server.record("HEAD", self.path, None)
            if self._refuse():
                return
            self._send_headers(200, len(server.body(self.path)))

        def do_GET(self) -> None:
            ordinal = server.record("GET", self.path, self.headers.get("Range"))
            if self._refuse():
                return
            data = server.body(self.path)
            start, end = _parse_range(self.headers.get("Range"), len(data))
            body = data[start:end]
            if start or end != len(data):
                self._send_headers(206, len(body), f"bytes {start}-{end - 1}/{len(data)}")
            else:
                self._send_headers(200, len(body))
            try:
                if ordinal in server.stall_gets.get(self.path, set()):
                    time.sleep(server.stall_seconds)
                if ordinal in server.cut_gets.get(self.path, set()):
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up first
                self.close_connection = True

        def _refuse(self) -> bool:
            code = server.status.get(self.path) or (404 if self.path not in server.files else None)
            if code is None:
                return False
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return True

        def _send_headers(self, code: int, length: int, content_range: str | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"etag-{len(server.files[self.path])}"')
            if content_range:
                self.send_header("Content-Range", content_range)
            self.end_headers()

    return Handler


def _parse_range(header: str | None, size: int) -> tuple[int, int]:
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", header or "")
    if not match:
        return 0, size
    start = int(match.group(1))
    end = int(match.group(2)) + 1 if match.group(2) else size
    return min(start, size), min(end, size)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    """A gcp-storage-emulator on 127.0.0.1, in memory; yields its http://host:port."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    # start() waits forever when the server thread fails to bind, so bound the wait
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(timeout=10)
    if starter.is_alive():
        raise RuntimeError(f"emulator did not start on 127.0.0.1:{port} within 10 s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
