"""Damaged shards: a truncated tar, a FLAC that lost sync, an edit that still decodes. Every reader
names the damaged shard in one line; `verify` catches the edit by the sha256 kept at write time."""
from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from audio_dataset.shards import CHECKSUMS_FILE, DamagedShard, iter_shard, read_checksums, shard_paths
from audio_dataset.verify import verify

CLI = [sys.executable, "-m", "audio_dataset.cli"]


@pytest.fixture(scope="module")
def built(two_shard_build: Path) -> Path:
    return two_shard_build


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(built, out)
    return out


def _member(shard: Path, suffix: str) -> tarfile.TarInfo:
    with tarfile.open(shard) as tar:
        return next(m for m in tar.getmembers() if m.name.endswith(suffix))


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=120)


def _one_line_naming(stderr: str, shard: str) -> None:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if "damaged shard" in line]
    assert len(lines) == 1 and shard in lines[0], stderr


def test_checksums_are_those_of_the_shards_as_written(built: Path) -> None:
    sums = read_checksums(built / "train")
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_paths(built / "train")}
    # The file is what `sha256sum -c` reads.
    line = (built / "train" / CHECKSUMS_FILE).read_text().splitlines()[0]
    assert line == f"{sums['000000.tar']}  000000.tar"
    assert verify(built).ok


def test_k2c_outputs_keep_checksums_too(built: Path, tmp_path: Path) -> None:
    from audio_dataset.cli import main

    out = tmp_path / "k2c"
    assert main(["k2c", str(built), "--out", str(out), "--caption-model", "template", "--no-progress"]) == 0
    sums = read_checksums(out / "train")
    assert sums == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_paths(out / "train")}
    assert sums != read_checksums(built / "train")  # new JSON members: new shards, their own checksums
    assert not list(out.rglob(".*.sha256")) and not list(built.rglob(".*.sha256")), "recorded ones are listed"
    assert verify(out).ok


def test_a_truncated_shard_is_named_by_stats_report_and_verify(copy: Path) -> None:
    shard = copy / "train" / "000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DamagedShard, match="000001.tar"):
        list(iter_shard(shard))

    stats = _run("stats", str(copy))
    assert stats.returncode == 0 and "total" in stats.stdout  # the figures come from the manifest
    _one_line_naming(stats.stderr, "train/000001.tar")

    report = _run("report", str(copy), "--samples", "10")
    assert report.returncode == 0
    _one_line_naming(report.stderr, "train/000001.tar")
    page = (copy / "report.html").read_text()
    damaged = page[page.index("<section id=damaged>"):]
    assert "<td>train/000001.tar</td><td>damaged</td>" in damaged and "000000.tar" not in damaged

    check = _run("verify", str(copy))
    assert check.returncode == 1 and "train/000001.tar: unreadable tar" in check.stdout


def test_a_flac_that_lost_sync_is_named_by_report_and_verify(copy: Path) -> None:
    shard = copy / "train" / "000000.tar"
    flac = _member(shard, ".flac")
    data = bytearray(shard.read_bytes())
    for at in range(flac.offset_data + 8000, flac.offset_data + flac.size - 100, 3000):
        data[at:at + 40] = b"\x55" * 40  # the frames no longer parse: libFLAC loses sync
    shard.write_bytes(bytes(data))

    report = _run("report", str(copy), "--samples", "10")
    assert report.returncode == 0
    _one_line_naming(report.stderr, "train/000000.tar")
    assert "lost sync" in report.stderr
    check = _run("verify", str(copy))
    assert check.returncode == 1
    key = flac.name.removesuffix(".flac")
    assert f"train/000000.tar:{key}: FLAC does not decode" in check.stdout
    assert f"train/000000.tar: sha256 differs from {CHECKSUMS_FILE}" in check.stdout


def test_verify_catches_an_edit_that_still_decodes(copy: Path) -> None:
    shard = copy / "train" / "000000.tar"
    meta = _member(shard, ".json")
    data = bytearray(shard.read_bytes())
    body = bytes(data[meta.offset_data:meta.offset_data + meta.size])
    at = body.index(b'"text": ["') + len(b'"text": ["')
    assert chr(body[at]).isalpha()
    edited = body[:at] + bytes([body[at] ^ 0x20]) + body[at + 1:]  # one caption letter's case: same length
    data[meta.offset_data:meta.offset_data + meta.size] = edited
    shard.write_bytes(bytes(data))
    # Still a valid shard of valid samples: only the checksum tells.
    samples = list(iter_shard(shard))
    assert len(samples) == 5 and all(io.BytesIO(s["flac"]).read(4) == b"fLaC" for s in samples)

    report = verify(copy)
    assert report.problems == [f"train/000000.tar: sha256 differs from {CHECKSUMS_FILE}: changed after it was written"]
