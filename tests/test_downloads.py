"""Downloads that take for ever or end early: an overall deadline per attempt, and details that
count the bytes that really arrived (body bytes are read as they come, not in whole 64 KiB reads)."""
from __future__ import annotations

import dataclasses
import re
import time

import pytest

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import ItemError


def _failure(client: HttpClient, url: str) -> ItemError:
    with pytest.raises(ItemError) as caught:
        client.get_bytes(url)
    return caught.value


def test_a_trickling_server_ends_at_the_download_deadline(loopback, fast_http_config: HttpConfig) -> None:
    # A byte every 20 ms never trips the 0.5 s stall timeout; 4096 bytes would take 80 s.
    loopback.fault("/trickle.wav", "trickle", times=None, size=4096, interval=0.02)
    config = dataclasses.replace(fast_http_config, download_timeout=1.0)
    started = time.monotonic()
    error = _failure(HttpClient(config), loopback.url + "/trickle.wav")
    assert error.reason == "too_slow"
    assert time.monotonic() - started < 3.0
    assert len(loopback.requests_to("/trickle.wav")) == 1  # a deadline is not retried
    arrived = int(re.search(r"(\d+) of 4096 bytes", error.detail).group(1))
    assert 10 < arrived < 4096  # what came is counted, not 0


def test_a_big_body_at_a_healthy_rate_is_not_cut_at_the_deadline(loopback, fast_http_config: HttpConfig) -> None:
    loopback.fault("/big.wav", "oversize", times=None, size=8 * 2**20)  # 8 MiB at loopback speed
    config = dataclasses.replace(fast_http_config, download_timeout=0.001, max_bytes=16 * 2**20)
    assert len(HttpClient(config).get_bytes(loopback.url + "/big.wav")) == 8 * 2**20


def test_stall_and_truncation_details_count_the_bytes_that_came(loopback, fast_http_config: HttpConfig) -> None:
    loopback.fault("/stall.wav", "stall", times=None, seconds=3.0)
    loopback.fault("/cut.wav", "truncate", times=None)  # 1024 of a declared 4096 bytes, then close
    client = HttpClient(fast_http_config)
    stalled = _failure(client, loopback.url + "/stall.wav")
    assert stalled.reason == "stalled" and "after 1024 bytes" in stalled.detail
    cut = _failure(client, loopback.url + "/cut.wav")
    assert cut.reason == "truncated_body" and "after 1024 of 4096 bytes" in cut.detail


def test_the_deadline_is_a_source_option(loopback) -> None:
    assert HttpConfig.from_options({"http_download_timeout": "60"}).download_timeout == 60.0
    assert HttpConfig.from_options({"http_download_timeout": "0"}).download_timeout is None
