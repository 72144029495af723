"""Free To Use Sounds from the purchased packs on disk: a folder of pack zips and loose WAVs."""
from __future__ import annotations

import pytest
from web_source_helpers import run_build, samples, status_counts, wav_bytes, zip_bytes

from audio_dataset.source import SourceConfig, UserError
from pipelines.free_to_use_sounds import FreeToUseSounds



def make_library(root):
    pack = root / "Free To Use Sounds - Tokyo Streets"
    pack.mkdir(parents=True)
    (pack / "Readme - License.txt").write_text("Free To Use Sounds licence terms")  # not a URL list: ignored
    robin = wav_bytes("456440__inspectorj__bird-whistling-robin-single-13", 2.5)
    (pack / "Tokyo Crosswalk Signal Birds 01.wav").write_bytes(robin)
    (root / "Free To Use Sounds - Trains.zip").write_bytes(zip_bytes({
        "Trains/Train Horn Distant.wav": wav_bytes("sorohanro_-_solo-trumpet-06", 3.0),
        "Trains/Train Station Announcement.wav": wav_bytes("198-209-0000", 3.0)}))
    return root


def test_listing_walks_folders_and_pack_archives(tmp_path):
    root = make_library(tmp_path / "library")
    source = FreeToUseSounds(SourceConfig(input=str(root), state_dir=tmp_path / "state"))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert set(items) == {
        "Free To Use Sounds - Tokyo Streets/Tokyo Crosswalk Signal Birds 01.wav",
        "Free To Use Sounds - Trains.zip/Trains/Train Horn Distant.wav",
        "Free To Use Sounds - Trains.zip/Trains/Train Station Announcement.wav"}
    horn = items["Free To Use Sounds - Trains.zip/Trains/Train Horn Distant.wav"]
    assert horn.text == ["Train Horn Distant", "Train Horn Distant, Trains"]
    assert horn.tag == ["Free To Use Sounds Trains", "Trains"]


def test_missing_input_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        FreeToUseSounds(SourceConfig(input=str(tmp_path / "nope"))).check()


@pytest.mark.usefixtures("ray_local")
def test_free_to_use_sounds_builds(tmp_path):
    root = make_library(tmp_path / "library")
    out = tmp_path / "out"
    rows = run_build("free_to_use_sounds", out, input=str(root))
    assert status_counts(rows) == {"ok": 3}
    assert {m["text"][0] for m in samples(out).values()} == {
        "Tokyo Crosswalk Signal Birds", "Train Horn Distant", "Train Station Announcement"}
