"""Qwen2.5-Omni through the listen step, and the CLAP check in batches.

The Omni model is tiny and random, saved the way `Qwen/Qwen2.5-Omni-7B` is downloaded: one checkpoint
of model_type qwen2_5_omni (thinker, talker, token2wav) that the listen step loads the thinker from,
through the users' `--alm-model PATH`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audio_dataset.caption import types as t
from audio_dataset.cli import main
from audio_dataset.shards import iter_shard
from test_k2c import _sample, _write_input  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("ray_local", "one_torch_thread")


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Path:
    from audio_dataset.caption.tiny_alm import make_tiny_omni

    return make_tiny_omni(tmp_path_factory.mktemp("omni") / "Qwen2.5-Omni")


@pytest.fixture(scope="module")
def omni_input(tmp_path_factory) -> Path:
    """A 49 s clip (two 30 s windows) and two short ones, in two shards."""
    return _write_input(tmp_path_factory.mktemp("omni_in"), {"train": [
        [_sample("147793__setuniman__sweet-waltz-0i-22mi", 60.0), _sample("198-209-0000", 2.0)],
        [_sample("glacier-bay-humpback", 3.0)]]})


def _listen(dataset: Path, model: Path, out: Path, batch_size: int) -> dict[str, list[dict]]:
    assert main(["caption", str(dataset), "--out", str(out), "--steps", "listen", "--alm-model", str(model),
                 "--questions", _questions(out.parent), "--alm-max-new-tokens", "4",
                 "--batch-size", str(batch_size), "--workers", "1", "--threads", "1", "--no-progress"]) == 0
    return {s["__key__"]: json.loads(s["json"])["alm_answers"]
            for tar in sorted((out / "train").glob("*.tar")) for s in iter_shard(tar)}


def _questions(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "questions.json"
    path.write_text(json.dumps(["What do you hear?", "Is there music?"]))
    return str(path)


def test_the_tiny_omni_is_laid_out_as_the_full_omni_download(omni):
    config = json.loads((omni / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]
    assert {"thinker_config", "talker_config", "token2wav_config"} <= set(config)
    from safetensors import safe_open

    with safe_open(str(omni / "model.safetensors"), "pt") as weights:
        prefixes = {key.split(".")[0] for key in weights.keys()}
    assert prefixes == {"thinker", "talker", "token2wav"}


def test_omni_listens_per_window_and_batching_does_not_change_answers(omni, omni_input, tmp_path):
    one = _listen(omni_input, omni, tmp_path / "b1" / "out", 1)
    four = _listen(omni_input, omni, tmp_path / "b4" / "out", 4)
    assert one == four  # greedy answers do not depend on the batch
    waltz = next(answers for key, answers in one.items() if "waltz" in key)
    assert [(a["start"], a["end"], a["question"]) for a in waltz] == [
        (0.0, 30.0, "What do you hear?"), (0.0, 30.0, "Is there music?"),
        (30.0, 49.2, "What do you hear?"), (30.0, 49.2, "Is there music?")]
    assert all(len(answers) == 2 for key, answers in one.items() if "waltz" not in key)
    texts = [a["answer"] for answers in one.values() for a in answers]
    assert all(texts) and len(set(texts)) > 1  # the real generate path wrote words that depend on the input
    rows = pq.read_table(tmp_path / "b1" / "out" / "caption_manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == [t.LISTENED] * 3 and [r["windows"] for r in rows] == [2, 1, 1]
    run = json.loads((tmp_path / "b1" / "out" / "run.json").read_text())
    assert "qwen2_5_omni" in json.dumps(run)


def test_the_omni_prompt_carries_its_system_turn(omni):
    from audio_dataset.caption.listen import ListenOptions, make_listener, resolve_alm

    options = ListenOptions(model=str(omni), max_new_tokens=2, batch_size=2)
    listener = make_listener(options, *resolve_alm(options), "cpu")
    assert listener.prompt("Hi").startswith("<|im_start|>system\nYou are Qwen, a virtual human")
    batch = listener.processor(text=[listener.prompt("Hi")], audio=[np.zeros(3 * 16000, np.float32)],
                               sampling_rate=16000, return_tensors="pt")
    audio_id = listener.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert int((batch["input_ids"] == audio_id).sum()) == 75  # 3 s of audio: 75 audio tokens
