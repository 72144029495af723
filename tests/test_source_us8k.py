"""UrbanSound8K from its official tar.gz (UrbanSound8K/audio/foldN/, metadata/UrbanSound8K.csv)."""
from __future__ import annotations

import pytest
from benchmark_helpers import AUDIO, csv_text, tar_gz_of, tone, write_tree
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.source import ItemError, SourceConfig, SourceError
from pipelines.us8k import UrbanSound8K

HEADER = ["slice_file_name", "fsID", "start", "end", "salience", "fold", "classID", "class"]
ROWS = [
    ["100032-3-0-0.wav", 100032, 0.0, 0.317551, 1, 5, 3, "dog_bark"],
    ["100263-2-0-117.wav", 100263, 58.5, 62.5, 1, 5, 2, "children_playing"],
    ["101415-3-0-2.wav", 101415, 1.0, 5.0, 2, 1, 3, "dog_bark"],
    ["102305-6-0-0.wav", 102305, 0.0, 2.6, 1, 10, 6, "gun_shot"],
    ["127873-0-0-0.wav", 127873, 0.0, 4.0, 2, 7, 0, "air_conditioner"],
]


def official_files(rows: list[list[object]] = ROWS) -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"UrbanSound8K/metadata/UrbanSound8K.csv": csv_text(HEADER, rows),
                                     "UrbanSound8K/UrbanSound8K_README.txt": "UrbanSound8K\n"}
    for number, row in enumerate(rows[:4]):
        files[f"UrbanSound8K/audio/fold{row[5]}/{row[0]}"] = tone(number)
    return files


def test_folder_listing_keeps_ten_folds_and_class_ids(tmp_path):
    source = UrbanSound8K(SourceConfig(input=str(write_tree(tmp_path / "data", official_files()))))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert len(items) == 5
    gun = items["102305-6-0-0.wav"]
    assert gun.locator == "UrbanSound8K/audio/fold10/102305-6-0-0.wav"
    assert (gun.text, gun.tag, gun.split) == (["gun shot"], ["gun_shot"], "test")
    assert gun.sample_fields == {"class_labels": ["gun_shot"], "class_ids": [6], "fold": 10, "benchmark_split": "all"}
    assert items["101415-3-0-2.wav"].original_data["salience"] == "2"
    assert source.fetch(gun)[:4] == b"RIFF"


def test_metadata_without_the_columns_is_a_source_error(tmp_path):
    files = {"UrbanSound8K/metadata/UrbanSound8K.csv": "name,label\nx.wav,dog\n"}
    source = UrbanSound8K(SourceConfig(input=str(write_tree(tmp_path / "d", files))))
    with pytest.raises(SourceError, match="classID"):
        list(source.list_items())


def test_a_csv_name_that_climbs_out_is_never_read(tmp_path):
    (tmp_path / "secret.wav").write_bytes(tone(9))
    rows = [["../../../secret.wav", 1, 0, 1, 1, 1, 0, "air_conditioner"]]
    source = UrbanSound8K(SourceConfig(input=str(write_tree(tmp_path / "d", official_files(rows)))))
    [item] = source.list_items()
    with pytest.raises(ItemError) as error:
        source.fetch(item)
    assert error.value.reason == "bad_file_name"


def test_a_planted_link_out_of_the_folder_is_never_followed(tmp_path):
    (tmp_path / "secret.wav").write_bytes(tone(9))
    root = write_tree(tmp_path / "d", official_files(ROWS[:1]))
    planted = root / "UrbanSound8K/audio/fold5/100032-3-0-0.wav"
    planted.unlink()
    planted.symlink_to(tmp_path / "secret.wav")
    [item] = UrbanSound8K(SourceConfig(input=str(root))).list_items()
    with pytest.raises(ItemError) as error:
        UrbanSound8K(SourceConfig(input=str(root))).fetch(item)
    assert error.value.reason == "bad_file_name" and "outside" in error.value.detail


def test_sample_fields_never_replace_the_schema_or_the_build_fields():
    from audio_dataset.build import _sample_fields
    from audio_dataset.source import Item

    item = Item(source_id="x", locator="x", text=["dog"],
                sample_fields={"text": ["planted"], "source": "other", "fold": 3, "class_labels": ["dog"]})
    assert _sample_fields(item) == {"fold": 3, "class_labels": ["dog"]}


@pytest.mark.usefixtures("ray_local")
def test_tar_gz_over_http_builds_every_fold_into_test(loopback, tmp_path):
    url = loopback.add("/records/1203745/files/UrbanSound8K.tar.gz", tar_gz_of(official_files()),
                       "application/gzip")
    out = tmp_path / "out"
    rows = run_build("us8k", out, input=url, audio=AUDIO)
    assert status_counts(rows) == {"ok": 4, "failed": 1}
    assert rows["127873-0-0-0.wav"]["error"] == "missing_member"
    built = samples(out)
    assert sorted(meta["fold"] for meta in built.values()) == [1, 5, 5, 10]
    child = built["100263-2-0-117.wav"]
    assert (child["text"], child["class_labels"], child["class_ids"], child["benchmark_split"]) \
        == (["children playing"], ["children_playing"], [2], "all")
    assert {row["split"] for row in rows.values()} == {"test"}
