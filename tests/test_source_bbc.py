"""`bbc_sound_effects` against a loopback server serving the real catalogue format and WAV media."""
from __future__ import annotations

import io
import json
from pathlib import Path

import av
import pytest

from audio_dataset.source import ItemError, SourceConfig, SourceError, UserError, load_source
from loopback import LoopbackServer
from pipelines.bbc_sound_effects import LICENSE, category_tags

FIXTURES = Path(__file__).parent / "fixtures" / "bbc_sound_effects"
CATALOGUE = FIXTURES / "BBCSoundEffects.csv"
FAST = {"http_retries": "2", "http_backoff_base": "0.01", "http_backoff_cap": "0.05", "http_stall_timeout": "0.5",
        "http_max_retry_after": "5"}
GOOD_IDS = ["07076051", "07076050", "07076047", "07076043", "07076037", "07076014", "07076028", "07075063"]


def to_wav(data: bytes) -> bytes:
    """The clip as 16-bit PCM WAV, the format the BBC archive serves."""
    buffer = io.BytesIO()
    with av.open(io.BytesIO(data)) as src, av.open(buffer, "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=src.streams.audio[0].rate)
        stream.layout = "mono"
        for frame in src.decode(audio=0):
            frame.pts = None
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def wavs(real_clips) -> dict[str, bytes]:
    media = json.loads((FIXTURES / "media.json").read_text())
    return {sid: to_wav(real_clips[stem]) for sid, stem in media.items()}


@pytest.fixture
def site(loopback: LoopbackServer, wavs) -> LoopbackServer:
    """The catalogue at /assets/BBCSoundEffects.csv, WAVs at /wav/<location>, zips at /zip/<location>.zip."""
    import zipfile

    loopback.add("/assets/BBCSoundEffects.csv", CATALOGUE.read_bytes(), "text/csv")
    for sid, data in wavs.items():
        loopback.add(f"/wav/{sid}.wav", data, "audio/wav")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(f"{sid}.wav", data)
        loopback.add(f"/zip/{sid}.wav.zip", buffer.getvalue(), "application/zip")
    return loopback


def _source(site: LoopbackServer, **options: str):
    return load_source("bbc_sound_effects", SourceConfig(base_url=site.url, options={**FAST, **options}))


def test_lists_the_catalogue(site):
    items = list(_source(site).list_items())
    assert [i.source_id for i in items] == GOOD_IDS + ["line10"]
    steam = items[4]
    assert steam.text == ["Triple-expansion, constant run, slow down and speed up at 3'45\". "
                          "(Marine-type steam engine, 1911)"]
    assert steam.tag == ["Engines", "Steam"] and steam.license == LICENSE and steam.author == "BBC"
    assert steam.locator == f"{site.url}/wav/07076037.wav" and steam.url == steam.locator
    assert steam.original_data["CDNumber"] == "EC117F" and steam.original_data["secs"] == 423.0
    assert items[5].tag == []  # the catalogue row has no category
    assert items[-1].locator == ""


def test_fetch_wav_and_zip(site, wavs):
    source = _source(site)
    items = list(source.list_items())
    assert source.fetch(items[0]) == wavs["07076051"]
    zipped = _source(site, download="zip")
    zipped_items = list(zipped.list_items())
    assert zipped_items[1].locator.endswith("/zip/07076050.wav.zip")
    assert zipped.fetch(zipped_items[1]) == wavs["07076050"]


def test_malformed_row_fails_alone(site):
    source = _source(site)
    with pytest.raises(ItemError) as info:
        source.fetch(list(source.list_items())[-1])
    assert info.value.reason == "bad_listing_row" and "line 10" in info.value.detail


def test_zip_without_audio(site):
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", b"the file went missing")
    site.add("/zip/07076051.wav.zip", buffer.getvalue(), "application/zip")
    source = _source(site, download="zip")
    with pytest.raises(ItemError) as info:
        source.fetch(next(source.list_items()))
    assert info.value.reason == "archive_without_audio"


def test_local_catalogue_with_media_url(site, wavs):
    source = load_source("bbc_sound_effects", SourceConfig(input=str(CATALOGUE), options={"media_url": site.url}))
    items = list(source.list_items())
    assert len(items) == 9 and source.fetch(items[2]) == wavs["07076047"]
    assert not site.requests_to("/assets/BBCSoundEffects.csv")


def test_defaults_are_the_real_site():
    source = load_source("bbc_sound_effects", SourceConfig())
    assert source.catalogue == "https://sound-effects.bbcrewind.co.uk/assets/BBCSoundEffects.csv"
    assert source.media == "https://sound-effects-media.bbcrewind.co.uk"


@pytest.mark.parametrize("fault", ["html", "404", "malformed"])
def test_a_catalogue_that_is_not_the_catalogue_stops_the_source(site, fault):
    site.fault("/assets/BBCSoundEffects.csv", fault, times=None)
    with pytest.raises(SourceError, match="catalogue"):
        list(_source(site).list_items())


def test_missing_local_catalogue_is_a_user_error(tmp_path):
    source = load_source("bbc_sound_effects", SourceConfig(input=str(tmp_path / "nope.csv")))
    with pytest.raises(UserError, match="not found"):
        source.check()
    with pytest.raises(UserError, match="not found"):
        list(source.list_items())


@pytest.mark.parametrize("bad", [{"download": "mp4"}, {"colour": "red"}])
def test_bad_options(bad):
    with pytest.raises(UserError):
        load_source("bbc_sound_effects", SourceConfig(options=bad))


def test_category_tags():
    assert category_tags("Engines: Diesel: Gas") == ["Engines", "Diesel", "Gas"]
    assert category_tags("") == []


@pytest.mark.usefixtures("ray_local")
def test_build_with_faults_ends_in_exact_outcomes(site, tmp_path):
    from web_source_helpers import run_build, samples, status_counts

    site.fault("/wav/07076051.wav", "404", times=None)
    site.fault("/wav/07076050.wav", "503", times=2)            # recovers on the third try
    site.fault("/wav/07076047.wav", "429", times=1, retry_after="0.2")  # recovers after Retry-After
    site.fault("/wav/07076043.wav", "html", times=None)
    site.fault("/wav/07076037.wav", "truncate", times=None)
    out = tmp_path / "out"
    rows = run_build("bbc_sound_effects", out, base_url=site.url, options=FAST)

    assert status_counts(rows) == {"ok": 5, "failed": 4}
    assert {sid: r["error"] for sid, r in rows.items() if r["status"] == "failed"} == {
        "07076051": "http_404", "07076043": "not_audio_content", "07076037": "truncated_body",
        "line10": "bad_listing_row"}
    built = samples(out)
    assert set(built) == {"07076050", "07076047", "07076014", "07076028", "07075063"}
    assert built["07076028"]["text"] == ["Tropical forest, West Africa at night."]
    assert built["07076028"]["tag"] == ["Africa", "Forest"]
    assert len(site.requests_to("/wav/07076050.wav")) == 3
