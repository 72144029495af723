"""A loopback HTTP server for tests and benchmarks: routes from fixtures, injected faults, a request log.

    with LoopbackServer() as server:
        server.add("/media/a.ogg", ogg_bytes, "audio/ogg")
        server.add_handler("/api/list/", lambda req: Response.json({...}))
        server.fault("/media/a.ogg", "500", times=2)          # two 500s, then the real file
        client.get_bytes(server.url + "/media/a.ogg")
        assert len(server.requests_to("/media/a.ogg")) == 3

GET, HEAD and POST are served alike; a POST's body is in the logged `Request.body`.

Fault kinds (each served `times` times, None = always, before the route answers normally):
`404`, `403`, `401`, `500`, `503`, `429` (with `retry_after`), `stall` (headers and part of the
body, then silence for `seconds`), `truncate` (Content-Length larger than what is sent, then the
connection closes), `html` (a 200 HTML error page), `oversize` (`size` bytes of WAV-looking data,
`declare_length=False` streams it without Content-Length), `malformed` (a 200 whose JSON body is
cut off), `reset` (the connection closes before any response), `trickle` (`size` bytes of WAV-looking
data, one byte every `interval` seconds: never quiet long enough to stall).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

HTML_ERROR_PAGE = (b"<!DOCTYPE html><html><head><title>Oops</title></head>"
                   b"<body><h1>Something went wrong</h1></body></html>")


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    time: float
    body: bytes = b""  # a POST's body

    def header(self, name: str) -> str | None:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, data: Any, status: int = 200) -> "Response":
        return cls(status, json.dumps(data).encode("utf-8"), "application/json")

    @classmethod
    def text(cls, text: str, content_type: str = "text/plain; charset=utf-8", status: int = 200) -> "Response":
        return cls(status, text.encode("utf-8"), content_type)


Handler = Callable[[Request], Response]


@dataclass
class Fault:
    kind: str
    times: int | None = 1
    retry_after: str | None = None
    seconds: float = 5.0
    size: int = 0
    declare_length: bool = True
    interval: float = 1.0


FAULT_KINDS = frozenset({"404", "401", "403", "500", "503", "429", "stall", "truncate", "html",
                         "oversize", "malformed", "reset", "trickle"})


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like real servers
    # Headers and body go out in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms a request). Real servers set TCP_NODELAY too.
    disable_nagle_algorithm = True
    server: "_Server"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self.server.owner._handle(self)

    def do_HEAD(self) -> None:  # noqa: N802 (the same answer without a body, as clients probing a URL expect)
        self.server.owner._handle(self)

    def do_POST(self) -> None:  # noqa: N802 (an API that takes a JSON body, e.g. chat completions)
        self.server.owner._handle(self)

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stalled handler must not hold up close()
    owner: "LoopbackServer"


class LoopbackServer:
    """ThreadingHTTPServer on 127.0.0.1, an ephemeral port, in a background thread."""

    def __init__(self, latency: float = 0.0) -> None:
        # Seconds added before every response (the download benchmark's simulated network).
        self.latency = latency
        self._routes: dict[str, Handler] = {}
        self._faults: dict[str, list[Fault]] = {}
        self._log: list[Request] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> "LoopbackServer":
        self._server = _Server(("127.0.0.1", 0), _RequestHandler)
        self._server.owner = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="loopback-http")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- configuration --------------------------------------------------------------------------

    def add(self, path: str, body: bytes, content_type: str = "application/octet-stream",
            status: int = 200, headers: dict[str, str] | None = None) -> str:
        """Serve fixed bytes at `path`; returns the full URL."""
        response = Response(status, body, content_type, dict(headers or {}))
        return self.add_handler(path, lambda _request: response)

    def add_handler(self, path: str, handler: Handler) -> str:
        with self._lock:
            self._routes[path] = handler
        return self.url + path

    def fault(self, path: str, kind: str, times: int | None = 1, **options: Any) -> None:
        """Queue a fault on `path`; several queue in order."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}")
        with self._lock:
            self._faults.setdefault(path, []).append(Fault(kind, times, **options))

    def clear_faults(self, path: str | None = None) -> None:
        with self._lock:
            if path is None:
                self._faults.clear()
            else:
                self._faults.pop(path, None)

    # -- request log ----------------------------------------------------------------------------

    @property
    def log(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.log if r.path == path]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- serving --------------------------------------------------------------------------------

    def _handle(self, handler: _RequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length > 0 else b""
        request = Request(handler.command, parts.path, query, dict(handler.headers.items()), time.monotonic(), body)
        with self._lock:
            self._log.append(request)
            fault = self._take_fault(parts.path)
            route = self._routes.get(parts.path)
        if self.latency:
            time.sleep(self.latency)
        if fault is not None:
            self._serve_fault(handler, fault)
            return
        if route is None:
            self._send(handler, Response(404, HTML_ERROR_PAGE, "text/html"))
            return
        try:
            response = route(request)
        except Exception as exc:  # a broken test handler shows up as a 500 with its message
            response = Response(500, f"handler error: {exc!r}".encode(), "text/plain")
        self._send(handler, response)

    def _take_fault(self, path: str) -> Fault | None:
        queue = self._faults.get(path)
        if not queue:
            return None
        fault = queue[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
        return fault

    def _send(self, handler: _RequestHandler, response: Response, declared_length: int | None = None,
              body: bytes | None = None) -> None:
        payload = response.body if body is None else body
        handler.send_response(response.status)
        handler.send_header("Content-Type", response.content_type)
        handler.send_header("Content-Length", str(len(payload) if declared_length is None else declared_length))
        for key, value in response.headers.items():
            handler.send_header(key, value)
        handler.end_headers()
        if handler.command == "HEAD":
            return
        try:
            handler.wfile.write(payload)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            handler.close_connection = True

    def _serve_fault(self, handler: _RequestHandler, fault: Fault) -> None:
        kind = fault.kind
        if kind in ("404", "401", "403", "500", "503"):
            self._send(handler, Response(int(kind), HTML_ERROR_PAGE, "text/html"))
        elif kind == "429":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._send(handler, Response(429, b'{"detail": "Request was throttled."}', "application/json", headers))
        elif kind == "html":
            self._send(handler, Response(200, HTML_ERROR_PAGE, "text/html; charset=utf-8"))
        elif kind == "malformed":
            self._send(handler, Response(200, b'{"count": 3, "next": null, "results": [{"id": 1, "na',
                                         "application/json"))
        elif kind == "reset":
            handler.close_connection = True
            handler.connection.close()
        elif kind == "truncate":
            handler.close_connection = True
            self._send(handler, Response(200, b"", "audio/wav", {"Connection": "close"}),
                       declared_length=4096, body=_wav_like(1024))
        elif kind == "stall":
            handler.close_connection = True
            self._send(handler, Response(200, b"", "audio/wav", {"Connection": "close"}),
                       declared_length=4096, body=_wav_like(1024))
            self._stopping.wait(fault.seconds)
        elif kind == "oversize":
            self._serve_oversize(handler, fault)
        elif kind == "trickle":
            self._serve_trickle(handler, fault)

    def _serve_trickle(self, handler: _RequestHandler, fault: Fault) -> None:
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Content-Length", str(fault.size))
        handler.end_headers()
        try:
            for byte in _wav_like(fault.size):
                if self._stopping.wait(fault.interval):
                    return
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _serve_oversize(self, handler: _RequestHandler, fault: Fault) -> None:
        handler.close_connection = True
        handler.send_response(200)
        handler.send_header("Content-Type", "audio/wav")
        handler.send_header("Connection", "close")
        if fault.declare_length:
            handler.send_header("Content-Length", str(fault.size))
        handler.end_headers()
        sent = 0
        chunk = _wav_like(64 * 1024)
        try:
            while sent < fault.size and not self._stopping.is_set():
                part = chunk[: min(len(chunk), fault.size - sent)]
                handler.wfile.write(part)
                sent += len(part)
        except (BrokenPipeError, ConnectionResetError):
            pass


def _wav_like(size: int) -> bytes:
    """Bytes that pass a magic-byte check (a RIFF/WAVE header), padded with silence."""
    header = b"RIFF" + (size - 8).to_bytes(4, "little") + b"WAVE"
    return (header + bytes(max(0, size - len(header))))[:size]
