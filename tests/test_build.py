"""`audiodata build --source local` end to end on real recordings: shards, manifest, resume, verify."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig
from audio_dataset.build import BuildOptions, build
from audio_dataset.shards import iter_shard, read_sizes, shard_paths
from audio_dataset.source import SourceConfig
from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR, ffmpeg_convert

pytestmark = pytest.mark.usefixtures("ray_local")
CLI = [sys.executable, "-m", "audio_dataset.cli"]


def _build(out: Path, input_path: Path, **kwargs) -> manifest.pa.Table:
    audio = kwargs.pop("audio", AudioConfig())
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(input_path)),
                       audio=audio, progress=False, workers=2, **kwargs))
    return manifest.read_table(out / manifest.MANIFEST_FILE)


def _all_samples(out: Path) -> dict[str, dict]:
    samples = {}
    for split in ("train", "valid", "test"):
        for path in shard_paths(out / split):
            for sample in iter_shard(path):
                samples[sample["__key__"]] = sample
    return samples


@pytest.fixture(scope="module")
def mixed_input(tmp_path_factory) -> Path:
    """The real clips plus bad files a user's folder really holds."""
    folder = tmp_path_factory.mktemp("mixed")
    for path in REAL_AUDIO_DIR.iterdir():
        shutil.copy(path, folder / path.name)
    robin = REAL_AUDIO_DIR / "456440__inspectorj__bird-whistling-robin-single-13.ogg"
    ffmpeg_convert(robin, folder / "robin copy.mp3")  # a space in the name, another format
    (folder / "notes.wav").write_bytes(b"<html>this is not audio</html>")
    (folder / "empty.flac").write_bytes(b"")
    whale = (REAL_AUDIO_DIR / "glacier-bay-humpback.ogg").read_bytes()
    (folder / "cut.ogg").write_bytes(whale[: len(whale) // 3])
    soundfile.write(folder / "silence.wav", np.zeros(48_000, np.float32), 48_000)
    soundfile.write(folder / "blip.wav", np.full(4_800, 0.1, np.float32), 48_000)
    return folder


def test_folder_build_counts_add_up(tmp_path: Path, mixed_input: Path) -> None:
    out = tmp_path / "out"
    table = _build(out, mixed_input, samples_per_shard=4)
    rows = {r["source_id"]: r for r in table.to_pylist()}
    assert len(rows) == 16  # every input file has exactly one row
    assert {k: (r["status"], r["error"]) for k, r in rows.items() if r["status"] != "ok"} == {
        "notes.wav": ("failed", "not_audio"),
        "empty.flac": ("failed", "empty"),
        "cut.ogg": ("failed", "truncated"),
        "silence.wav": ("dropped", "silent"),
        "blip.wav": ("dropped", "too_short"),
    }
    samples = _all_samples(out)
    assert len(samples) == 11 == sum(r["n_samples"] for r in rows.values())
    assert verify(out).ok
    sizes = {**read_sizes(out / "train")}
    assert sum(sizes.values()) == sum(1 for r in rows.values() if r["split"] == "train" and r["status"] == "ok")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["by_status"] == {"ok": 11, "dropped": 2, "failed": 3, "excluded": 0}
    assert stats["by_reason"] == {"empty": 1, "not_audio": 1, "silent": 1, "too_short": 1, "truncated": 1}
    ok_hours = sum(r["output_duration"] for r in rows.values()) / 3600
    assert stats["hours_out"] == pytest.approx(ok_hours, abs=1e-4)


def test_sample_json_and_audio_are_what_laion_clap_reads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    table = _build(out, REAL_AUDIO_DIR)
    robin = next(r for r in table.to_pylist() if r["source_id"].startswith("456440"))
    sample = _all_samples(out)[robin["sample_keys"][0]]
    meta = json.loads(sample["json"])
    assert meta["text"] == ["A single chirping call of an English robin bird."]
    assert meta["tag"] == ["bird", "robin", "chirp"]
    assert meta["source_id"] == "456440__inspectorj__bird-whistling-robin-single-13.ogg"
    assert (meta["license"], meta["author"], meta["sample_rate"], meta["channels"]) == ("CC-BY 3.0", "InspectorJ", 48_000, 1)
    assert meta["original_data"]["description"].startswith("Bird Whistling, Robin")
    assert meta["segment"] is None
    audio, rate = soundfile.read(io.BytesIO(sample["flac"]))
    assert rate == 48_000 and abs(len(audio) / rate - meta["duration"]) < 1e-3
    assert "." not in robin["sample_keys"][0] and "/" not in robin["sample_keys"][0]
    import hashlib
    assert robin["sha256"] == hashlib.sha256((REAL_AUDIO_DIR / meta["source_id"]).read_bytes()).hexdigest()


def test_tar_members_are_bare_keys_kept_together(tmp_path: Path) -> None:
    import tarfile

    out = tmp_path / "out"
    _build(out, REAL_AUDIO_DIR, split_ratios={"train": 1.0})
    with tarfile.open(shard_paths(out / "train")[0]) as tar:
        names = tar.getnames()
    assert all("/" not in n for n in names)
    stems = [n.split(".")[0] for n in names]
    assert stems[0::2] == stems[1::2]  # flac and json of one sample stand together
    assert len(set(stems)) == len(stems) // 2


def test_segments_are_samples_with_inherited_captions(tmp_path: Path) -> None:
    out = tmp_path / "out"
    audio = AudioConfig(max_seconds=20.0, long_clips="segment", segment_seconds=10.0, min_seconds=1.0)
    table = _build(out, REAL_AUDIO_DIR, audio=audio)
    whale = next(r for r in table.to_pylist() if r["source_id"] == "glacier-bay-humpback.ogg")
    assert whale["n_samples"] == 7  # 64.8 s -> six full 10 s segments and a 4.8 s tail
    samples = _all_samples(out)
    metas = [json.loads(samples[k]["json"]) for k in whale["sample_keys"]]
    assert [m["segment"] for m in metas][:2] == [[0.0, 10.0], [10.0, 20.0]]
    assert metas[-1]["segment"][1] == pytest.approx(64.809, abs=0.01)
    assert all(m["text"] == ["A humpback whale singing underwater in Glacier Bay."] for m in metas)
    short = next(r for r in table.to_pylist() if r["source_id"].startswith("456440"))
    assert short["n_samples"] == 1 and json.loads(samples[short["sample_keys"][0]]["json"])["segment"] is None
    assert verify(out).ok


def test_splits_are_stable_and_follow_ratios(tmp_path: Path) -> None:
    a = _build(tmp_path / "a", REAL_AUDIO_DIR, split_ratios={"train": 0.5, "valid": 0.25, "test": 0.25})
    b = _build(tmp_path / "b", REAL_AUDIO_DIR, split_ratios={"train": 0.5, "valid": 0.25, "test": 0.25},
               samples_per_shard=3)
    split_a = {r["source_id"]: r["split"] for r in a.to_pylist()}
    assert split_a == {r["source_id"]: r["split"] for r in b.to_pylist()}
    assert set(split_a.values()) == {"train", "valid", "test"}


def test_csv_input_with_captions_tags_and_own_split(tmp_path: Path) -> None:
    clips = sorted(p.name for p in REAL_AUDIO_DIR.glob("*.ogg"))[:3]
    shutil.copytree(REAL_AUDIO_DIR, tmp_path / "audio")
    pd.DataFrame({
        "path": [f"audio/{c}" for c in clips] + ["audio/missing.ogg"],
        "caption": ['["first caption", "second caption"]', "a plain caption", "third", "gone"],
        "tags": ["a;b", "", "c", ""],
        "split": ["test", "", "", ""],
    }).to_csv(tmp_path / "items.csv", index=False)
    table = _build(tmp_path / "out", tmp_path / "items.csv", split_ratios={"train": 1.0})
    rows = {r["source_id"]: r for r in table.to_pylist()}
    assert rows["audio/missing.ogg"]["error"] == "missing_file"
    first = rows[f"audio/{clips[0]}"]
    assert first["split"] == "test"
    meta = json.loads(_all_samples(tmp_path / "out")[first["sample_keys"][0]]["json"])
    assert meta["text"] == ["first caption", "second caption"] and meta["tag"] == ["a", "b"]


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.tar"))} | {
        str(p.relative_to(out)): p.read_bytes() for p in [*sorted(out.glob("*/sizes.json")),
                                                           *sorted(out.glob("*/SHA256SUMS"))]}


def _manifest_rows(out: Path) -> list[dict]:
    return sorted(manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist(), key=lambda r: r["source_id"])


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_resume_after_kill_9_equals_a_clean_run(tmp_path: Path, mixed_input: Path) -> None:
    args = ["build", "--source", "local", "--input", str(mixed_input), "--samples-per-shard", "1",
            "--workers", "1", "--no-progress"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*CLI, *args, "--out", str(killed)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = killed / "_work" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("train-*.parquet"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-run
    proc.wait()
    done_before = len(list(parts.glob("*-*.parquet")))
    assert 3 <= done_before < 16, "the kill should land mid-run"
    assert not (killed / manifest.MANIFEST_FILE).exists()

    resumed = subprocess.run([*CLI, *args, "--out", str(killed)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    clean = tmp_path / "clean"
    _build(clean, mixed_input, samples_per_shard=1)
    assert _tree(killed) == _tree(clean)
    assert _manifest_rows(killed) == _manifest_rows(clean)
    assert not list(killed.rglob(".*.tmp-*")), "no temp file is left behind"
    assert verify(killed).ok


def test_rerun_with_other_options_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(out, REAL_AUDIO_DIR, limit=2)
    result = subprocess.run([*CLI, "build", "--source", "local", "--input", str(REAL_AUDIO_DIR), "--out", str(out),
                             "--limit", "2", "--sample-rate", "16000"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "built with other options (audio.sample_rate was 48000, now 16000)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_that_cannot_start_leaves_the_output_free(tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = subprocess.run([*CLI, "build", "--source", "local", "--input", str(tmp_path / "nope"), "--out",
                              str(out)], capture_output=True, text=True)
    assert missing.returncode == 2 and "input not found" in missing.stderr
    _build(out, REAL_AUDIO_DIR, limit=2)  # the corrected command is not refused as "other options"
    assert verify(out).ok


def test_verify_catches_a_corrupted_shard(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(out, REAL_AUDIO_DIR, split_ratios={"train": 1.0}, samples_per_shard=5)
    first, second = shard_paths(out / "train")
    data = bytearray(first.read_bytes())
    data[2048:2560] = bytes(512)  # zero a block inside the first FLAC payload
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:5000])  # and cut the other shard short
    result = subprocess.run([*CLI, "verify", str(out)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "train/000000.tar" in result.stdout and "train/000001.tar" in result.stdout
    assert "problem(s)" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["build", "--source", "local", "--out", "X"], "needs --input"),
        (["build", "--source", "local", "--input", "/nonexistent/dir", "--out", "X"], "input not found"),
        (["build", "--source", "nosuch", "--input", ".", "--out", "X"], "unknown source 'nosuch'"),
        (["build", "--source", "local", "--input", ".", "--out", "X", "--long-clips", "truncate"], "needs --max-seconds"),
        (["verify", "/nonexistent/out"], "/nonexistent/out does not exist"),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    argv = [str(tmp_path / a) if a == "X" else a for a in argv]
    result = subprocess.run([*CLI, *argv], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_stats_command_prints_figures_and_writes_a_plot(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(out, REAL_AUDIO_DIR)
    result = subprocess.run([*CLI, "stats", str(out), "--json"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["by_status"]["ok"] == 10
    png = (out / "stats.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_sources_lists_local_with_built_counts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _build(out, REAL_AUDIO_DIR, limit=3)
    result = subprocess.run([*CLI, "sources", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("local "))
    assert " 3 " in line and "ready" in line


def test_shards_load_in_the_webdataset_library(tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "out"
    table = _build(out, REAL_AUDIO_DIR, split_ratios={"train": 1.0}, samples_per_shard=4)
    urls = [str(p) for p in shard_paths(out / "train")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert sorted(s["__key__"] for s in samples) == sorted(k for r in table.to_pylist() for k in r["sample_keys"])
    assert all(isinstance(s["json"], dict) and s["json"]["text"] for s in samples)
