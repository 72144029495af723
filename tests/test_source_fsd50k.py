"""FSD50K from its Zenodo layout: the ground-truth and metadata zips, the audio zips (merged from
their split parts) or unpacked folders; multi-label rows and the dataset's own splits."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from benchmark_helpers import AUDIO, csv_text, tone, write_tree, zip_of
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.source import SourceConfig, UserError
from pipelines.fsd50k import FSD50K

VOCABULARY = "0,Bark,/m/05tny_\n1,Dog,/m/0bt9lr\n2,Domestic_animals_and_pets,/m/068hy\n3,Electric_guitar,/m/02sgy\n"
DEV = csv_text(["fname", "labels", "mids", "split"], [
    [64760, "Electric_guitar", "/m/02sgy", "train"],
    [16399, "Bark,Dog,Domestic_animals_and_pets", "/m/05tny_,/m/0bt9lr,/m/068hy", "train"],
    [16401, "Dog", "/m/0bt9lr", "val"],
    [99999, "Dog", "/m/0bt9lr", "train"],  # no WAV for it in the audio zip
])
EVAL = csv_text(["fname", "labels", "mids"], [[37199, "Bark,Dog", "/m/05tny_,/m/0bt9lr"]])
INFO = {"64760": {"title": "guitar riff", "license": "http://creativecommons.org/licenses/by/3.0/",
                  "uploader": "guitarist", "tags": ["guitar"]},
        "16399": {"license": "http://creativecommons.org/publicdomain/zero/1.0/", "uploader": "dogs"}}


def truth_files() -> dict[str, bytes | str]:
    return {"FSD50K.ground_truth/vocabulary.csv": VOCABULARY, "FSD50K.ground_truth/dev.csv": DEV,
            "FSD50K.ground_truth/eval.csv": EVAL}


def audio_files(part: str, fnames: list[int]) -> dict[str, bytes | str]:
    return {f"FSD50K.{part}/{fname}.wav": tone(number) for number, fname in enumerate(fnames)}


def metadata_files() -> dict[str, bytes | str]:
    return {"FSD50K.metadata/dev_clips_info_FSD50K.json": json.dumps(INFO),
            "FSD50K.metadata/eval_clips_info_FSD50K.json": "{}"}


def zenodo_folder(root):
    """The files as downloaded from Zenodo, dev audio still in its split parts."""
    (root).mkdir()
    (root / "FSD50K.ground_truth.zip").write_bytes(zip_of(truth_files()))
    (root / "FSD50K.metadata.zip").write_bytes(zip_of(metadata_files()))
    (root / "FSD50K.eval_audio.zip").write_bytes(zip_of(audio_files("eval_audio", [37199])))
    (root / "FSD50K.dev_audio.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # the split set's last part
    (root / "FSD50K.dev_audio.z01").write_bytes(b"PK\x07\x08" + bytes(60))
    return root


def test_split_dev_zip_is_refused_with_the_merge_command(tmp_path):
    source = FSD50K(SourceConfig(input=str(zenodo_folder(tmp_path / "zenodo"))))
    with pytest.raises(UserError, match=r"zip -s 0 FSD50K.dev_audio.zip --out FSD50K.dev_audio.merged.zip"):
        source.check()
    FSD50K(SourceConfig(input=str(tmp_path / "zenodo"), options={"splits": "eval"})).check()  # eval is whole


def test_merged_zip_lists_multi_label_rows_with_vocabulary_ids_and_licences(tmp_path):
    root = zenodo_folder(tmp_path / "zenodo")
    merged = tmp_path / "FSD50K.dev_audio.merged.zip"
    merged.write_bytes(zip_of(audio_files("dev_audio", [64760, 16399, 16401])))
    source = FSD50K(SourceConfig(input=str(root), state_dir=tmp_path / "state", options={"dev_audio": str(merged)}))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert len(items) == 5
    dog = items["16399"]
    assert dog.text == ["Bark", "Dog", "Domestic animals and pets"]
    assert dog.tag == ["Bark", "Dog", "Domestic_animals_and_pets"]
    assert dog.sample_fields == {"class_labels": ["Bark", "Dog", "Domestic_animals_and_pets"],
                                 "class_ids": [0, 1, 2], "fold": None, "benchmark_split": "train"}
    assert (dog.split, dog.license, dog.author) == ("train", "http://creativecommons.org/publicdomain/zero/1.0/", "dogs")
    assert (items["16401"].split, items["16401"].sample_fields["benchmark_split"]) == ("valid", "val")
    assert (items["37199"].split, items["37199"].sample_fields["benchmark_split"]) == ("test", "eval")
    assert items["99999"].listing_error[0] == "missing_member"
    assert source.fetch(items["64760"])[:4] == b"RIFF"


def test_unpacked_folders_without_metadata(tmp_path):
    root = write_tree(tmp_path / "fsd", {**truth_files(), **audio_files("eval_audio", [37199])})
    source = FSD50K(SourceConfig(input=str(root), options={"splits": "eval"}))
    source.check()
    [item] = source.list_items()
    assert item.license.startswith("per clip Freesound CC licence") and item.listing_error is None
    assert source.fetch(item)[:4] == b"RIFF"


@pytest.mark.usefixtures("ray_local")
def test_zips_over_http_build_train_valid_test(loopback, tmp_path):
    loopback.add("/files/FSD50K.ground_truth.zip", zip_of(truth_files()), "application/zip")
    loopback.add("/files/FSD50K.metadata.zip", zip_of(metadata_files()), "application/zip")
    dev = loopback.add("/merged/dev.zip", zip_of(audio_files("dev_audio", [64760, 16399, 16401])), "application/zip")
    evaluation = loopback.add("/merged/eval.zip", zip_of(audio_files("eval_audio", [37199])), "application/zip")
    out = tmp_path / "out"
    rows = run_build("fsd50k", out, input=loopback.url + "/files", audio=AUDIO,
                     options={"dev_audio": dev, "eval_audio": evaluation})
    assert status_counts(rows) == {"ok": 4, "failed": 1}
    assert rows["99999"]["error"] == "missing_member"
    assert {key: rows[key]["split"] for key in ("64760", "16401", "37199")} == \
        {"64760": "train", "16401": "valid", "37199": "test"}
    built = samples(out)
    multi = built["37199"]
    assert (multi["class_labels"], multi["class_ids"], multi["benchmark_split"]) == (["Bark", "Dog"], [0, 1], "eval")
    assert built["64760"]["license_class"] == "open"
    assert len(loopback.requests_to("/merged/dev.zip")) == 1


@pytest.mark.skipif(shutil.which("zip") is None, reason="needs Info-ZIP's zip to make a real split archive")
def test_a_real_split_zip_is_refused_and_its_merge_is_read(tmp_path):
    """The parts as Info-ZIP writes them (zip -s), then merged by the command the refusal names."""
    root = write_tree(tmp_path / "fsd", truth_files())
    write_tree(tmp_path / "src", audio_files("dev_audio", [64760, 16399, 16401]))
    subprocess.run(["zip", "-q", "-0", "-r", "-s", "64k", str(root / "FSD50K.dev_audio.zip"), "FSD50K.dev_audio"],
                   cwd=tmp_path / "src", check=True)
    assert (root / "FSD50K.dev_audio.z01").exists()
    with pytest.raises(UserError, match="split zip"):
        FSD50K(SourceConfig(input=str(root), options={"splits": "dev"})).check()
    subprocess.run(["zip", "-q", "-s", "0", "FSD50K.dev_audio.zip", "--out", "FSD50K.dev_audio.merged.zip"],
                   cwd=root, check=True)
    merged = FSD50K(SourceConfig(input=str(root), state_dir=tmp_path / "state",
                                 options={"splits": "dev", "dev_audio": str(root / "FSD50K.dev_audio.merged.zip")}))
    merged.check()
    items = [item for item in merged.list_items() if item.listing_error is None]
    assert sorted(item.source_id for item in items) == ["16399", "16401", "64760"]
    assert all(merged.fetch(item)[:4] == b"RIFF" for item in items)
