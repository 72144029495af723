"""Audiostock: LAION's CSV and the listing pages, /audio/<id>/play redirecting to the CDN's MP3."""
from __future__ import annotations

from pathlib import Path

import pytest
from loopback import Response
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.source import SourceConfig, SourceError
from conftest import REAL_AUDIO_DIR, ffmpeg_convert
from pipelines.audiostock import Audiostock, parse_listing_page

FIXTURES = Path(__file__).parent / "fixtures" / "audiostock"


@pytest.fixture
def site(loopback, tmp_path):
    mp3s = {"1150592": "456440__inspectorj__bird-whistling-robin-single-13", "1150593": "sorohanro_-_solo-trumpet-06"}
    for audio_id, stem in mp3s.items():
        mp3 = ffmpeg_convert(REAL_AUDIO_DIR / f"{stem}.ogg", tmp_path / f"{audio_id}.mp3", "-b:a", "128k")
        cdn = loopback.add(f"/audio-sample-128kbps/{audio_id}-a1b2c3.mp3", mp3.read_bytes(), "audio/mpeg")
        loopback.add(f"/audio/{audio_id}/play", b"", "text/html", status=302, headers={"Location": cdn})
    # 1150594: gone (404); 1150595: the play URL answers with the site's HTML instead of audio.
    loopback.add("/audio/1150595/play", b"<!DOCTYPE html><html><body>login</body></html>", "text/html")
    loopback.add_handler("/se", lambda request: Response(
        200, (FIXTURES / f"se_page_{request.query.get('page', '1')}.html").read_bytes(), "text/html; charset=utf-8"))
    return loopback


def test_csv_rows_become_items_with_the_jp_play_url(site):
    source = Audiostock(SourceConfig(input=str(FIXTURES / "laion_audiostock.csv"), base_url=site.url))
    items = list(source.list_items())
    assert [i.source_id for i in items] == ["1150592", "1150593", "1150594", "1150595"]
    assert items[0].text == ["Bubble 02"] and items[0].tag == ["foam", "Bubble sound", "bubble", "water", "liquid"]
    assert items[0].locator == f"{site.url}/audio/1150592/play"
    assert items[0].url == "https://audiostock.jp/audio/1150592"


def test_listing_pages_are_scraped_until_an_empty_page(site):
    source = Audiostock(SourceConfig(base_url=site.url))
    items = list(source.list_items())
    assert [(i.source_id, i.text) for i in items] == [
        ("1150592", ["Bubble 02"]), ("1150593", ["Trumpet & fanfare"]), ("1150595", ["Speech narration"])]
    assert [r.query["page"] for r in site.requests_to("/se")] == ["1", "2", "3"]
    assert parse_listing_page("<html></html>") == []


def test_a_csv_without_audiostock_urls_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("url,caption1\nhttps://example.org/x.mp3,Something\n")
    with pytest.raises(SourceError, match="row 1"):
        list(Audiostock(SourceConfig(input=str(bad))).list_items())


@pytest.mark.usefixtures("ray_local")
def test_audiostock_builds_with_exact_counts(site, tmp_path):
    site.fault("/audio-sample-128kbps/1150593-a1b2c3.mp3", "stall", times=1)  # stalls once, then served
    out = tmp_path / "out"
    rows = run_build("audiostock", out, input=str(FIXTURES / "laion_audiostock.csv"), base_url=site.url,
                     options={"http_stall_timeout": "0.5", "http_backoff_base": "0.01", "http_backoff_cap": "0.02"})
    assert status_counts(rows) == {"ok": 2, "failed": 2}
    assert rows["1150594"]["error"] == "http_404"
    assert rows["1150595"]["error"] == "not_audio_content"
    assert samples(out)["1150593"]["text"] == ["Trumpet fanfare short"]
