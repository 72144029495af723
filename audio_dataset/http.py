"""The HTTP layer every web source shares: retries, rate limits, timeouts, size caps, content checks.

One `HttpClient` is used from many threads at once (the core fetches `Source.fetch_concurrency`
items in parallel per worker): each thread gets its own `requests.Session`, and the per-host
token buckets and the site-down counter are shared behind locks. The client pickles (config only),
so a `Source` holding one can be shipped to Ray workers; each process then rate-limits on its own.

Outcomes:
- `ItemError(reason)` for one item: `http_404`, `http_4xx`, `http_429`, `http_5xx`, `timeout`,
  `connection_error`, `stalled`, `truncated_body`, `too_slow` (past `download_timeout` at under
  `min_download_rate` on average, however steadily it trickled; not retried), `too_large`,
  `not_audio_content`, `not_archive_content`, `bad_json` (after retries where retrying can help);
  `opted_out` for a media fetch (`get_bytes`, `download`) the site refuses when the config honours
  opt-outs: robots.txt and tdmrep.json of its origin and of each origin it is redirected to,
  before that hop is requested (read once per worker process, cached per origin), and the final
  response's X-Robots-Tag and tdm-reservation headers (audio_dataset.optout).
- `SourceError` for the whole source: credentials rejected (401/403 on a request made with
  `auth_env`), `max_consecutive_failures` requests in a row to one host that ended in connection
  errors/timeouts/5xx (the site is down), or a 429 whose Retry-After exceeds `max_retry_after`
  (a daily quota, not a burst: waiting inside the run would stall every worker, so the run stops
  and a rerun resumes later). A shorter Retry-After (on 429 or 503) is waited out, then retried.
`get_bytes` keeps the body in memory; `download` streams it to a file (temp + rename) for archives.
Tuning per run: `--source-option http_<field>=value` through `HttpConfig.from_options`.
URLs in messages lose their query string and user:password, and every message is scrubbed of the
request's and the run's secrets (`audio_dataset.redaction`), so tokens never reach logs or manifests.
"""
from __future__ import annotations

import email.utils
import json
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests
import urllib3

from audio_dataset.media import sniff_archive, sniff_audio
from audio_dataset.optout import (
    OPTED_OUT, POLICY_MAX_BYTES, PRODUCT, ROBOTS_PATH, TDMREP_PATH, Robots, TdmRep, tdm_header_refusal,
    user_agent, x_robots_refusal,
)
from audio_dataset.redaction import redact, request_secrets
from audio_dataset.source import ItemError, SourceConfig, SourceError, UserError
from audio_dataset.storage import open_temp, publish

DEFAULT_USER_AGENT = user_agent()
_CHUNK = 64 * 1024
# Leading bytes kept for the magic-byte check (tar's "ustar" sits at offset 257).
_HEAD = 512
_RETRY_STATUSES = frozenset({408, 500, 502, 503, 504, 520, 521, 522, 523, 524})
# Content types that are never media, whatever the bytes look like.
_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/xhtml", "application/javascript",
               "application/problem+json")


@dataclass(frozen=True)
class HttpConfig:
    user_agent: str = DEFAULT_USER_AGENT
    connect_timeout: float = 10.0
    # Longest wait for the next body (or header) bytes; a quiet socket beyond it is `stalled`.
    stall_timeout: float = 30.0
    # A server trickling a byte a second never stalls, but must not hold a worker for ever: an
    # attempt running past `download_timeout` seconds (None: no limit) while averaging under
    # `min_download_rate` bytes/s is `too_slow`. A big archive arriving at a healthy rate goes on.
    download_timeout: float | None = 600.0
    min_download_rate: float = 64 * 1024
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
    # Check robots.txt, X-Robots-Tag and TDM-Rep on media fetches (audio_dataset.optout); set by the
    # build for an `open_web` source unless --ignore-opt-out, never by a source option.
    honour_opt_outs: bool = False

    @classmethod
    def for_source(cls, config: SourceConfig, **defaults: Any) -> "HttpConfig":
        """`from_options` with what the command line decides for every web request of the run: the
        User-Agent (`--contact`) and whether opt-outs are honoured."""
        return cls.from_options(config.options, user_agent=user_agent(config.contact),
                                honour_opt_outs=config.honour_opt_outs, **defaults)

    @classmethod
    def from_options(cls, options: dict[str, str], **defaults: Any) -> "HttpConfig":
        """`defaults` (a source's own) overridden by `--source-option http_<field>=value` pairs.

        Lets a user tune one run (`http_retries=10`, `http_max_bytes=...`) and lets tests shorten the
        clocks of a build whose source is shipped to Ray workers.
        """
        config = replace(cls(), **defaults)
        types = {f.name: f.type for f in fields(cls)}
        for key, raw in options.items():
            if not key.startswith(HTTP_OPTION_PREFIX):
                continue
            name = key[len(HTTP_OPTION_PREFIX):]
            if name not in types or name in _RUN_FIELDS:
                known = ", ".join(HTTP_OPTION_PREFIX + n for n in types if n not in _RUN_FIELDS)
                raise UserError(f"unknown HTTP option {key!r}; known: {known}")
            config = replace(config, **{name: _parse_number(key, raw, types[name])})
        return config


HTTP_OPTION_PREFIX = "http_"
# Fields the command line sets for the whole run, not `--source-option http_*`.
_RUN_FIELDS = frozenset({"user_agent", "honour_opt_outs"})


def _parse_number(key: str, raw: str, kind: Any) -> int | float | None:
    text = str(kind)
    if "None" in text and raw.strip().lower() in ("", "none", "0"):
        return None
    try:
        value: int | float = int(raw) if text.startswith("int") else float(raw)
    except ValueError:
        raise UserError(f"{key} must be a number, not {raw!r}") from None
    if value < 0:
        raise UserError(f"{key} must not be negative")
    return value


def public_url(url: str) -> str:
    """scheme://host/path: the query and any user:password (credentials) never leave the client."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


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
        self._down: dict[str, str] = {}  # host -> why it was declared down

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
        body, _ = self._get(url, params, headers, auth_env, _expect(expect), guarded=True)
        return body

    def download(self, url: str, dest: Path, headers: dict | None = None, expect: str = "any",
                 params: dict | None = None, auth_env: str | None = None) -> int:
        """Stream the body into `dest` for files too big for memory (whole archives); returns its size.

        Written to a temp file beside `dest`, fsynced and renamed: `dest` is complete or absent.
        """
        path, _ = self._get(url, params, headers, auth_env, _expect(expect), sink=lambda: _FileSink(Path(dest)),
                            guarded=True)
        return Path(path).stat().st_size

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
             expect: str, sink: Callable[[], "_Sink"] | None = None,
             guarded: bool = False) -> tuple[Any, requests.Response]:
        """`guarded`: a media fetch, checked against the site's opt-outs when the run honours them."""
        host = urlsplit(url).netloc.lower()
        if host in self._down:  # declared down: the other threads stop at once instead of retrying
            raise SourceError(self._down[host])
        guarded = guarded and self.config.honour_opt_outs
        if guarded:
            self._check_host_policy(url)
        last: _Retry | None = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                time.sleep(last.delay if last and last.delay is not None else self._backoff(attempt - 1))
            bucket = self._bucket(url)
            if bucket:
                bucket.acquire()
            try:
                result = self._attempt(url, params, headers, auth_env, expect, sink or _MemorySink, guarded)
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

    def _check_host_policy(self, url: str) -> None:
        """Refuse `url` (ItemError `opted_out`) when its origin's robots.txt or tdmrep.json does."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return
        origin = f"{parts.scheme}://{parts.netloc.rpartition('@')[2].lower()}"
        policy = _POLICIES.get(origin, self.config.user_agent, lambda: self._fetch_host_policy(origin))
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        refusal = policy.refusal(target)
        if refusal:
            raise ItemError(OPTED_OUT, f"{public_url(url)}: {refusal}")

    def _check_redirect(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        """requests' response hook, called on each response before a redirect is followed: the
        target (another host, or another path) is refused when its origin's robots.txt or
        tdmrep.json refuses it, before it is requested."""
        target = self._session().get_redirect_target(response) if response.is_redirect else None
        if not target:
            return
        try:
            self._check_host_policy(urljoin(response.url, target))
        except ItemError as exc:
            response.close()
            raise ItemError(exc.reason, f"{exc.detail} (redirected from {public_url(response.url)})") from None

    def _fetch_host_policy(self, origin: str) -> "_HostPolicy":
        """robots.txt and tdmrep.json of `origin`, through this client's retries and rate limits with a
        512 KiB cap. robots.txt: 4xx allows all; any other failure is a complete disallow (RFC 9309)."""
        client = HttpClient(replace(self.config, max_bytes=POLICY_MAX_BYTES, honour_opt_outs=False), self.host_rates)
        try:
            robots = Robots.parse(client.get_text(origin + ROBOTS_PATH))
        except ItemError as exc:
            if exc.reason in ("http_404", "http_4xx"):
                return _HostPolicy(Robots(), None, TdmRep())
            return _HostPolicy(None, f"robots.txt unreachable ({exc}), a complete disallow", TdmRep())
        try:
            tdm = TdmRep.parse(client.get_text(origin + TDMREP_PATH))
        except ItemError:  # none published, or unreadable: nothing declared (the header still counts)
            tdm = TdmRep()
        return _HostPolicy(robots, None, tdm)

    def _record(self, host: str, ok: bool) -> None:
        with self._lock:
            count = 0 if ok else self._consecutive.get(host, 0) + 1
            self._consecutive[host] = count
        if count >= self.config.max_consecutive_failures:
            message = (f"{host} looks down: {count} requests in a row failed "
                       f"(connection errors, timeouts or server errors) after retries")
            with self._lock:
                self._down.setdefault(host, message)
            raise SourceError(message)

    def _attempt(self, url: str, params: dict | None, headers: dict | None, auth_env: str | None,
                 expect: str, open_sink: Callable[[], "_Sink"], guarded: bool = False) -> tuple[Any, requests.Response]:
        where = public_url(url)
        secrets = request_secrets(url, headers, params)
        started = time.monotonic()
        # A media fetch redirected: each hop's target is asked of its own origin's opt-outs first.
        hooks = {"response": self._check_redirect} if guarded else None
        try:
            response = self._session().get(url, params=params, headers=headers, stream=True, hooks=hooks,
                                           timeout=(self.config.connect_timeout, self.config.stall_timeout))
        except requests.exceptions.ConnectTimeout:
            raise _Retry("timeout", f"connect to {where} timed out") from None
        except requests.exceptions.ReadTimeout:
            raise _Retry("timeout", f"{where} sent no response within {self.config.stall_timeout:g}s") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
            raise _Retry("connection_error", f"{where}: {_describe(exc, secrets)}") from None
        except requests.exceptions.RequestException as exc:  # invalid URL, too many redirects...
            raise ItemError("bad_request", f"{where}: {_describe(exc, secrets)}") from None
        with response:
            self._check_status(response, where, auth_env)
            if guarded:
                _check_response_opt_outs(response, where)
            sink = open_sink()
            try:
                head = self._read_body(response, where, sink, started)
                if expect != "any":
                    _check_content(head, response.headers.get("Content-Type", ""), expect, where, secrets)
                return sink.finish(), response
            except BaseException:
                sink.discard()
                raise

    def _check_status(self, response: requests.Response, where: str, auth_env: str | None) -> None:
        status = response.status_code
        if status < 300:
            return
        line = f"HTTP {status} from {where}"
        if status in (401, 403) and auth_env and not response.history:
            raise SourceError(f"{urlsplit(where).netloc} rejected the credentials (HTTP {status}); "
                              f"check ${auth_env}")
        if status == 429:
            wait = parse_retry_after(response.headers.get("Retry-After"))
            if wait is not None and wait > self.config.max_retry_after:
                raise SourceError(f"{urlsplit(where).netloc} rate limit: asked to wait {wait:.0f}s "
                                  f"(over max_retry_after={self.config.max_retry_after:g}s); rerun later to resume")
            raise _Retry("http_429", line, delay=wait)
        if status in _RETRY_STATUSES:
            # A 503 may say when to come back; a wait beyond max_retry_after falls back to backoff.
            wait = parse_retry_after(response.headers.get("Retry-After"))
            delay = wait if wait is not None and wait <= self.config.max_retry_after else None
            raise _Retry("http_5xx" if status >= 500 else "timeout", line, delay=delay)
        if status in (404, 410):
            raise ItemError("http_404", line)
        if status in (401, 403) and response.history:
            # The API took the credentials and redirected; the target (a file host, which is not
            # sent them) refuses this one item: `http_4xx`, not the whole source's credentials.
            raise ItemError("http_4xx", f"HTTP {status} from {public_url(response.url)}, redirected from {where}")
        if status >= 500:
            raise ItemError("http_5xx", line)
        raise ItemError("http_4xx", line)

    def _read_body(self, response: requests.Response, where: str, sink: "_Sink", started: float) -> bytes:
        """Copy the body into `sink` within the size and time limits; returns its first bytes for sniffing."""
        limit = self.config.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ItemError("too_large", f"{where} declares {int(declared)} bytes (limit {limit})")
        deadline = None if self.config.download_timeout is None else started + self.config.download_timeout
        head = b""
        size = 0
        try:
            for chunk in _arriving(response):
                size += len(chunk)
                if size > limit:
                    raise ItemError("too_large", f"{where} sent over {limit} bytes")
                if deadline is not None and time.monotonic() > deadline:
                    self._check_rate(where, size, declared, started)
                if len(head) < _HEAD:
                    head += chunk[:_HEAD - len(head)]
                sink.write(chunk)
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
        return head

    def _check_rate(self, where: str, size: int, declared: str | None, started: float) -> None:
        elapsed = time.monotonic() - started
        if size / elapsed < self.config.min_download_rate:
            raise ItemError("too_slow", f"{where}: {size} of {declared or 'unknown'} bytes in {elapsed:.0f}s, "
                                        f"under {self.config.min_download_rate:g} bytes/s past "
                                        f"download_timeout {self.config.download_timeout:g}s")


def _check_response_opt_outs(response: requests.Response, where: str) -> None:
    """X-Robots-Tag (each header line apart: a line's bot scope is its own) and the TDM-Rep header."""
    lines = response.raw.headers.getlist("X-Robots-Tag") if response.raw is not None else []
    refusal = x_robots_refusal(lines, PRODUCT) or tdm_header_refusal(response.headers.get("tdm-reservation"))
    if refusal:
        raise ItemError(OPTED_OUT, f"{where}: {refusal}")


@dataclass(frozen=True)
class _HostPolicy:
    robots: Robots | None  # None: robots.txt could not be read, `failure` says why
    failure: str | None
    tdm: TdmRep

    def refusal(self, target: str) -> str | None:
        if self.robots is None:
            return self.failure
        return self.robots.refusal(PRODUCT, target) or self.tdm.refusal(target)


class _PolicyCache:
    """Each origin's policy, fetched once per worker process (one fetch while other threads wait),
    kept for a day (RFC 9309's longest cache), the least recently used dropped past `size` origins.
    An unreachable robots.txt is asked again after ten minutes: a passing outage refuses only the
    items fetched meanwhile, not the rest of the run."""

    TTL = 24 * 3600.0
    FAILURE_TTL = 600.0

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[str, str], tuple[float, _HostPolicy]] = OrderedDict()
        self._fetching: dict[tuple[str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, origin: str, agent: str, fetch: Callable[[], _HostPolicy]) -> _HostPolicy:
        key = (origin, agent)
        with self._lock:
            gate = self._fetching.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                found = self._entries.get(key)
                ttl = self.TTL if found and found[1].robots is not None else self.FAILURE_TTL
                if found and time.monotonic() - found[0] < ttl:
                    self._entries.move_to_end(key)
                    return found[1]
            policy = fetch()
            with self._lock:
                self._entries[key] = (time.monotonic(), policy)
                self._entries.move_to_end(key)
                while len(self._entries) > self.size:
                    old, _ = self._entries.popitem(last=False)
                    self._fetching.pop(old, None)
            return policy


_POLICIES = _PolicyCache()


def _arriving(response: requests.Response) -> Iterator[bytes]:
    """The body as the socket delivers it (up to _CHUNK at a time), not in whole 64 KiB reads.

    A full-size read blocks until 64 KiB arrive, so a trickle would never reach the deadline check
    and a cut would lose the count of what came. Errors are mapped as `iter_content` maps them.
    """
    try:
        while chunk := response.raw.read1(_CHUNK, decode_content=True):
            yield chunk
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from None
    except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.SSLError) as exc:
        raise requests.exceptions.ConnectionError(exc) from None
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from None


class _Sink(Protocol):
    def write(self, chunk: bytes) -> None: ...
    def finish(self) -> Any: ...
    def discard(self) -> None: ...


class _MemorySink:
    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, chunk: bytes) -> None:
        self._chunks.append(chunk)

    def finish(self) -> bytes:
        return b"".join(self._chunks)

    def discard(self) -> None:
        self._chunks.clear()


class _FileSink:
    def __init__(self, dest: Path) -> None:
        self.dest = dest
        # An unguessable temp name per sink: two workers fetching one URL never share a temp file.
        self.temp, self._handle = open_temp(dest)

    def write(self, chunk: bytes) -> None:
        self._handle.write(chunk)

    def finish(self) -> Path:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        publish(self.temp, self.dest)
        return self.dest

    def discard(self) -> None:
        self._handle.close()
        self.temp.unlink(missing_ok=True)


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


def _describe(exc: BaseException, secrets: list[str] | None = None) -> str:
    # urllib3 messages embed the request path with its query; keep the type and a masked message.
    return redact(f"{type(exc).__name__}: {exc}", secrets or ())[:300]


def _expect(expect: str) -> str:
    if expect not in ("audio", "archive", "any"):
        raise ValueError(f"expect must be audio, archive or any, not {expect!r}")
    return expect


def _check_content(body: bytes, content_type: str, expect: str, where: str,
                   secrets: list[str] | None = None) -> None:
    kind = content_type.split(";")[0].strip().lower()
    if expect == "audio":
        if any(kind.startswith(t) for t in _TEXT_TYPES) or sniff_audio(body) is None:
            raise ItemError("not_audio_content", f"{where} returned {kind or 'no content type'} starting "
                                                 f"{_quote(body, secrets)}, not audio")
    elif expect == "archive":
        if any(kind.startswith(t) for t in _TEXT_TYPES) or sniff_archive(body) is None:
            raise ItemError("not_archive_content", f"{where} returned {kind or 'no content type'} starting "
                                                   f"{_quote(body, secrets)}, not an archive")


def _quote(body: bytes, secrets: list[str] | None) -> str:
    """The body's first bytes for a message, without what the request or the run holds as secrets
    (a server may echo a token back: the quote is cut, so a secret's first bytes at its end go too)."""
    head = body[:16].decode("latin-1")
    return repr(redact(head, secrets or ()).encode("latin-1"))
