"""The HTTP layer every web source shares: retries, rate limits, timeouts, size caps, content checks.

One `HttpClient` is used from many threads at once (the core fetches `Source.fetch_concurrency`
items in parallel per worker): each thread gets its own `requests.Session`, and the per-host
token buckets and the site-down counter are shared behind locks. The client pickles (config only),
so a `Source` holding one can be shipped to Ray workers; each process then rate-limits on its own.

Outcomes:
- `ItemError(reason)` for one item: `http_404`, `http_4xx`, `http_429`, `http_5xx`, `timeout`,
  `connection_error`, `stalled`, `truncated_body`, `too_large`, `not_audio_content`,
  `not_archive_content`, `bad_json` (after retries where retrying can help).
- `SourceError` for the whole source: credentials rejected (401/403 on a request made with
  `auth_env`), `max_consecutive_failures` requests in a row to one host that ended in connection
  errors/timeouts/5xx (the site is down), or a 429 whose Retry-After exceeds `max_retry_after`
  (a daily quota, not a burst: waiting inside the run would stall every worker, so the run stops
  and a rerun resumes later).
URLs in messages lose their query string and credential-looking values are masked, so tokens
never reach logs or manifests.
"""
from __future__ import annotations

import email.utils
import json
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3

from audio_dataset.source import ItemError, SourceError

try:
    from importlib.metadata import version as _dist_version

    __version__ = _dist_version("audiodata")
except Exception:  # running from a checkout that is not installed
    __version__ = "0.1.0"

DEFAULT_USER_AGENT = f"audiodata/{__version__} (LAION-Audio-630K-style audio-text dataset builder)"
_CHUNK = 64 * 1024
_RETRY_STATUSES = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524})
# Content types that are never media, whatever the bytes look like.
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript",
               "application/problem+json")
_SECRET_RE = re.compile(r"(?i)((?:token|key|api_key|apikey|access_token|client_secret|secret|password|sig|signature)"
                        r"=)[^&\s'\"]+|(bearer\s+)[A-Za-z0-9._~+/=-]+")


@dataclass(frozen=True)
class HttpConfig:
    user_agent: str = DEFAULT_USER_AGENT
    connect_timeout: float = 10.0
    # Longest wait for the next body (or header) bytes; a quiet socket beyond it is `stalled`.
    stall_timeout: float = 30.0
    max_bytes: int = 512 * 2**20
    retries: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    # A 429 asking for a longer wait is a quota, not a burst: SourceError (see module doc).
    max_retry_after: float = 120.0
    # Default per-host rate limit in requests per second (None: unlimited); `host_rates` overrides.
    requests_per_second: float | None = None
    # Token-bucket capacity: how many requests may go back to back after an idle spell.
    burst: float = 1.0
    # Requests in a row to one host that ended in connection errors/timeouts/5xx: the site is down.
    max_consecutive_failures: int = 20
    # Connections kept per host per thread-local session.
    pool_size: int = 4


def redact(text: str) -> str:
    """Mask credential-looking query values and bearer tokens in free text."""
    return _SECRET_RE.sub(lambda m: (m.group(1) or m.group(2)) + "***", text)


def public_url(url: str) -> str:
    """scheme://host/path: the query (which may carry a token) never leaves the client."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


AUDIO_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"fLaC", "flac"),
    (0, b"OggS", "ogg"),
    (0, b"ID3", "mp3"),
    (0, b"\x1a\x45\xdf\xa3", "webm/matroska"),
    (4, b"ftyp", "mp4"),
    (0, b"#!AMR", "amr"),
    (0, b".snd", "au"),
    (0, b"wvpk", "wavpack"),
    (0, b"MAC ", "ape"),
    (0, b"caff", "caf"),
    (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "asf/wma"),
)
ARCHIVE_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"PK\x03\x04", "zip"),
    (0, b"PK\x05\x06", "zip"),
    (0, b"\x1f\x8b", "gzip"),
    (0, b"7z\xbc\xaf\x27\x1c", "7z"),
    (0, b"Rar!\x1a\x07", "rar"),
    (0, b"BZh", "bzip2"),
    (0, b"\xfd7zXZ\x00", "xz"),
    (0, b"\x28\xb5\x2f\xfd", "zstd"),
    (257, b"ustar", "tar"),
)


def _match(data: bytes, signatures: tuple[tuple[int, bytes, str], ...]) -> str | None:
    for offset, magic, name in signatures:
        if data[offset:offset + len(magic)] == magic:
            return name
    return None


def sniff_audio(data: bytes) -> str | None:
    """The container/codec the leading bytes announce, or None when they are not audio."""
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] in (b"WAVE", b"AVI "):
        return "wav" if data[8:12] == b"WAVE" else None
    if data[:4] == b"FORM" and data[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    found = _match(data, AUDIO_SIGNATURES)
    if found:
        return found
    # MPEG audio / ADTS AAC frame sync: 11 set bits, and a layer/version that is not "reserved".
    if len(data) >= 2 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0 and (data[1] & 0x18) != 0x08:
        return "mpeg"
    return None


def sniff_archive(data: bytes) -> str | None:
    return _match(data, ARCHIVE_SIGNATURES)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds (fractions tolerated) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


class TokenBucket:
    """Thread-safe token bucket; a caller that finds it empty reserves a token and sleeps its turn."""

    def __init__(self, rate: float, capacity: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._tokens = self.capacity
        self._clock = clock
        self._sleep = sleep
        self._last = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping as long as needed; returns the seconds slept."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, detail: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.delay = delay  # server-requested wait (Retry-After), else backoff applies


# Final reasons that say something about the host rather than the item.
_HOST_FAILURES = frozenset({"connection_error", "timeout", "http_5xx"})


class HttpClient:
    def __init__(self, config: HttpConfig = HttpConfig(), host_rates: dict[str, float] | None = None) -> None:
        self.config = config
        self.host_rates = dict(host_rates or {})
        self._init_runtime()

    # Locks, sessions and buckets do not pickle; a copy in another process builds its own.
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "host_rates": self.host_rates}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config = state["config"]
        self.host_rates = state["host_rates"]
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket | None] = {}
        self._consecutive: dict[str, int] = {}

    # -- public API -------------------------------------------------------------------------

    def get_json(self, url: str, params: dict | None = None, headers: dict | None = None,
                 auth_env: str | None = None) -> Any:
        body, _ = self._get(url, params, headers, auth_env, expect="any")
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ItemError("bad_json", f"{public_url(url)}: {type(exc).__name__}: {exc}") from None

    def get_text(self, url: str, params: dict | None = None, headers: dict | None = None,
                 auth_env: str | None = None) -> str:
        body, response = self._get(url, params, headers, auth_env, expect="any")
        # An explicit charset wins; otherwise UTF-8 (requests' ISO-8859-1 default for text/* is wrong today).
        charset = requests.utils.get_encoding_from_headers(response.headers) if "charset" in \
            response.headers.get("Content-Type", "").lower() else None
        return body.decode(charset or "utf-8-sig", errors="replace")

    def get_bytes(self, url: str, headers: dict | None = None, expect: str = "audio",
                  params: dict | None = None, auth_env: str | None = None) -> bytes:
        """The body of a media download; `expect` is "audio", "archive" or "any"."""
        if expect not in ("audio", "archive", "any"):
            raise ValueError(f"expect must be audio, archive or any, not {expect!r}")
        body, _ = self._get(url, params, headers, auth_env, expect=expect)
        return body

    # -- internals --------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = requests.adapters.HTTPAdapter(pool_connections=self.config.pool_size,
                                                    pool_maxsize=self.config.pool_size, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = self.config.user_agent
            self._local.session = session
        return session

    def _bucket(self, url: str) -> TokenBucket | None:
        parts = urlsplit(url)
        host = parts.netloc.lower()
        with self._lock:
            if host not in self._buckets:
                rate = self.host_rates.get(host, self.host_rates.get(parts.hostname or "",
                                                                     self.config.requests_per_second))
                self._buckets[host] = TokenBucket(rate, self.config.burst) if rate else None
            return self._buckets[host]

    def _backoff(self, attempt: int) -> float:
        # Full jitter (AWS architecture blog): uniform over [0, min(cap, base * 2^attempt)].
        return random.uniform(0.0, min(self.config.backoff_cap, self.config.backoff_base * 2 ** attempt))

    def _get(self, url: str, params: dict | None, headers: dict | None, auth_env: str | None,
             expect: str) -> tuple[bytes, requests.Response]:
        host = urlsplit(url).netloc.lower()
        last: _Retry | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(last.delay if last and last.delay is not None else self._backoff(attempt - 1))
            bucket = self._bucket(url)
            if bucket:
                bucket.acquire()
            try:
                result = self._attempt(url, params, headers, auth_env, expect)
            except _Retry as retry:
                last = retry
                continue
            except ItemError:
                self._record(host, ok=True)  # the host answered: it is up
                raise
            self._record(host, ok=True)
            return result
        assert last is not None
        self._record(host, ok=last.reason not in _HOST_FAILURES)
        raise ItemError(last.reason, f"{last.detail} (after {self.config.retries + 1} attempts)")

    def _record(self, host: str, ok: bool) -> None:
        with self._lock:
            count = 0 if ok else self._consecutive.get(host, 0) + 1
            self._consecutive[host] = count
        if count >= self.config.max_consecutive_failures:
            raise SourceError(f"{host} looks down: {count} requests in a row failed "
                              f"(connection errors, timeouts or server errors) after retries")

    def _attempt(self, url: str, params: dict | None, headers: dict | None, auth_env: str | None,
                 expect: str) -> tuple[bytes, requests.Response]:
        where = public_url(url)
        try:
            response = self._session().get(url, params=params, headers=headers, stream=True,
                                           timeout=(self.config.connect_timeout, self.config.stall_timeout))
        except requests.exceptions.ConnectTimeout:
            raise _Retry("timeout", f"connect to {where} timed out") from None
        except requests.exceptions.ReadTimeout:
            raise _Retry("timeout", f"{where} sent no response within {self.config.stall_timeout:g}s") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retry("connection_error", f"{where}: {_describe(exc)}") from None
        except requests.exceptions.RequestException as exc:  # invalid URL, too many redirects...
            raise ItemError("bad_request", f"{where}: {_describe(exc)}") from None
        with response:
            self._check_status(response, where, auth_env)
            body = self._read_body(response, where)
        if expect != "any":
            _check_content(body, response.headers.get("Content-Type", ""), expect, where)
        return body, response

    def _check_status(self, response: requests.Response, where: str, auth_env: str | None) -> None:
        status = response.status_code
        if status < 300:
            return
        line = f"HTTP {status} from {where}"
        if status in (401, 403) and auth_env:
            raise SourceError(f"{urlsplit(where).netloc} rejected the credentials (HTTP {status}); "
                              f"check ${auth_env}")
        if status == 429:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None and wait > self.config.max_retry_after:
                raise SourceError(f"{urlsplit(where).netloc} rate limit: asked to wait {wait:.0f}s "
                                  f"(over max_retry_after={self.config.max_retry_after:g}s); rerun later to resume")
            raise _Retry("http_429", line, delay=wait)
        if status in _RETRY_STATUSES:
            raise _Retry("http_5xx" if status >= 500 else "timeout", line)
        if status in (404, 410):
            raise ItemError("http_404", line)
        if status >= 500:
            raise ItemError("http_5xx", line)
        raise ItemError("http_4xx", line)

    def _read_body(self, response: requests.Response, where: str) -> bytes:
        limit = self.config.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ItemError("too_large", f"{where} declares {int(declared)} bytes (limit {limit})")
        chunks: list[bytes] = []
        size = 0
        try:
            for chunk in response.iter_content(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ItemError("too_large", f"{where} sent over {limit} bytes")
                chunks.append(chunk)
        except requests.exceptions.ConnectionError as exc:
            if _is_timeout(exc):
                raise _Retry("stalled", f"{where}: no body bytes for {self.config.stall_timeout:g}s "
                                        f"after {size} bytes") from None
            raise _Retry("connection_error", f"{where}: {_describe(exc)}") from None
        except requests.exceptions.ChunkedEncodingError as exc:
            raise _Retry("truncated_body", f"{where}: body ended after {size} of "
                                           f"{declared or 'unknown'} bytes ({_describe(exc)})") from None
        if declared and declared.isdigit() and "Content-Encoding" not in response.headers and size < int(declared):
            raise _Retry("truncated_body", f"{where}: body ended after {size} of {declared} bytes")
        return b"".join(chunks)


def _is_timeout(exc: BaseException) -> bool:
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        if isinstance(node, (TimeoutError, urllib3.exceptions.ReadTimeoutError, requests.exceptions.Timeout)):
            return True
        if node.args and isinstance(node.args[0], BaseException):
            node = node.args[0]
        else:
            node = node.__cause__ or node.__context__
    return False


def _describe(exc: BaseException) -> str:
    # urllib3 messages embed the request path with its query; keep the type and a masked message.
    return redact(f"{type(exc).__name__}: {exc}")[:300]


def _check_content(body: bytes, content_type: str, expect: str, where: str) -> None:
    kind = content_type.split(";")[0].strip().lower()
    head = body[:16]
    if expect == "audio":
        if any(kind.startswith(t) for t in _TEXT_TYPES) or sniff_audio(body) is None:
            raise ItemError("not_audio_content",
                            f"{where} returned {kind or 'no content type'} starting {head!r}, not audio")
    elif expect == "archive":
        if any(kind.startswith(t) for t in _TEXT_TYPES) or sniff_archive(body) is None:
            raise ItemError("not_archive_content",
                            f"{where} returned {kind or 'no content type'} starting {head!r}, not an archive")
