"""`audiodata build --retry-failed`: a finished build's transiently failed items, retried against the
loopback fault server, land in new shards numbered after the existing ones; the manifest, sizes.json,
SHA256SUMS, stats and provenance follow; a rerun retries only what still failed; a kill -9 mid-retry
leaves the old dataset and a rerun finishes it; `verify` passes after each."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig
from audio_dataset.build import BuildOptions, build
from audio_dataset.retry import parse_reasons, retry_failed
from audio_dataset.shards import read_checksums, read_sizes
from audio_dataset.source import SourceConfig, UserError
from audio_dataset.stats import compute_stats
from audio_dataset.verify import verify
from loopback import LoopbackServer, Request, Response
from test_source_bbc import CATALOGUE, to_wav

pytestmark = pytest.mark.usefixtures("ray_local")
CLI = [sys.executable, "-m", "audio_dataset.cli"]
# One retry per fetch: a fault queued twice fails the item, queued once more it fails the next try.
FAST = {"http_retries": "1", "http_backoff_base": "0.01", "http_backoff_cap": "0.02", "http_stall_timeout": "5"}
MEDIA = json.loads((CATALOGUE.parent / "media.json").read_text())


@pytest.fixture
def site(loopback: LoopbackServer, real_clips) -> LoopbackServer:
    loopback.add("/assets/BBCSoundEffects.csv", CATALOGUE.read_bytes(), "text/csv")
    for sid, stem in MEDIA.items():
        loopback.add(f"/wav/{sid}.wav", to_wav(real_clips[stem]), "audio/wav")
    return loopback


def _options(site: LoopbackServer, out: Path, per_shard: int) -> BuildOptions:
    return BuildOptions(source="bbc_sound_effects", out=out, progress=False, workers=1,
                        samples_per_shard=per_shard, split_ratios={"train": 1.0}, audio=AudioConfig(),
                        source_config=SourceConfig(base_url=site.url, options=dict(FAST)))


def _rows(out: Path) -> list[dict]:
    return manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()


def _outcomes(out: Path) -> dict[str, tuple[str, str | None, str | None]]:
    return {r["source_id"]: (r["status"], r["error"], r["shard"]) for r in _rows(out)}


def _retry_runs(out: Path) -> list[dict]:
    runs = json.loads((out / "provenance.json").read_text())["runs"]
    return [run["options"]["retry_failed"] for run in runs if "retry_failed" in run["options"]]


def _stats_match(out: Path) -> bool:
    """stats.json counts the manifest as it is now."""
    table = manifest.read_table(out / manifest.MANIFEST_FILE)
    return json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(compute_stats(table)))


def _requests(site: LoopbackServer, sid: str) -> int:
    return len(site.requests_to(f"/wav/{sid}.wav"))


def test_retry_redoes_transient_failures_into_new_shards(site, tmp_path, capsys):
    site.fault("/wav/07076051.wav", "404", times=None)      # permanent: never retried by default
    site.fault("/wav/07076050.wav", "503", times=2)         # fails the build, then recovers
    site.fault("/wav/07076047.wav", "reset", times=2)       # a connection error, then recovers
    site.fault("/wav/07076043.wav", "503", times=4)         # fails the build and the first retry
    out = tmp_path / "out"
    options = _options(site, out, per_shard=4)
    build(options)
    assert verify(out).ok
    before = _outcomes(out)
    assert {sid: o[1] for sid, o in before.items() if o[0] == "failed"} == {
        "07076051": "http_404", "07076050": "http_5xx", "07076047": "connection_error", "07076043": "http_5xx",
        "line10": "bad_listing_row"}
    # Shards 0 and 2 (all failed) have no tar; retry shards are numbered after them all the same.
    assert sorted(read_sizes(out / "train")) == ["000001.tar"]
    order = [r["source_id"] for r in _rows(out)]

    retry_failed(options, parse_reasons("transient"))
    assert "retried 3 items: 2 now ok, 1 still failed" in capsys.readouterr().out
    report = verify(out)
    assert report.ok, report.problems
    after = _outcomes(out)
    assert [r["source_id"] for r in _rows(out)] == order  # one row per input, in the same order
    assert after["07076050"] == ("ok", None, "train/000003.tar") and after["07076047"][:2] == ("ok", None)
    assert after["07076043"][:2] == ("failed", "http_5xx")
    assert after["07076051"] == before["07076051"] and after["line10"] == before["line10"]
    assert {sid: after[sid] for sid in after if sid not in ("07076050", "07076047", "07076043")} == \
        {sid: before[sid] for sid in before if sid not in ("07076050", "07076047", "07076043")}
    sizes = read_sizes(out / "train")
    assert sizes["000003.tar"] == 2 and set(read_checksums(out / "train")) == set(sizes)
    assert report.samples == 6 and _stats_match(out)
    assert _retry_runs(out) == [{"attempt": "retry-1", "reasons": sorted(manifest.TRANSIENT_REASONS),
                                 "retried": 3, "succeeded": 2, "dropped": 0, "still_failed": 1}]
    assert _requests(site, "07076051") == 1  # the 404 was not asked for again

    # Again: only what still failed is retried, into the next shard number.
    asked = {sid: _requests(site, sid) for sid in MEDIA}
    retry_failed(options, parse_reasons("transient"))
    assert {sid: _requests(site, sid) - asked[sid] for sid in MEDIA if _requests(site, sid) != asked[sid]} == \
        {"07076043": 1}
    assert _outcomes(out)["07076043"] == ("ok", None, "train/000004.tar")
    assert verify(out).ok and verify(out).samples == 7 and _stats_match(out)
    assert [run["retried"] for run in _retry_runs(out)] == [3, 1]

    # Nothing transient is left; a reason named explicitly is retried (and still fails, one row).
    retry_failed(options, parse_reasons("transient"))
    assert "nothing to retry" in capsys.readouterr().out and len(_retry_runs(out)) == 2
    retry_failed(options, parse_reasons("http_404"))
    assert _requests(site, "07076051") == 2
    assert _outcomes(out)["07076051"][:2] == ("failed", "http_404") and len(_rows(out)) == len(order)
    assert verify(out).ok

    # A plain rerun of the build rewrites its outputs from its parts: the retries' outcomes stay.
    kept = _rows(out)
    build(options)
    assert _rows(out) == kept and verify(out).ok


def test_reasons_are_checked():
    assert parse_reasons("transient") == sorted(manifest.TRANSIENT_REASONS)
    assert parse_reasons("http_404, timeout") == ["http_404", "timeout"]
    assert "http_404" in parse_reasons("transient,http_404")
    for bad in ("too_short", "excluded", "../x", ""):
        with pytest.raises(UserError):
            parse_reasons(bad)


@pytest.mark.parametrize("extra, says", [
    (["--source", "bbc_sound_effects", "--retry-failed", "too_short"], "not a failure"),
    (["--source", "bbc_sound_effects", "--retry-failed", "http_5xx"], "no finished build"),
    (["--recipe", "tiny", "--retry-failed"], "goes with --source"),
])
def test_retry_mistakes_are_one_line(tmp_path, capsys, extra, says):
    from audio_dataset.cli import main

    out = tmp_path / "out"
    assert main(["build", "--out", str(out), "--base-url", "http://127.0.0.1:9", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not out.exists()


def test_retry_needs_a_finished_build_with_the_same_options(site, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no finished build"):
        retry_failed(_options(site, out, per_shard=4), ["http_5xx"])
    assert not out.exists()
    build(_options(site, out, per_shard=4))
    with pytest.raises(UserError, match="other options"):
        retry_failed(_options(site, out, per_shard=2), ["http_5xx"])


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted([*out.glob("*/*.tar"), *out.glob("*/sizes.json"), *out.glob("*/SHA256SUMS"),
                             out / manifest.MANIFEST_FILE, out / "stats.json"])}


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_a_retry_killed_mid_way_is_finished_by_a_rerun(site, tmp_path, real_clips):
    failing = ["07076050", "07076047", "07076043", "07076037"]
    for sid in failing:
        site.fault(f"/wav/{sid}.wav", "503", times=2)
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    build(_options(site, killed, per_shard=1))
    shutil.copytree(killed, clean)
    old = _tree(killed)

    def slow(body: bytes):
        def handler(_request: Request) -> Response:
            time.sleep(1.5)  # long enough for the kill to land between the retry's shards
            return Response(200, body, "audio/wav")
        return handler

    bodies = {sid: to_wav(real_clips[MEDIA[sid]]) for sid in failing}
    for sid in failing:
        site.add_handler(f"/wav/{sid}.wav", slow(bodies[sid]))
    args = [*CLI, "build", "--source", "bbc_sound_effects", "--base-url", site.url, "--out", str(killed),
            "--samples-per-shard", "1", "--splits", "train=1", "--workers", "1", "--no-progress",
            *[a for k, v in FAST.items() for a in ("--source-option", f"{k}={v}")], "--retry-failed"]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = killed / "_work" / "retry-1" / "staged" / "_work" / "parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.parquet"))) < 1 and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-retry
    proc.wait()
    assert 1 <= len(list(parts.glob("*.parquet"))) < len(failing), proc.stderr.read().decode()[-2000:]
    assert _tree(killed) == old and verify(killed).ok  # killed: still the old dataset

    resumed = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for sid in failing:
        site.add(f"/wav/{sid}.wav", bodies[sid], "audio/wav")
    retry_failed(_options(site, clean, per_shard=1), parse_reasons("transient"))
    assert _outcomes(killed) == _outcomes(clean)
    assert read_sizes(killed / "train") == read_sizes(clean / "train")
    assert _tree(killed) == _tree(clean)
    assert verify(killed).ok
    assert [r["status"] for r in _rows(killed) if r["source_id"] in failing] == ["ok"] * 4
    assert len(_retry_runs(killed)) == 1 and _retry_runs(killed)[0]["succeeded"] == 4
    assert not list(killed.rglob(".*.tmp-*"))


def test_a_retry_stopped_while_committing_is_finished_by_the_next(site, tmp_path, monkeypatch):
    import audio_dataset.retry as retry_module

    site.fault("/wav/07076050.wav", "503", times=2)
    out, clean = tmp_path / "out", tmp_path / "clean"
    build(_options(site, out, per_shard=4))
    shutil.copytree(out, clean)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt  # after the shards moved in, before the manifest was rewritten

    monkeypatch.setattr(retry_module, "finalize", killed)
    with pytest.raises(KeyboardInterrupt):
        retry_failed(_options(site, out, per_shard=4), ["http_5xx"])
    state = json.loads((out / "_work" / "retry-1" / "state.json").read_text())
    assert state["phase"] == "committing" and (out / "train" / "000003.tar").exists()
    monkeypatch.undo()

    asked = _requests(site, "07076050")
    build(_options(site, out, per_shard=4))  # a plain rerun of the build takes the committed retry in
    assert _outcomes(out)["07076050"][0] == "ok" and verify(out).ok
    retry_failed(_options(site, out, per_shard=4), ["http_5xx"])  # finishes retry-1, fetches nothing
    assert _requests(site, "07076050") == asked and verify(out).ok
    retry_failed(_options(site, clean, per_shard=4), ["http_5xx"])
    assert _tree(out) == _tree(clean) and _outcomes(out)["07076050"][0] == "ok"
    assert len(_retry_runs(out)) == 1


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_retry_in_object_storage(site, s3_env):
    from conftest import BUCKET

    site.fault("/wav/07076050.wav", "503", times=2)
    out = f"s3://{BUCKET}/retry-out"
    args = [*CLI, "build", "--source", "bbc_sound_effects", "--base-url", site.url, "--out", out,
            "--samples-per-shard", "4", "--splits", "train=1", "--workers", "1", "--no-progress",
            *[a for k, v in FAST.items() for a in ("--source-option", f"{k}={v}")]]
    for argv in (args, [*args, "--retry-failed"]):
        run = subprocess.run(argv, env=s3_env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    assert "retried 1 items: 1 now ok" in run.stdout
    check = subprocess.run([*CLI, "verify", out], env=s3_env, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    rows = {r["source_id"]: r for r in manifest.read_table(f"{out}/{manifest.MANIFEST_FILE}").to_pylist()}
    assert rows["07076050"]["status"] == "ok" and rows["07076050"]["shard"] == "train/000003.tar"
