"""AudioCaps: its caption CSVs (one row per caption) over a loopback "YouTube" through yt-dlp."""
from __future__ import annotations

from pathlib import Path

import pytest
from web_source_helpers import run_build, samples, serve_videos, status_counts

from audio_dataset.source import SourceConfig, UserError
from pipelines.audiocaps import AudioCaps, split_of

FIXTURES = Path(__file__).parent / "fixtures" / "audiocaps"


def test_captions_of_one_segment_merge_into_one_item():
    source = AudioCaps(SourceConfig(input=str(FIXTURES)))
    items = {item.source_id: item for item in source.list_items()}
    assert set(items) == {"DoGhOwL0001", "ReAdEr00001", "OrChEsTrA01", "MiSsInG0002"}
    orchestra = items["OrChEsTrA01"]
    assert len(orchestra.text) == 5 and orchestra.split == "test"
    assert orchestra.original_data["start_seconds"] == 30.0 and orchestra.original_data["end_seconds"] == 40.0
    assert items["DoGhOwL0001"].split == "train"


def test_split_comes_from_the_file_name():
    assert split_of("https://raw.githubusercontent.com/cdjkim/audiocaps/master/dataset/val.csv") == "valid"
    with pytest.raises(UserError):
        split_of("/data/captions.csv")


@pytest.mark.usefixtures("ray_local")
def test_audiocaps_builds_cut_segments_with_exact_counts(loopback, tmp_path):
    orchestra = "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra)"
    base = serve_videos(loopback, {"DoGhOwL0001": "pibble", "ReAdEr00001": "3436-172162-0000",
                                   "OrChEsTrA01": orchestra})
    # The CSVs come from the loopback too, as from raw.githubusercontent.com.
    urls = [loopback.add(f"/dataset/{name}", (FIXTURES / name).read_bytes(), "text/plain; charset=utf-8")
            for name in ("train.csv", "test.csv")]
    out = tmp_path / "out"
    rows = run_build("audiocaps", out, input=",".join(urls), base_url=base)
    assert status_counts(rows) == {"ok": 3, "failed": 1}
    assert rows["MiSsInG0002"]["error"] == "http_404"
    assert rows["OrChEsTrA01"]["split"] == "test"
    built = samples(out)
    assert len(built["OrChEsTrA01"]["text"]) == 5
    for meta in built.values():
        assert abs(meta["duration"] - 10.0) < 0.05
