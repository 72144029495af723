"""ESC-50 from its official GitHub archive (ESC-50-master.zip), made here at toy size."""
from __future__ import annotations

import pytest
from benchmark_helpers import AUDIO, csv_text, tone, write_tree, zip_of
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.cli import main
from audio_dataset.source import SourceConfig, UserError
from pipelines.esc50 import ESC50

HEADER = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
ROWS = [
    ["1-100032-A-0.wav", 1, 0, "dog", "True", 100032, "A"],
    ["1-115545-B-48.wav", 1, 48, "fireworks", "False", 115545, "B"],
    ["2-102414-C-17.wav", 2, 17, "pouring_water", "False", 102414, "C"],
    ["5-9032-A-0.wav", 5, 0, "dog", "True", 9032, "A"],
    ["3-1000-A-1.wav", 3, 1, "rooster", "False", 1000, "A"],  # listed, but its WAV is not in the archive
]


def official_files() -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"ESC-50-master/meta/esc50.csv": csv_text(HEADER, ROWS),
                                     "ESC-50-master/README.md": "# ESC-50\n"}
    for number, row in enumerate(ROWS[:4]):
        files[f"ESC-50-master/audio/{row[0]}"] = tone(number)
    return files


def test_listing_keeps_folds_targets_and_labels(tmp_path):
    root = write_tree(tmp_path / "unpacked", official_files())
    source = ESC50(SourceConfig(input=str(root), state_dir=tmp_path / "state"))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert len(items) == 5
    water = items["2-102414-C-17.wav"]
    assert water.text == ["pouring water"] and water.tag == ["pouring_water"]
    assert water.sample_fields == {"class_labels": ["pouring_water"], "class_ids": [17], "fold": 2,
                                   "benchmark_split": "all"}
    assert water.split == "test" and water.license == "CC BY-NC 3.0"
    assert water.url == "https://freesound.org/s/102414/"
    assert items["1-100032-A-0.wav"].original_data["esc10"] is True
    assert source.fetch(water)[:4] == b"RIFF"


def test_the_zip_on_disk_is_read_in_place(tmp_path):
    archive = tmp_path / "ESC-50-master.zip"
    archive.write_bytes(zip_of(official_files()))
    source = ESC50(SourceConfig(input=str(archive), state_dir=tmp_path / "state"))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert items["5-9032-A-0.wav"].locator == "ESC-50-master/audio/5-9032-A-0.wav"
    assert source.fetch(items["5-9032-A-0.wav"])[:4] == b"RIFF"
    assert not (tmp_path / "state").exists()  # nothing copied or extracted
    (tmp_path / "esc50.csv").write_text("filename\n")
    with pytest.raises(UserError, match="folder or a .zip"):
        ESC50(SourceConfig(input=str(tmp_path / "esc50.csv"))).check()


def test_a_bad_fold_fails_its_clip_alone(tmp_path):
    files = official_files()
    files["ESC-50-master/meta/esc50.csv"] = csv_text(HEADER, [ROWS[0], ["x.wav", "one", 0, "dog", "True", 1, "A"]])
    source = ESC50(SourceConfig(input=str(write_tree(tmp_path / "esc", files))))
    good, bad = source.list_items()
    assert good.listing_error is None
    assert bad.listing_error[0] == "bad_metadata" and "fold 'one'" in bad.listing_error[1]


def test_an_unknown_option_is_a_usage_mistake(tmp_path):
    with pytest.raises(UserError, match=r"unknown esc50 option\(s\) folds; known: http_\*"):
        ESC50(SourceConfig(input=str(tmp_path), options={"folds": "1"})).check()


def test_a_folder_without_the_metadata_is_refused(tmp_path):
    (tmp_path / "audio").mkdir()
    source = ESC50(SourceConfig(input=str(tmp_path)))
    with pytest.raises(UserError, match="meta/esc50.csv"):
        list(source.list_items())


@pytest.mark.usefixtures("ray_local")
def test_zip_over_http_builds_test_split_with_fold_fields(loopback, tmp_path, capsys):
    url = loopback.add("/karolpiczak/ESC-50/archive/master.zip", zip_of(official_files()), "application/zip")
    out = tmp_path / "out"
    rows = run_build("esc50", out, input=url, audio=AUDIO)
    assert status_counts(rows) == {"ok": 4, "failed": 1}
    assert rows["3-1000-A-1.wav"]["error"] == "missing_member"
    assert {row["split"] for row in rows.values()} == {"test"}
    built = samples(out)
    dog = built["5-9032-A-0.wav"]
    assert (dog["text"], dog["tag"], dog["class_labels"], dog["class_ids"], dog["fold"], dog["benchmark_split"]) \
        == (["dog"], ["dog"], ["dog"], [0], 5, "all")
    assert dog["license_class"] == "noncommercial"
    assert len(loopback.requests_to("/karolpiczak/ESC-50/archive/master.zip")) == 1  # downloaded once
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0  # the command a user runs, in this process
    assert "verified" in capsys.readouterr().out
