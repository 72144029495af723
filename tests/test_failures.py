"""Finding what failed, and runs that fail as a whole: `audiodata failures`, the report's item list,
a full disk (one line, exit 1, no temp files, a rerun resumes), SIGTERM (one line, resumable), and
the small things a user hits at the command line."""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.build import BuildOptions, build
from audio_dataset.cli import make_parser
from audio_dataset.source import SourceConfig
from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR

CLI = [sys.executable, "-m", "audio_dataset.cli"]
ROBIN = "456440__inspectorj__bird-whistling-robin-single-13"
HEADER = "status\treason\tsource\tsource_id\turl\tshard\tdetail"


def _run(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, argv)], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> Path:
    """Two real clips and three files a build does not keep, for two reasons."""
    folder = tmp_path_factory.mktemp("input")
    for stem in (ROBIN, "198-209-0000"):
        for path in REAL_AUDIO_DIR.glob(f"{stem}.*"):
            shutil.copy(path, folder / path.name)
    (folder / "notes.wav").write_bytes(b"<html>this is not audio</html>")
    (folder / "empty.flac").write_bytes(b"")
    soundfile.write(folder / "blip.wav", np.full(4_800, 0.1, np.float32), 48_000)
    out = tmp_path_factory.mktemp("built") / "out"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(folder)),
                       workers=2, progress=False))
    return out


def test_failures_lists_every_item_not_kept_by_name(built: Path) -> None:
    table = manifest.read_table(built / manifest.MANIFEST_FILE).to_pylist()
    not_kept = {r["source_id"]: r for r in table if r["status"] != manifest.STATUS_OK}
    assert set(not_kept) == {"notes.wav", "empty.flac", "blip.wav"}
    result = _run("failures", built)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == HEADER and len(lines) == 4
    listed = {line.split("\t")[3]: line.split("\t") for line in lines[1:]}
    assert set(listed) == set(not_kept)
    for source_id, cells in listed.items():
        row = not_kept[source_id]
        assert cells[:3] == [row["status"], row["error"], "local"]
        assert cells[5] == (row["shard"] or "")
    assert listed["blip.wav"][:2] == ["dropped", "too_short"]

    only = _run("failures", built, "--reason", "too_short")
    assert only.stdout.splitlines() == [HEADER, "\t".join(listed["blip.wav"])]
    failed_reasons = sorted({not_kept[s]["error"] for s in ("notes.wav", "empty.flac")})
    both = _run("failures", built, *[a for r in failed_reasons for a in ("--reason", r)])
    assert {line.split("\t")[3] for line in both.stdout.splitlines()[1:]} == {"notes.wav", "empty.flac"}

    none = _run("failures", built, "--reason", "too_long")
    assert none.returncode == 0 and none.stdout.splitlines() == [HEADER]
    assert "no item has reason too_long" in none.stderr and "too_short" in none.stderr


def test_the_report_names_the_items_not_kept(built: Path, tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    result = _run("report", built, "--out", page, "--samples", "1")
    assert result.returncode == 0, result.stderr
    html = page.read_text()
    listing = html[html.index("<details id=failures"):html.index("</details>", html.index("<details id=failures"))]
    for source_id in ("notes.wav", "empty.flac", "blip.wav"):
        assert f"<td>{source_id}</td>" in listing
    assert "too_short" in listing and ROBIN not in listing


def test_the_end_summary_says_how_to_list_them(tmp_path: Path, ray_local: None, capsys) -> None:
    folder = tmp_path / "input"
    folder.mkdir()
    shutil.copy(REAL_AUDIO_DIR / f"{ROBIN}.ogg", folder)
    (folder / "notes.wav").write_bytes(b"not audio")
    out = tmp_path / "out"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(folder)), progress=False))
    assert f"list them: audiodata failures {out}" in capsys.readouterr().out
    stats = _run("stats", out)
    assert f"list them: audiodata failures {out}" in stats.stdout


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs: a real full disk, where the test may mount one (root, and a kernel that lets it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _resume(out: Path) -> None:
    """The same build as the CLI's, in this process (its Ray is up already)."""
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(REAL_AUDIO_DIR)),
                       samples_per_shard=1, workers=2, progress=False))
    assert verify(out).ok
    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    assert len(rows) == 10 and all(r["status"] == manifest.STATUS_OK for r in rows)


def test_a_full_disk_is_one_line_exit_1_and_leaves_no_temp_files(small_disk: Path, ray_local: None) -> None:
    out = small_disk / "out"
    args = ["build", "--source", "local", "--input", REAL_AUDIO_DIR, "--out", out, "--samples-per-shard", "1",
            "--workers", "2", "--no-progress"]
    full = _run(*args)
    assert full.returncode == 1, full.stderr
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0] and "rerun" in lines[0], full.stderr
    assert not list(out.rglob(".*.tmp-*")), "temp files are removed"
    assert not (out / manifest.MANIFEST_FILE).exists()

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    _resume(out)


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_is_one_line_and_the_rerun_resumes(tmp_path: Path, ray_local: None) -> None:
    out = tmp_path / "out"
    args = ["build", "--source", "local", "--input", str(REAL_AUDIO_DIR), "--out", str(out),
            "--samples-per-shard", "1", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = out / "_work" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*-*.parquet"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` or a scheduler does
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == ["audiodata: interrupted (SIGTERM); rerun the same command to resume"]
    done = len(list(parts.glob("*-*.parquet")))
    assert 2 <= done < 10 and not (out / manifest.MANIFEST_FILE).exists()
    assert not list(out.rglob(".*.tmp-*")) and not (out / ".audiodata.lock").exists()

    _resume(out)


# --------------------------------------------------------------------------- small things


def _parsers(parser: argparse.ArgumentParser, name: str = "audiodata") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def test_every_option_has_help_and_help_shows_defaults() -> None:
    from clap_model.export import parser as clap_export_parser
    from clap_model.params import eval_parser, train_parser

    clap = [(parser.prog, parser) for parser in (train_parser(), eval_parser(), clap_export_parser())]
    missing = [f"{name} {action.option_strings or action.dest}" for name, parser in [*_parsers(make_parser()), *clap]
               for action in parser._actions
               if not action.help and not isinstance(action, argparse._SubParsersAction)]
    assert not missing, missing
    text = _run("build", "--help").stdout
    assert "(default: 48000)" in text and "(default: 256)" in text and "(default: None)" not in text


def test_a_rerun_with_other_options_names_the_values(tmp_path: Path, ray_local: None) -> None:
    out = tmp_path / "out"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(REAL_AUDIO_DIR)), limit=1,
                       progress=False))
    result = _run("build", "--source", "local", "--input", REAL_AUDIO_DIR, "--out", out, "--limit", "2",
                  "--sample-rate", "16000")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "audio.sample_rate was 48000, now 16000" in result.stderr and "limit was 1, now 2" in result.stderr


@pytest.mark.parametrize("command", ["stats", "failures", "sources"])
def test_output_into_a_closed_pipe_ends_quietly(built: Path, command: str) -> None:
    # `audiodata stats OUT | head`: the reader is gone before the output is written.
    read_end, write_end = os.pipe()
    os.close(read_end)
    argv = [command] if command == "sources" else [command, str(built)]
    result = subprocess.run([*CLI, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE
    assert "Traceback" not in result.stderr and "Broken pipe" not in result.stderr
    assert "Exception ignored" not in result.stderr


def test_sources_shows_each_licence_whole() -> None:
    from audio_dataset.source import available_sources, read_definition

    text = _run("sources").stdout
    for name in available_sources():
        line = next(l for l in text.splitlines() if l.startswith(f"{name} "))
        assert line.endswith(read_definition(name)["license"])


def test_ctrl_c_during_the_listing_does_not_claim_the_output(tmp_path: Path, ray_local: None,
                                                             monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from audio_dataset.cli import main
    from pipelines.local import LocalSource

    listed = LocalSource.list_items

    def interrupted_listing(self):
        yield from list(listed(self))[:3]
        raise KeyboardInterrupt  # the user's Ctrl-C, mid-listing

    out = tmp_path / "out"
    argv = ["build", "--source", "local", "--input", str(REAL_AUDIO_DIR), "--out", str(out), "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setattr(LocalSource, "list_items", interrupted_listing)
        assert main([*argv, "--sample-rate", "16000"]) == 130
    assert "interrupted; rerun" in capsys.readouterr().err
    assert not (out / "_work" / "config.json").exists() and not (out / "_work" / "index.parquet").exists()
    assert not (out / ".audiodata.lock").exists()
    # Other options are not refused: the interrupted command never claimed the folder.
    assert main([*argv, "--limit", "2"]) == 0
    assert verify(out).ok
