"""The shared HTTP layer against the loopback server: every fault ends in its named outcome."""
from __future__ import annotations

import pickle
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from audio_dataset.http import (HttpClient, TokenBucket, parse_retry_after, public_url, redact,
                                sniff_archive, sniff_audio)
from audio_dataset.source import ItemError, SourceError
from loopback import Response

CLIP = "pibble"


def _item_error(call) -> ItemError:
    with pytest.raises(ItemError) as info:
        call()
    return info.value


def test_audio_download_ok_sends_user_agent(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    client = HttpClient(fast_http_config)
    assert client.get_bytes(url) == real_clips[CLIP]
    assert loopback.requests_to("/a.ogg")[0].header("User-Agent").startswith("audiodata/")


def test_404_is_not_retried(loopback, fast_http_config):
    error = _item_error(lambda: HttpClient(fast_http_config).get_bytes(loopback.url + "/missing.ogg"))
    assert error.reason == "http_404"
    assert len(loopback.requests_to("/missing.ogg")) == 1


def test_500s_then_success_retries(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.fault("/a.ogg", "500", times=2)
    assert HttpClient(fast_http_config).get_bytes(url) == real_clips[CLIP]
    assert len(loopback.requests_to("/a.ogg")) == 3


def test_persistent_500_fails_after_all_attempts(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.fault("/a.ogg", "503", times=None)
    error = _item_error(lambda: HttpClient(fast_http_config).get_bytes(url))
    assert error.reason == "http_5xx"
    assert len(loopback.requests_to("/a.ogg")) == fast_http_config.retries + 1


def test_429_honours_retry_after(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.fault("/a.ogg", "429", times=1, retry_after="0.4")
    assert HttpClient(fast_http_config).get_bytes(url) == real_clips[CLIP]
    first, second = loopback.requests_to("/a.ogg")
    # Backoff alone would wait at most backoff_cap (0.05 s): the gap is the server's Retry-After.
    assert second.time - first.time >= 0.35


def test_503_retry_after_is_honoured(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.add_handler("/busy.ogg", lambda req: Response(503, b"maintenance", "text/plain", {"Retry-After": "0.3"}))
    client = HttpClient(replace(fast_http_config, retries=1))
    assert _item_error(lambda: client.get_bytes(loopback.url + "/busy.ogg")).reason == "http_5xx"
    first, second = loopback.requests_to("/busy.ogg")
    assert second.time - first.time >= 0.25
    assert client.get_bytes(url) == real_clips[CLIP]


def test_429_beyond_max_retry_after_stops_the_source(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.fault("/a.ogg", "429", times=1, retry_after="86400")
    with pytest.raises(SourceError, match="rate limit"):
        HttpClient(fast_http_config).get_bytes(url)


def test_stalled_body(loopback, fast_http_config):
    loopback.add("/slow.wav", b"unused", "audio/wav")
    loopback.fault("/slow.wav", "stall", times=None, seconds=3.0)
    config = replace(fast_http_config, retries=1)
    started = time.monotonic()
    error = _item_error(lambda: HttpClient(config).get_bytes(loopback.url + "/slow.wav"))
    assert error.reason == "stalled"
    assert time.monotonic() - started < 2.5  # gave up on the stall timeout, not the server's close
    assert len(loopback.requests_to("/slow.wav")) == 2


def test_truncated_body_then_success(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.fault("/a.ogg", "truncate", times=1)
    assert HttpClient(fast_http_config).get_bytes(url) == real_clips[CLIP]
    loopback.fault("/a.ogg", "truncate", times=None)
    assert _item_error(lambda: HttpClient(fast_http_config).get_bytes(url)).reason == "truncated_body"


def test_html_instead_of_audio(loopback, fast_http_config):
    loopback.add("/a.ogg", b"unused", "audio/ogg")
    loopback.fault("/a.ogg", "html", times=None)
    error = _item_error(lambda: HttpClient(fast_http_config).get_bytes(loopback.url + "/a.ogg"))
    assert error.reason == "not_audio_content"
    assert len(loopback.requests_to("/a.ogg")) == 1


def test_text_bytes_with_audio_content_type_are_rejected(loopback, fast_http_config):
    url = loopback.add("/a.mp3", b"<html>Access denied</html>", "audio/mpeg")
    assert _item_error(lambda: HttpClient(fast_http_config).get_bytes(url)).reason == "not_audio_content"


def test_audio_bytes_with_text_content_type_are_rejected(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "text/html")
    assert _item_error(lambda: HttpClient(fast_http_config).get_bytes(url)).reason == "not_audio_content"


@pytest.mark.parametrize("declare_length", [True, False])
def test_oversized_download(loopback, fast_http_config, declare_length):
    loopback.add("/big.wav", b"unused", "audio/wav")
    loopback.fault("/big.wav", "oversize", times=None, size=3 * 2**20, declare_length=declare_length)
    config = replace(fast_http_config, max_bytes=2**20)
    error = _item_error(lambda: HttpClient(config).get_bytes(loopback.url + "/big.wav"))
    assert error.reason == "too_large"
    assert len(loopback.requests_to("/big.wav")) == 1


def test_connection_refused_is_connection_error(fast_http_config):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = _item_error(lambda: HttpClient(fast_http_config).get_bytes(f"http://127.0.0.1:{port}/a.ogg"))
    assert error.reason == "connection_error"


def test_reset_then_success(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    loopback.fault("/a.ogg", "reset", times=2)
    assert HttpClient(fast_http_config).get_bytes(url) == real_clips[CLIP]


def test_site_down_becomes_one_source_error(loopback, fast_http_config):
    loopback.add("/a.ogg", b"unused", "audio/ogg")
    loopback.fault("/a.ogg", "500", times=None)
    client = HttpClient(replace(fast_http_config, retries=0, max_consecutive_failures=3))
    reasons = []
    with pytest.raises(SourceError, match="looks down"):
        for _ in range(10):
            try:
                client.get_bytes(loopback.url + "/a.ogg")
            except ItemError as error:
                reasons.append(error.reason)
    assert reasons == ["http_5xx", "http_5xx"]
    served = len(loopback.requests_to("/a.ogg"))
    with pytest.raises(SourceError, match="looks down"):  # later calls stop without a request
        client.get_bytes(loopback.url + "/a.ogg")
    assert len(loopback.requests_to("/a.ogg")) == served


def test_item_errors_do_not_count_towards_site_down(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    client = HttpClient(replace(fast_http_config, retries=0, max_consecutive_failures=2))
    for _ in range(5):
        assert _item_error(lambda: client.get_bytes(loopback.url + "/gone.ogg")).reason == "http_404"
    loopback.fault("/a.ogg", "500", times=1)
    assert _item_error(lambda: client.get_bytes(url)).reason == "http_5xx"
    assert client.get_bytes(url) == real_clips[CLIP]  # a success resets the count
    loopback.fault("/a.ogg", "500", times=1)
    assert _item_error(lambda: client.get_bytes(url)).reason == "http_5xx"


def test_bad_credentials_stop_the_source_without_leaking_the_token(loopback, fast_http_config):
    loopback.add_handler("/api/search/", lambda req: Response.json({"detail": "Invalid token."}, status=401))
    with pytest.raises(SourceError) as info:
        HttpClient(fast_http_config).get_json(loopback.url + "/api/search/", params={"token": "s3cr3t-value"},
                                              auth_env="FREESOUND_API_KEY")
    assert "FREESOUND_API_KEY" in str(info.value)
    assert "s3cr3t" not in str(info.value)
    assert len(loopback.requests_to("/api/search/")) == 1


def test_403_without_credentials_is_an_item_error(loopback, fast_http_config):
    loopback.add("/a.ogg", b"unused", "audio/ogg")
    loopback.fault("/a.ogg", "403", times=1)
    assert _item_error(lambda: HttpClient(fast_http_config).get_bytes(loopback.url + "/a.ogg")).reason == "http_4xx"


def test_errors_never_carry_the_query_string(fast_http_config):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    error = _item_error(lambda: HttpClient(fast_http_config).get_json(
        f"http://127.0.0.1:{port}/api/", params={"token": "s3cr3t-value"}))
    assert "s3cr3t" not in str(error) and "s3cr3t" not in error.detail


def test_json_and_text(loopback, fast_http_config):
    loopback.add_handler("/j", lambda req: Response.json({"page": req.query.get("page")}))
    loopback.add("/t.csv", "naïve,1\n".encode("utf-8"), "text/csv")
    client = HttpClient(fast_http_config)
    assert client.get_json(loopback.url + "/j", params={"page": "3"}) == {"page": "3"}
    assert client.get_text(loopback.url + "/t.csv") == "naïve,1\n"
    loopback.fault("/j", "malformed", times=1)
    assert _item_error(lambda: client.get_json(loopback.url + "/j")).reason == "bad_json"


def test_archive_expectation(loopback, fast_http_config):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.wav", b"RIFF....WAVE")
    url = loopback.add("/a.zip", buffer.getvalue(), "application/zip")
    client = HttpClient(fast_http_config)
    assert client.get_bytes(url, expect="archive") == buffer.getvalue()
    loopback.fault("/a.zip", "html", times=1)
    assert _item_error(lambda: client.get_bytes(url, expect="archive")).reason == "not_archive_content"


def test_per_host_rate_limit_is_shared_across_threads(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    client = HttpClient(fast_http_config, host_rates={f"127.0.0.1:{loopback.port}": 20.0})
    bucket = client._bucket(url)
    permits: list[float] = []
    take = bucket.acquire

    def acquire() -> float:  # when each thread was let through
        waited = take()
        permits.append(time.monotonic())
        return waited

    bucket.acquire = acquire
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.get_bytes(url), range(16)))
    served = sorted(r.time for r in loopback.requests_to("/a.ogg"))
    assert len(served) == 16
    # 20/s with a burst of 1, whatever the thread count: the i-th request (from 0) goes out no
    # sooner than i/20 s after the start (a late thread can only make it later).
    for index, (permit, arrival) in enumerate(zip(sorted(permits), served)):
        assert permit - started >= index / 20.0 - 0.002, index
        assert arrival - started >= index / 20.0 - 0.002, index


def test_unlimited_by_default(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    client = HttpClient(fast_http_config)
    assert client._bucket(url) is None
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.get_bytes(url), range(16)))
    assert time.monotonic() - started < 1.5


def test_client_pickles_and_works_after(loopback, real_clips, fast_http_config):
    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    client = pickle.loads(pickle.dumps(HttpClient(fast_http_config, host_rates={"example.org": 1.0})))
    assert client.host_rates == {"example.org": 1.0}
    assert client.get_bytes(url) == real_clips[CLIP]


def test_token_bucket_pacing():
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    bucket = TokenBucket(rate=2.0, capacity=2.0, clock=lambda: now[0], sleep=sleep)
    waits = [bucket.acquire() for _ in range(4)]
    assert waits == [0.0, 0.0, 0.5, 1.0]  # the burst, then one every 0.5 s
    now[0] = 10.0  # a long idle spell refills only up to capacity
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.5]


def test_token_bucket_threads_do_not_oversubscribe():
    bucket = TokenBucket(rate=50.0)
    stamps: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        bucket.acquire()
        with lock:
            stamps.append(time.monotonic())

    threads = [threading.Thread(target=take) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(stamps) - min(stamps) >= 19 / 50.0 * 0.9


@pytest.mark.parametrize("name,head", [
    ("wav", b"RIFF\x24\x00\x00\x00WAVEfmt "), ("flac", b"fLaC\x00\x00\x00\x22"), ("ogg", b"OggS\x00\x02"),
    ("mp3", b"ID3\x04\x00\x00"), ("mpeg", b"\xff\xfb\x90\x64"), ("mp4", b"\x00\x00\x00\x20ftypM4A "),
    ("webm/matroska", b"\x1a\x45\xdf\xa3\x9f"), ("aiff", b"FORM\x00\x00\x00\x00AIFF"),
])
def test_sniff_audio_formats(name, head):
    assert sniff_audio(head) == name


@pytest.mark.parametrize("head", [b"<!DOCTYPE html>", b'{"detail": "x"}', b"PK\x03\x04", b"", b"RIFF\x00\x00\x00\x00AVI "])
def test_sniff_audio_rejects(head):
    assert sniff_audio(head) is None


def test_sniff_archive():
    assert sniff_archive(b"PK\x03\x04rest") == "zip"
    assert sniff_archive(b"<html>") is None


def test_generated_formats_pass_the_magic_check(real_clips):
    import io

    import av

    for container, codec in (("wav", "pcm_s16le"), ("flac", "flac"), ("mp3", "libmp3lame"), ("ipod", "aac")):
        buffer = io.BytesIO()
        with av.open(buffer, "w", format=container) as out:
            stream = out.add_stream(codec, rate=22050)
            stream.layout = "mono"
            with av.open(io.BytesIO(real_clips[CLIP])) as src:
                for frame in src.decode(audio=0):
                    frame.pts = None
                    for packet in stream.encode(frame):
                        out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
        assert sniff_audio(buffer.getvalue()) is not None, container


def test_retry_after_forms():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_redaction():
    assert "abc" not in redact("GET /x?token=abc&page=2") and "page=2" in redact("GET /x?token=abc&page=2")
    assert "tok123" not in redact("Authorization: Bearer tok123")
    assert public_url("https://h/p/?token=abc") == "https://h/p/"


def test_download_streams_to_a_file_atomically(loopback, fast_http_config, tmp_path):
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("a.txt", b"x" * 100_000)
    url = loopback.add("/a.zip", buffer.getvalue(), "application/zip")
    client = HttpClient(fast_http_config)
    dest = tmp_path / "cache" / "a.zip"
    loopback.fault("/a.zip", "truncate", times=1)
    assert client.download(url, dest, expect="archive") == len(buffer.getvalue())
    assert dest.read_bytes() == buffer.getvalue()

    other = tmp_path / "cache" / "b.zip"
    loopback.fault("/a.zip", "html", times=1)
    assert _item_error(lambda: client.download(url, other, expect="archive")).reason == "not_archive_content"
    assert sorted(p.name for p in other.parent.iterdir()) == ["a.zip"]  # no partial or temp file left


def test_loopback_head_answers_without_a_body(loopback, real_clips):
    import requests

    url = loopback.add("/a.ogg", real_clips[CLIP], "audio/ogg")
    response = requests.head(url, timeout=5)
    assert response.status_code == 200 and response.content == b""
    assert int(response.headers["Content-Length"]) == len(real_clips[CLIP])
    assert requests.get(url, timeout=5).content == real_clips[CLIP]  # the connection is still usable
    assert [r.method for r in loopback.requests_to("/a.ogg")] == ["HEAD", "GET"]


def test_config_from_source_options():
    from audio_dataset.http import HttpConfig
    from audio_dataset.source import UserError

    config = HttpConfig.from_options({"http_retries": "2", "http_stall_timeout": "1.5", "query": "dog"},
                                     requests_per_second=4.0)
    assert (config.retries, config.stall_timeout, config.requests_per_second) == (2, 1.5, 4.0)
    assert HttpConfig.from_options({"http_requests_per_second": "0"}, requests_per_second=4.0).requests_per_second is None
    for bad in ({"http_retries": "lots"}, {"http_retries": "-1"}, {"http_colour": "1"}, {"http_user_agent": "x"}):
        with pytest.raises(UserError):
            HttpConfig.from_options(bad)
