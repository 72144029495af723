"""A curation stage's output is a dataset every command reads: `verify` passes on it, and `stats`,
`failures`, `report` and `sources` count what its shards hold and name what the stage dropped, why.

One real build of the bundled clips (truncated to 3 s, 16 kHz, so the stages run in seconds) and an
evaluation set of its first three clips, built the same way: dedup finds them as exact leaks."""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audio_dataset.cli import main
from audio_dataset.shards import ShardWriter, iter_shard, write_sizes
from audio_dataset.sources_table import built_counts
from conftest import REAL_AUDIO_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BUILD = ["--source", "local", "--input", str(REAL_AUDIO_DIR), "--sample-rate", "16000", "--max-seconds", "3",
         "--long-clips", "truncate", "--workers", "1", "--no-progress"]


def _cli(*argv: object) -> int:
    return main([*map(str, argv), "--no-progress"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("outputs")
    clips, evalset = root / "clips", root / "evalset"
    assert main(["build", *BUILD, "--out", str(clips), "--splits", "train=1"]) == 0
    assert main(["build", *BUILD, "--out", str(evalset), "--splits", "test=1", "--limit", "3"]) == 0
    return {"clips": clips, "evalset": evalset, "root": root}


def _copy(dataset: Path, dest: Path) -> Path:
    """The dataset as a build wrote it (without what earlier tests' stages added inside it)."""
    return Path(shutil.copytree(dataset, dest, ignore=shutil.ignore_patterns("fingerprint", "dedup", "embed")))


def _keys(dataset: Path) -> list[str]:
    return [s["__key__"] for tar in sorted((dataset / "train").glob("*.tar")) for s in iter_shard(tar)]


def _manifest(dataset: Path) -> dict[str, dict]:
    return {row["source_id"]: row for row in pq.read_table(dataset / "manifest.parquet").to_pylist()}


def _check_dataset(out: Path, dropped: dict[str, str], capsys) -> None:
    """verify, stats --json, failures, report and the sources table on `out`: what its shards hold is what
    every command counts, and each sample the stage dropped is listed with its reason."""
    kept = _keys(out)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.strip().endswith(f"{len(kept)} sample(s): OK")
    assert main(["stats", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == len(kept)
    assert stats["by_status"]["dropped"] == len(dropped) and stats["by_status"]["ok"] == stats["items"] - len(dropped)
    assert stats["by_reason"] == {reason: list(dropped.values()).count(reason) for reason in set(dropped.values())}
    assert json.loads((out / "stats.json").read_text())["samples"] == len(kept)
    assert main(["failures", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows = lines[0].split("\t"), [dict(zip(lines[0].split("\t"), line.split("\t"))) for line in lines[1:]]
    assert header[:4] == ["status", "reason", "source", "source_id"]
    assert {row["source_id"]: row["reason"] for row in rows} == dropped
    assert all(row["status"] == "dropped" for row in rows)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert f'<span id="samples-total">{len(kept)}</span>' in page
    assert all(html.escape(reason) in page and html.escape(source_id) in page
               for source_id, reason in dropped.items())
    assert built_counts([out]).get("local", (0, 0.0))[0] == stats["by_status"]["ok"]  # `audiodata sources`: clips


def test_filter_output_reads_as_a_dataset_and_an_identical_rerun_resumes(built, capsys):
    clips, out = built["clips"], built["root"] / "filtered"
    args = ("filter", clips, "--out", out, "--min-seconds", "2.9", "--language", "en")
    assert _cli(*args) == 0
    manifest = {r["key"]: r for r in pq.read_table(out / "filter_manifest.parquet").to_pylist()}
    short = {r["key"] for r in manifest.values() if r["status"] == "too_short"}
    assert len(short) == 1 and len(manifest) == 10  # the robin: 2.7 s
    source_ids = {row["sample_keys"][0]: source_id for source_id, row in _manifest(clips).items()}
    _check_dataset(out, {source_ids[key]: "filter:too_short" for key in short}, capsys)
    row = _manifest(out)[source_ids[next(iter(short))]]
    assert row["sample_keys"] == [] and row["n_samples"] == 0 and row["error_detail"].startswith("duration 2.")
    first = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and ".filter" not in p.parts
             and p.name not in ("provenance.json", "report.html", "stats.png") and not p.name.startswith(".")}
    capsys.readouterr()
    assert _cli(*args) == 0  # the same settings (--language held as a tuple, recorded as a list) resume
    assert "1 shard(s), 1 already done" in capsys.readouterr().out
    assert {path: (out / path).read_bytes() for path in first} == first


def test_dedup_apply_output_reads_as_a_dataset(built, capsys):
    clips, evalset, out = built["clips"], built["evalset"], built["root"] / "deduped"
    assert _cli("dedup", clips, "--against", evalset, "--no-embeddings", "--apply", "--out", out) == 0
    leaks = set(_manifest(evalset))
    assert len(leaks) == 3 and len(_keys(out)) == 7
    _check_dataset(out, {source_id: "dedup:eval_overlap" for source_id in leaks}, capsys)
    details = {row["error_detail"] for row in _manifest(out).values() if row["status"] == "dropped"}
    assert all(detail.startswith("matches ") and "evaluation set" in detail for detail in details)


def test_k2c_output_reads_as_a_dataset(built, capsys):
    out = built["root"] / "k2c"
    assert _cli("k2c", built["clips"], "--out", out, "--caption-model", "template") == 0
    assert len(_keys(out)) == 10
    _check_dataset(out, {}, capsys)


def test_dedup_apply_keeps_one_copy_of_a_key_a_shard_holds_twice(built, capsys):
    dataset = _copy(built["clips"], built["root"] / "twice")
    shard = dataset / "train" / "000000.tar"
    samples = list(iter_shard(shard))
    with ShardWriter(shard) as writer:
        for sample in [*samples[:2], samples[0], *samples[2:]]:
            writer.write(sample)
    write_sizes(dataset / "train", {"000000.tar": len(samples) + 1})
    out = built["root"] / "twice-deduped"
    assert _cli("dedup", dataset, "--no-embeddings", "--keep", "first", "--apply", "--out", out) == 0
    assert _keys(out) == [s["__key__"] for s in samples]  # the clip once, in its first place
    rows = pq.read_table(out / "dedup_manifest.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in rows if r["status"] != "kept"] == [(samples[0]["__key__"], "duplicate")]
    assert [r["status"] for r in rows].count("kept") == len(samples)
    assert main(["verify", str(out)]) == 0, capsys.readouterr().out
    filtered = built["root"] / "twice-filtered"  # filter --dedup reads the same clusters the same way
    assert _cli("filter", dataset, "--out", filtered, "--dedup") == 0
    assert _keys(filtered) == _keys(out)
    assert main(["verify", str(filtered)]) == 0, capsys.readouterr().out


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dedup_reads_a_read_only_eval_set_and_a_moved_dataset_resumes(built, capsys):
    evalset = _copy(built["evalset"], built["root"] / "readonly-eval")
    dataset = _copy(built["clips"], built["root"] / "before-move")
    before = _files(evalset)
    for path in [evalset, *evalset.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        assert _cli("dedup", dataset, "--against", evalset, "--no-embeddings") == 0
        assert "3 eval_overlap" in capsys.readouterr().out
        assert _files(evalset) == before  # nothing written into the evaluation set
    finally:
        for path in [evalset, *evalset.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    moved = Path(shutil.move(dataset, built["root"] / "after-move"))
    prints = {name: mtime for name, mtime in _files(moved).items() if name.endswith(".parquet")
              and not name.startswith("dedup/clusters")}
    assert any(name.startswith("dedup/against/") for name in prints) and "fingerprint/train/000000.parquet" in prints
    assert _cli("dedup", moved, "--against", evalset, "--no-embeddings") == 0  # resumes: nothing redone
    assert "3 eval_overlap" in capsys.readouterr().out
    assert {name: mtime for name, mtime in _files(moved).items() if name in prints} == prints
    # The dataset changed since (a sample removed): its fingerprints are made again, not reused.
    shard = moved / "train" / "000000.tar"
    samples = list(iter_shard(shard))
    with ShardWriter(shard) as writer:
        for sample in samples[:-1]:
            writer.write(sample)
    write_sizes(moved / "train", {"000000.tar": len(samples) - 1})
    assert _cli("dedup", moved, "--against", evalset, "--no-embeddings") == 0
    part = pq.read_table(moved / "fingerprint" / "train" / "000000.parquet")
    assert part.column("key").to_pylist() == [s["__key__"] for s in samples[:-1]]


def test_filter_dropping_some_segments_of_an_item_keeps_its_others(built, capsys):
    """A clip cut into 2 s segments ends in a shorter one: --min-seconds 1.99 drops only that one, so
    the item stays kept with its other samples and their seconds."""
    clips, out = built["root"] / "segmented", built["root"] / "segmented-filtered"
    assert main(["build", *BUILD[:4], "--sample-rate", "16000", "--segment-seconds", "2", "--limit", "3",
                 "--workers", "1", "--no-progress", "--out", str(clips), "--splits", "train=1"]) == 0
    assert _cli("filter", clips, "--out", out, "--min-seconds", "1.99") == 0
    rows = pq.read_table(out / "filter_manifest.parquet").to_pylist()
    short = {r["key"] for r in rows if r["status"] == "too_short"}
    durations = {r["key"]: r["duration"] for r in rows}
    before, after = _manifest(clips), _manifest(out)
    partly = [sid for sid, row in before.items() if short & set(row["sample_keys"]) - set(row["sample_keys"][:1])]
    assert partly and short  # the fixture holds what this test is about
    for source_id, row in after.items():
        kept = [key for key in before[source_id]["sample_keys"] if key not in short]
        assert row["status"] == "ok" and row["sample_keys"] == kept and row["n_samples"] == len(kept)
        assert row["output_duration"] == pytest.approx(sum(durations[key] for key in kept), abs=0.01)
    _check_dataset(out, {}, capsys)
