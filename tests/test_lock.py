"""One writer per output: a second build or k2c into a held --out is refused in one line naming the
holder; a dead holder's lock (a killed process, a stale object-storage lease) is taken over."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audio_dataset import lock
from audio_dataset.cli import main
from audio_dataset.lock import LOCK_FILE, Holder, OutputLocked, hold_output
from audio_dataset.shards import ShardWriter, write_sizes
from audio_dataset.storage import location
from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR
from conftest import BUCKET

CLI = [sys.executable, "-m", "audio_dataset.cli"]


def _build_cmd(out: Path | str) -> list[str]:
    return [*CLI, "build", "--source", "local", "--input", str(REAL_AUDIO_DIR), "--out", str(out),
            "--limit", "2", "--workers", "1", "--no-progress"]


def _assert_refused(result: subprocess.CompletedProcess, stage: str) -> None:
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "is being written by" in result.stderr and f"`{stage}` (pid {os.getpid()}" in result.stderr
    assert socket.gethostname() in result.stderr


def _k2c_input(root: Path) -> Path:
    """A one-sample build output (k2c reads only tar + sizes.json before it takes the lock)."""
    sample = {"__key__": "local_x", "flac": b"fLaC", "json": json.dumps({"text": ["a dog barks"]})}
    with ShardWriter(root / "train" / "000000.tar") as writer:
        writer.write(sample)
    write_sizes(root / "train", {"000000.tar": 1})
    return root


def test_a_second_build_is_refused_naming_the_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with hold_output(location(out), "build"):
        result = subprocess.run(_build_cmd(out), capture_output=True, text=True, timeout=120)
        _assert_refused(result, "build")
        # The refused command claimed nothing: no options pinned, no listing kept.
        assert not (out / "_work" / "config.json").exists() and not (out / "_work" / "index.parquet").exists()
    assert not (out / LOCK_FILE).exists(), "a finished holder removes its lock file"


def test_two_concurrent_builds_the_second_with_other_options(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen([*_build_cmd(out)[:-5], "--samples-per-shard", "1", "--workers", "1", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while (held := Holder.parse((out / LOCK_FILE).read_bytes()) if (out / LOCK_FILE).exists() else None) is None:
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.05)
    second = subprocess.run([*_build_cmd(out), "--sample-rate", "16000"], capture_output=True, text=True,
                            timeout=120)
    assert first.poll() is None, "the first build was still running when the second was refused"
    assert second.returncode == 1 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"is being written by `build` (pid {held.pid} on {socket.gethostname()}" in second.stderr
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    # Only the first build's samples, at its rate: verify checks each against the recorded options.
    assert verify(out).ok and json.loads((out / "_work" / "config.json").read_text())["audio"]["sample_rate"] == 48000


def test_a_second_k2c_is_refused_naming_the_holder(tmp_path: Path) -> None:
    source, out = _k2c_input(tmp_path / "in"), tmp_path / "k2c"
    with hold_output(location(out), "k2c"):
        result = subprocess.run([*CLI, "k2c", str(source), "--out", str(out), "--caption-model", "template",
                                 "--no-progress"], capture_output=True, text=True, timeout=120)
        _assert_refused(result, "k2c")
    assert not (out / ".k2c").exists()


def test_the_same_process_cannot_hold_an_output_twice(tmp_path: Path) -> None:
    out = location(tmp_path / "out")
    with hold_output(out, "build"):
        with pytest.raises(OutputLocked, match="`build`"):
            with hold_output(out, "k2c"):
                pass
    with hold_output(out, "k2c"):  # released: free again
        pass


def _killed_holder(out: Path) -> int:
    """A process that takes the lock and is killed with -9 while holding it; returns its pid."""
    code = ("import sys, time; from audio_dataset.lock import hold_output; from audio_dataset.storage import location\n"
            "with hold_output(location(sys.argv[1]), 'build'):\n    print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def test_a_killed_holders_lock_is_taken_over_by_build_and_k2c(tmp_path: Path, ray_local: None) -> None:
    out = tmp_path / "out"
    dead = _killed_holder(out)
    assert Holder.parse((out / LOCK_FILE).read_bytes()).pid == dead  # the file stays; the flock went with it
    assert main(_build_cmd(out)[3:]) == 0
    assert verify(out).ok and not (out / LOCK_FILE).exists()

    k2c_out = tmp_path / "k2c"
    _killed_holder(k2c_out)
    assert main(["k2c", str(out), "--out", str(k2c_out), "--caption-model", "template", "--no-progress"]) == 0
    assert (k2c_out / "k2c_manifest.parquet").exists() and not (k2c_out / LOCK_FILE).exists()


# --------------------------------------------------------------------------- object storage leases


def _put_lease(key: str, holder: Holder) -> None:
    import boto3

    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=holder.to_bytes())


def _lease(key: str) -> Holder | None:
    import boto3

    try:
        body = boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    except boto3.client("s3").exceptions.NoSuchKey:
        return None
    return Holder.parse(body)


def test_a_live_lease_refuses_a_build_on_object_storage(s3_env: dict[str, str]) -> None:
    elsewhere = Holder("build", host="node-7", pid=4242)
    _put_lease(f"held/{LOCK_FILE}", elsewhere)
    result = subprocess.run(_build_cmd(f"s3://{BUCKET}/held"), capture_output=True, text=True, env=s3_env,
                            timeout=120)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "`build` (pid 4242 on node-7" in result.stderr and "taken over once older than" in result.stderr
    assert _lease(f"held/{LOCK_FILE}").token == elsewhere.token


def test_stale_and_dead_leases_are_taken_over_and_refreshed(s3_env: dict[str, str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "LEASE_REFRESH_S", 0.2)
    monkeypatch.setattr(lock, "LEASE_SETTLE_S", 0.1)
    out = location(f"s3://{BUCKET}/stale")
    key = f"stale/{LOCK_FILE}"
    _put_lease(key, Holder("build", host="node-7", heartbeat=time.time() - lock.LEASE_STALE_S - 5))
    with hold_output(out, "build") as mine:
        first = _lease(key)
        assert first.token == mine.token and first.pid == os.getpid()
        time.sleep(1.0)
        assert _lease(key).heartbeat > first.heartbeat, "the heartbeat thread refreshes the lease"
        with pytest.raises(OutputLocked):  # and while it is fresh nobody else gets in
            with hold_output(out, "k2c"):
                pass
    assert _lease(key) is None, "released: the lease object is deleted"

    # A fresh heartbeat, but from a process on this host that is gone (killed): taken over at once.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _put_lease(key, Holder("build", pid=gone.pid))
    with hold_output(out, "k2c") as mine:
        assert _lease(key).token == mine.token


def test_verify_catches_a_folder_written_with_two_sets_of_options(tmp_path: Path, ray_local: None) -> None:
    """What two unlocked builds left behind: the folder claims 48 kHz, one shard holds 16 kHz."""
    from audio_dataset.shards import CHECKSUMS_FILE, read_checksums

    common = ["--split", "train=1", "--samples-per-shard", "1"]
    assert main([*_build_cmd(tmp_path / "a")[3:], *common]) == 0
    assert main([*_build_cmd(tmp_path / "b")[3:], *common, "--sample-rate", "16000"]) == 0
    assert verify(tmp_path / "a").ok and verify(tmp_path / "b").ok
    with hold_output(location(tmp_path / "a"), "build"):  # a reader says the output may still change
        held = subprocess.run([*CLI, "verify", str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    assert held.returncode == 0 and f"is being written by `build` (pid {os.getpid()}" in held.stderr
    shutil.copy(tmp_path / "b" / "train" / "000001.tar", tmp_path / "a" / "train" / "000001.tar")
    # The 16 kHz writer recorded its own shard's checksum, as a concurrent build would have.
    sums = read_checksums(tmp_path / "a" / "train")
    sums["000001.tar"] = read_checksums(tmp_path / "b" / "train")["000001.tar"]
    (tmp_path / "a" / "train" / CHECKSUMS_FILE).write_text("".join(f"{v}  {k}\n" for k, v in sorted(sums.items())))
    problems = verify(tmp_path / "a").problems
    assert len(problems) == 1 and "train/000001.tar:" in problems[0]
    assert problems[0].endswith("JSON sample_rate 16000, the build's options say 48000")
