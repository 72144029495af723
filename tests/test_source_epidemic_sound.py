"""Epidemic Sound against a loopback copy of its JSON API: categories, paged searches, MP3 stems."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from loopback import Response
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.source import SourceConfig, SourceError
from conftest import REAL_AUDIO_DIR, ffmpeg_convert
from pipelines.epidemic_sound import EpidemicSound, sounds_caption

FIXTURES = Path(__file__).parent / "fixtures" / "epidemic_sound"
CLIPS = {"130586": "456440__inspectorj__bird-whistling-robin-single-13", "130587": "sorohanro_-_solo-trumpet-06",
         "45015": "198-209-0000"}


@pytest.fixture(scope="module")
def mp3s(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("mp3")
    return {track: ffmpeg_convert(REAL_AUDIO_DIR / f"{stem}.ogg", folder / f"{track}.mp3",
                                  "-c:a", "libmp3lame", "-b:a", "64k").read_bytes()
            for track, stem in CLIPS.items()}


@pytest.fixture
def site(loopback, mp3s):
    def page(name: str) -> bytes:
        return (FIXTURES / name).read_text().replace("{media}", loopback.url).encode()

    loopback.add("/json/tags/", page("tags.json"), "application/json")

    def search(request):
        name = f"search_{request.query.get('genres')}_{request.query.get('page')}.json"
        if not (FIXTURES / name).exists():
            return Response.json({"detail": "not found"}, status=404)
        return Response(200, page(name), "application/json")

    loopback.add_handler("/json/search/sfx/", search)
    for track, data in mp3s.items():
        loopback.add(f"/lqmp3/{track}.mp3", data, "audio/mpeg")
    loopback.add("/lqmp3/45014.mp3", b"<html><body>Access denied</body></html>", "text/html")
    return loopback


def test_tracks_become_laion_style_items(site):
    source = EpidemicSound(SourceConfig(base_url=site.url))
    items = {item.source_id: item for item in source.list_items()}
    # 130587 is listed under two categories; the listing keeps it (the core drops repeats).
    assert [i for i in items] == ["130586", "130587", "130588", "45014", "45015"]
    knock = items["45014"]
    assert knock.text == ["Door Knock Door", "the sounds of foley, door, knock, glass, window, and glass door knock."]
    assert knock.tag[:2] == ["Doors", "doors"] and "glass door knock" in knock.tag
    assert knock.original_data["Class_name"] == "Doors"
    assert items["130588"].text == ["Footsteps Snow", "the sounds of snow."]
    assert sounds_caption([]) is None


def test_only_the_asked_categories_are_listed(site):
    source = EpidemicSound(SourceConfig(base_url=site.url, options={"genres": "doors"}))
    assert [i.source_id for i in source.list_items()] == ["45014", "130587", "45015"]


@pytest.mark.usefixtures("ray_local")
def test_epidemic_builds_with_faults_and_exact_counts(site, tmp_path):
    site.fault("/json/search/sfx/", "malformed", times=1)   # the first page comes back cut off once
    site.fault("/json/tags/", "429", times=1, retry_after="0.1")
    site.fault("/lqmp3/45015.mp3", "500", times=1)            # a retry fixes it
    out = tmp_path / "out"
    rows = run_build("epidemic_sound", out, base_url=site.url,
                     options={"http_backoff_base": "0.01", "http_backoff_cap": "0.02"})
    assert status_counts(rows) == {"ok": 3, "failed": 2}
    assert rows["130588"]["error"] == "http_404"
    assert rows["45014"]["error"] == "not_audio_content"
    built = samples(out)
    assert built["45015"]["text"][0] == "Door Slam Heavy"
    assert built["130586"]["original_data"]["metadataTags"] == ["footsteps", "gravel", "walking"]


def test_interrupted_listing_resumes_at_the_failed_page(site, tmp_path):
    state = tmp_path / "state"
    first = EpidemicSound(SourceConfig(base_url=site.url, state_dir=state, options={"genres": "footsteps"}))
    site.add_handler("/json/search/sfx/", _fail_on_page_2(site))
    with pytest.raises(SourceError, match="page 2"):
        list(first.list_items())
    site.clear_log()
    site.add_handler("/json/search/sfx/", lambda request: Response(
        200, (FIXTURES / f"search_footsteps_{request.query['page']}.json").read_text()
        .replace("{media}", site.url).encode(), "application/json"))
    again = EpidemicSound(SourceConfig(base_url=site.url, state_dir=state, options={"genres": "footsteps"}))
    assert [i.source_id for i in again.list_items()] == ["130586", "130587", "130588"]
    pages = [r.query["page"] for r in site.requests_to("/json/search/sfx/")]
    assert pages == ["2"]  # page 1 came from the saved listing state


def _fail_on_page_2(site):
    def handler(request):
        if request.query["page"] == "2":
            return Response(200, b'{"entities": {"tracks": {"1": ', "application/json")
        return Response(200, (FIXTURES / "search_footsteps_1.json").read_text().replace("{media}", site.url).encode(),
                        "application/json")
    return handler


def test_fixture_pages_are_valid_json():
    for path in FIXTURES.glob("*.json"):
        json.loads(path.read_text())
