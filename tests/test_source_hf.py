"""`--source hf`: datasets made with `datasets` in the test, as parquet files and save_to_disk folders."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from audio_dataset import manifest  # noqa: E402
from audio_dataset.build import BuildOptions, build  # noqa: E402
from audio_dataset.cli import main  # noqa: E402
from audio_dataset.shards import iter_shard, shard_paths  # noqa: E402
from audio_dataset.source import ItemError, SourceConfig, UserError, load_source  # noqa: E402
from conftest import REAL_AUDIO_DIR  # noqa: E402

STEMS = ["198-209-0000", "456440__inspectorj__bird-whistling-robin-single-13", "sorohanro_-_solo-trumpet-06",
         "3436-172162-0000", "5703-47212-0000"]


def _dataset(stems: list[str]) -> "datasets.Dataset":
    """Real clips as a hub dataset holds them: an Audio column of bytes, captions, tags, ids."""
    rows = {
        "audio": [{"bytes": (REAL_AUDIO_DIR / f"{s}.ogg").read_bytes(), "path": f"{s}.ogg"} for s in stems],
        "sentence": [f"the sound of clip {s}" for s in stems],
        "labels": [["tag-a", s[:4]] for s in stems],
        "clip_id": [f"id-{s}" for s in stems],
        "license": ["CC-BY-4.0"] * len(stems),
    }
    return datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    train, test = _dataset(STEMS[:3]), _dataset(STEMS[3:])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(root / "saved")
    (root / "parquet" / "data").mkdir(parents=True)
    # Small row groups, as audio datasets are written: a worker reads only its rows' groups.
    train.to_parquet(root / "parquet" / "data" / "train-00000-of-00001.parquet", batch_size=2)
    test.to_parquet(root / "parquet" / "data" / "test-00000-of-00001.parquet", batch_size=2)
    return {"saved": root / "saved", "parquet": root / "parquet"}


OPTIONS = {"audio": "audio", "caption": "sentence", "tags": "labels", "id": "clip_id"}


@pytest.mark.parametrize("form", ["saved", "parquet"])
def test_lists_and_fetches_both_local_forms(forms, form, tmp_path):
    for split, stems in (("train", STEMS[:3]), ("test", STEMS[3:])):
        source = load_source("hf", SourceConfig(input=str(forms[form]), options={**OPTIONS, "split": split}))
        source.check()
        items = list(source.list_items())
        assert [i.source_id for i in items] == [f"id-{s}" for s in stems]
        assert items[0].text == [f"the sound of clip {stems[0]}"] and items[0].tag == ["tag-a", stems[0][:4]]
        assert items[0].license == "CC-BY-4.0" and items[0].original_data["hf_split"] == split
        assert all("audio" not in i.original_data for i in items)
        # The bytes the dataset holds, undecoded, fetched in any order (a worker's view).
        for item, stem in reversed(list(zip(items, stems))):
            assert source.fetch(item) == (REAL_AUDIO_DIR / f"{stem}.ogg").read_bytes()


@pytest.mark.usefixtures("ray_local")
def test_build_from_hf_equals_build_from_the_files(forms, tmp_path):
    """The same clips through `hf` and through `local` give the same FLAC: our core decoded them."""
    out, reference = tmp_path / "hf", tmp_path / "local"
    build(BuildOptions(source="hf", out=out, split_ratios={"train": 1.0}, workers=1, progress=False,
                       source_config=SourceConfig(input=str(forms["parquet"]), options=OPTIONS)))
    folder = tmp_path / "clips"
    folder.mkdir()
    for stem in STEMS[:3]:
        (folder / f"{stem}.ogg").write_bytes((REAL_AUDIO_DIR / f"{stem}.ogg").read_bytes())
    build(BuildOptions(source="local", out=reference, split_ratios={"train": 1.0}, workers=1, progress=False,
                       source_config=SourceConfig(input=str(folder))))

    def by_stem(folder: Path, prefix: str, suffix: str) -> dict[str, bytes]:
        samples = [s for p in shard_paths(folder / "train") for s in iter_shard(p)]
        return {json.loads(s["json"])["source_id"].removeprefix(prefix).removesuffix(suffix): s["flac"]
                for s in samples}

    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 3
    ours = by_stem(out, "id-", "")
    assert set(ours) == set(STEMS[:3]) and ours == by_stem(reference, "", ".ogg")


def test_mistakes_are_one_line_errors(forms, tmp_path, capsys):
    with pytest.raises(UserError, match="no audio column 'sound'"):
        list(load_source("hf", SourceConfig(input=str(forms["parquet"]), options={"audio": "sound"})).list_items())
    with pytest.raises(UserError, match="has splits train, test"):
        list(load_source("hf", SourceConfig(input=str(forms["saved"]), options={"split": "dev"})).list_items())
    with pytest.raises(UserError, match="unknown hf option"):
        load_source("hf", SourceConfig(input=str(forms["saved"]), options={"column": "x"}))
    code = main(["build", "--source", "hf", "--input", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert code == 2 and "hf input not found" in capsys.readouterr().err
    code = main(["build", "--source", "hf", "--input", "someone/some-dataset", "--out", str(tmp_path / "o")])
    assert code == 2 and "HF_DATASETS_OFFLINE" in capsys.readouterr().err


def test_a_row_without_audio_bytes_fails_alone(tmp_path):
    rows = {"audio": [{"bytes": None, "path": str(tmp_path / "gone.ogg")}], "caption": ["x"]}
    datasets.Dataset.from_dict(rows).to_parquet(tmp_path / "train.parquet")
    source = load_source("hf", SourceConfig(input=str(tmp_path / "train.parquet")))
    item = next(source.list_items())
    with pytest.raises(ItemError) as caught:
        source.fetch(item)
    assert caught.value.reason == "missing_file"


def test_a_parquet_file_behind_an_fsspec_url(forms, tmp_path):
    """A remote file is read through fsspec: the listing and each row's group, never a download."""
    import fsspec

    memory = fsspec.filesystem("memory")
    url = "memory://hf-test/data/train-00000-of-00001.parquet"
    memory.pipe(url, (forms["parquet"] / "data" / "train-00000-of-00001.parquet").read_bytes())
    source = load_source("hf", SourceConfig(input=url, options=OPTIONS))
    source.check()
    items = list(source.list_items())
    assert [i.source_id for i in items] == [f"id-{s}" for s in STEMS[:3]]
    assert source.fetch(items[2]) == (REAL_AUDIO_DIR / f"{STEMS[2]}.ogg").read_bytes()
