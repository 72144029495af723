"""`audiodata caption` end to end with the tiny models loaded from folders (`--alm-model PATH`,
`--llm PATH`, `--clap-checkpoint PATH`): the fields, the manifest's outcomes, resume, the lock,
exit codes, and `audiodata verify` on the output."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audio_dataset.caption import types as t
from audio_dataset.caption.listen import vllm_available
from audio_dataset.cli import main
from audio_dataset.shards import iter_shard, read_sizes
from test_k2c import _sample, _write_input  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("ray_local", "one_torch_thread")


@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> Path:
    """Five short real clips in three shards, and one sample whose audio does not decode."""
    broken = {**_sample("pibble", 2.0), "__key__": "local-broken"}
    broken["flac"] = b"not audio at all"
    return _write_input(tmp_path_factory.mktemp("caption_in"), {
        "train": [[_sample("456440__inspectorj__bird-whistling-robin-single-13", 2.5), _sample("198-209-0000", 3.0)],
                  [broken, _sample("glacier-bay-humpback", 3.0)]],
        "valid": [[_sample("sorohanro_-_solo-trumpet-06", 2.0)]],
    })


def _args(models: dict[str, Path], questions: Path, *extra: str) -> list[str]:
    return ["--alm-model", str(models["alm"]), "--llm", str(models["llm"]), "--clap-checkpoint", str(models["clap"]),
            "--questions", str(questions), "--alm-max-new-tokens", "4", "--max-new-tokens", "12", "--retries", "1",
            "--workers", "1", "--threads", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "questions.txt"
    path.write_text("What sound events do you hear?\nIs there speech or music?\n")
    return path


@pytest.fixture(scope="module")
def captioned(small_input, caption_models, questions, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("captioned") / "out"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["caption", str(small_input), "--out", str(out), *_args(caption_models, questions)]) == 0
    return out, stdout.getvalue()


def _samples(root: Path) -> dict[str, list[dict]]:
    return {split.name: [s for tar in sorted(split.glob("*.tar")) for s in iter_shard(tar)]
            for split in sorted(root.iterdir()) if (split / "sizes.json").is_file()}


def test_the_output_is_the_input_with_the_new_fields(small_input, captioned):
    out, stdout = captioned
    before, after = _samples(small_input), _samples(out)
    assert list(before) == list(after) == ["train", "valid"]
    for split in before:
        assert read_sizes(out / split) == read_sizes(small_input / split)
        assert [s["__key__"] for s in after[split]] == [s["__key__"] for s in before[split]]  # order kept
        for old, new in zip(before[split], after[split]):
            assert new["flac"] == old["flac"]  # audio bytes verbatim
            meta, original = json.loads(new["json"]), json.loads(old["json"])
            assert {k: v for k, v in meta.items() if k not in ("text_llm", "alm_answers", "caption_scores")} == original
            assert isinstance(meta["text_llm"], list) and isinstance(meta["caption_scores"], list)
            if old["__key__"] == "local-broken":
                assert meta["alm_answers"] == [] and meta["text_llm"] == [] == meta["caption_scores"]
                continue
            # One window (clips under 30 s), two questions: two answers, each with its window.
            assert [(a["start"], a["question"]) for a in meta["alm_answers"]] == [
                (0.0, "What sound events do you hear?"), (0.0, "Is there speech or music?")]
            assert meta["alm_answers"][0]["end"] == pytest.approx(original["duration"], abs=0.01)
            for entry in meta["caption_scores"]:
                assert set(entry) == {"text", "score", "kept", "attempt", "outcome"}
                assert entry["outcome"] in t.CANDIDATE_OUTCOMES and entry["attempt"] in (0, 1)
                assert len(entry["text"]) <= 1000
            assert meta["text_llm"] == [e["text"] for e in meta["caption_scores"] if e["kept"]][:1]


def test_a_captioned_build_verifies_and_long_clips_are_windowed(two_shard_build, caption_models, tmp_path):
    out, question = tmp_path / "out", tmp_path / "q.json"
    question.write_text('["What do you hear?"]')
    assert main(["caption", str(two_shard_build), "--out", str(out), "--steps", "listen", "--alm-model",
                 str(caption_models["alm"]), "--questions", str(question), "--alm-max-new-tokens", "2",
                 "--workers", "1", "--no-progress"]) == 0
    assert main(["verify", str(out)]) == 0
    metas = [json.loads(s["json"]) for samples in _samples(out).values() for s in samples]
    waltz = next(m for m in metas if "waltz" in m["source_id"])  # 49.2 s: two windows
    assert [(a["start"], a["end"]) for a in waltz["alm_answers"]] == [(0.0, 30.0), (30.0, 49.2)]
    rows = pq.read_table(out / "caption_manifest.parquet").to_pylist()
    assert {r["status"] for r in rows} == {t.LISTENED} and len(rows) == 10


def test_the_manifest_names_one_outcome_per_sample_and_the_counts_add_up(captioned):
    out, stdout = captioned
    rows = pq.read_table(out / "caption_manifest.parquet").to_pylist()
    assert len(rows) == 5 and all(r["status"] in t.OUTCOMES for r in rows)
    by_key = {r["key"]: r for r in rows}
    assert by_key["local-broken"]["status"] == t.NO_AUDIO
    counts = {status: sum(r["status"] == status for r in rows) for status in t.OUTCOMES}
    assert "caption: 5 sample(s) (" in stdout and sum(counts.values()) == 5
    for status, n in counts.items():
        assert (f"{n} {status}" in stdout) == (n > 0)
    for row in rows:
        if row["status"] == t.NO_AUDIO:
            continue
        assert row["reference_score"] is not None  # the sample's own text, scored by the same model
        assert (row["status"] == t.CAPTIONED) == bool(row["captions"])
        # The AudioSetCaps rule: a kept caption scores at least the sample's text.
        scores = dict(zip(row["candidates"], row["scores"]))
        assert all(scores[c] >= row["reference_score"] for c in row["captions"])
        if row["status"] == t.REJECTED_BY_CLAP:  # rewritten once (--retries 1), nothing passed
            assert set(row["attempts"]) == {0, 1}
            assert all(s < row["reference_score"] for s in row["scores"] if s is not None)


def test_clap_train_draws_from_text_and_text_llm(captioned):
    """`clap-train --caption-fields text,text_llm`: one caption uniformly among both fields (as
    text_augment_all is drawn); a sample with no kept caption trains on its own text."""
    import random

    from clap_model.data import choose_captions

    out, _ = captioned
    metas = [json.loads(s["json"]) for samples in _samples(out).values() for s in samples]
    rng = random.Random(0)
    for meta in metas:
        pool = meta["text"] + meta["text_llm"]
        drawn = {choose_captions(meta, ("text", "text_llm"), rng)[0] for _ in range(60)}
        assert drawn == set(pool)
    assert any(meta["text_llm"] for meta in metas) and any(not meta["text_llm"] for meta in metas)


def test_run_json_and_provenance_record_models_prompts_and_decoding(captioned, caption_models):
    out, _ = captioned
    settings = json.loads((out / ".caption" / "run.json").read_text())["settings"]
    assert settings["steps"] == ["listen", "write", "check"]
    assert settings["listen"]["revision"].startswith("sha256:") and settings["listen"]["model_type"] == "qwen2_audio"
    assert settings["listen"]["questions_sha256"].startswith("sha256:")
    assert settings["listen"]["decoding"] == {"do_sample": False, "max_new_tokens": 4}
    assert len(settings["write"]["prompt_sha256"]) >= 64 and settings["write"]["decoding"]["max_new_tokens"] == 12
    assert settings["check"]["model"]["digest"] and settings["check"]["retries"] == 1
    run = json.loads((out / "provenance.json").read_text())["runs"][-1]
    assert run["stage"] == "caption" and run["options"]["write"] == settings["write"]


def test_a_rerun_resumes_and_equals_a_clean_run(small_input, captioned, caption_models, questions, tmp_path):
    """A run that lost its last shards (as a killed one does) finishes them, equal to a clean run."""
    out, _ = captioned
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    (copy / ".caption" / "parts" / "valid" / "000000.parquet").unlink()
    (copy / "valid" / "000000.tar").unlink()
    for name in ("caption_manifest.parquet", "manifest.parquet"):
        (copy / name).unlink(missing_ok=True)
    assert main(["caption", str(small_input), "--out", str(copy), *_args(caption_models, questions)]) == 0
    for tar in sorted(out.rglob("*.tar")):
        assert (copy / tar.relative_to(out)).read_bytes() == tar.read_bytes(), tar
    assert pq.read_table(copy / "caption_manifest.parquet").equals(pq.read_table(out / "caption_manifest.parquet"))


def test_other_settings_into_the_same_out_are_refused(small_input, captioned, caption_models, questions, capsys):
    out, _ = captioned
    assert main(["caption", str(small_input), "--out", str(out),
                 *_args(caption_models, questions, "--num-captions", "2")]) == 2
    assert "other settings (num_captions)" in capsys.readouterr().err


def test_usage_mistakes_are_one_line_and_exit_2(small_input, caption_models, questions, tmp_path, capsys):
    out = str(tmp_path / "out")
    cases = [
        (["--alm-model", str(caption_models["alm"])], "needs --llm or --llm-url (write) and --clap-checkpoint"),
        (["--steps", "listen,check", "--alm-model", str(caption_models["alm"])], "--steps check needs write"),
        (["--steps", "listen,speak"], "--steps: a comma-separated subset"),
        (["--steps", "listen", "--alm-model", str(caption_models["llm"])], "is not an audio-language model"),
        (["--steps", "listen", "--questions", str(tmp_path / "none.txt")], "--questions"),
    ]
    if not vllm_available():  # where it is, tests/test_caption_vllm.py runs it
        cases.append((["--steps", "listen", "--alm-model", str(caption_models["alm"]), "--engine", "vllm"],
                      "--engine vllm: vllm is not installed"))
    for args, message in cases:
        capsys.readouterr()
        assert main(["caption", str(small_input), "--out", out, *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not Path(out).exists()


def test_a_locked_out_is_exit_1(small_input, caption_models, questions, tmp_path, capsys):
    from audio_dataset.lock import hold_output
    from audio_dataset.storage import location

    out = tmp_path / "out"
    with hold_output(location(out), "caption"):
        assert main(["caption", str(small_input), "--out", str(out), "--steps", "listen",
                     "--alm-model", str(caption_models["alm"]), "--no-progress"]) == 1
    assert "caption" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_clean_output(small_input, captioned, caption_models, questions,
                                                               tmp_path):
    """Killed once its first shard is finished, with its Ray workers, then rerun: the finished shards
    are kept, and the output equals a clean run (the `captioned` fixture, run with the same arguments)."""
    clean, _ = captioned
    killed = tmp_path / "killed"
    parts = killed / ".caption" / "parts"  # a shard is finished when its part of the manifest is written
    args = ["caption", str(small_input), *_args(caption_models, questions)]
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "audio_dataset.cli", *args, "--out", str(killed)],
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 300
        while not list(parts.glob("*/*.parquet")) and time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before finishing a shard: {log.read_text()[-2000:]}"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray processes it started
        proc.wait()
    finished = {path: path.stat().st_mtime_ns for path in parts.glob("*/*.parquet")}
    assert 1 <= len(finished) < 3, f"kill landed after {len(finished)} of 3 shards"
    assert main([*args, "--out", str(killed)]) == 0
    assert {path: path.stat().st_mtime_ns for path in finished} == finished  # not done again
    for tar in sorted(clean.rglob("*.tar")):
        assert (killed / tar.relative_to(clean)).read_bytes() == tar.read_bytes(), tar
    assert pq.read_table(killed / "caption_manifest.parquet").equals(pq.read_table(clean / "caption_manifest.parquet"))


def test_write_alone_captions_from_metadata_without_audio(small_input, caption_models):
    """`--steps write` (WavCaps' way: the LLM rewrites the metadata): no audio decoded, so the sample
    whose audio is broken is captioned too; no alm_answers field is added."""
    from audio_dataset.caption.stage import CaptionOptions, CaptionProcessor
    from audio_dataset.caption.write_step import write_step
    from audio_dataset.stage_runner import ShardJob, read_input_shard

    from audio_dataset.cli import make_parser

    args = make_parser().parse_args(["caption", str(small_input), "--out", "unused", "--steps", "write",
                                     "--llm", str(caption_models["llm"]), "--max-new-tokens", "8"])
    processor = CaptionProcessor(CaptionOptions(steps=("write",), write=write_step(args)), None, None, "cpu")
    shard = small_input / "train" / "000001.tar"
    samples = read_input_shard(ShardJob("train", shard.name, str(shard), "", ""))
    new, rows = processor.process(ShardJob("train", shard.name, "", "", ""), samples)
    assert [r["key"] for r in rows] == ["local-broken", samples[1]["__key__"]]
    assert all(r["status"] in (t.CAPTIONED, t.NO_CAPTION) and r["windows"] == 0 for r in rows)
    assert all(r["reference_score"] is None and r["scores"] == [None] * len(r["candidates"]) for r in rows)
    for sample in new:
        meta = json.loads(sample["json"])
        assert "alm_answers" not in meta and isinstance(meta["text_llm"], list)
