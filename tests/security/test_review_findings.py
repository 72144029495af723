"""Findings of the hostile review (issue 16's retry): a dataset's OWN records -- sizes.json,
provenance.json, SHA256SUMS -- are data like any shard member. Nested 100k deep, 20 GB sparse,
a list, or counts that are strings, they gave verify, report and clap-eval a RecursionError or
TypeError traceback (or read the whole file); now one line naming the file, exit 2."""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]
DATA_CAP = 2 << 30  # a sparse record read whole would need 20 GB: a MemoryError traceback here
DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.fixture(scope="module")
def built(two_shard_build: Path) -> Path:
    return two_shard_build


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    cfg = get_preset("tiny", None)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"config": cfg.to_dict(), "state_dict": CLAP(cfg, pretrained_text=False).state_dict()}, path)
    return path


def _capped() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (DATA_CAP, DATA_CAP))


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300,
                          preexec_fn=_capped, cwd=ROOT)


def _run_side_by_side(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Independent commands at once, results in order: each is a fresh interpreter that spends
    seconds on its imports, so on two cores a test's commands take about the time of the longest."""
    with ThreadPoolExecutor(max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        return list(pool.map(lambda argv: _run(*argv), commands))


def _hostile_copy(built: Path, tmp_path: Path, name: str, content: bytes | None) -> Path:
    """The build with one of its records replaced (None: a 20 GB sparse file)."""
    out = tmp_path / "ds"
    shutil.copytree(built, out)
    (out / name).unlink()
    if content is None:
        with open(out / name, "wb") as handle:
            handle.truncate(20 << 30)
    else:
        (out / name).write_bytes(content)
    return out


def _one_line(proc: subprocess.CompletedProcess, name: str) -> None:
    assert "Traceback" not in proc.stderr and "Error:" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert name in proc.stderr and ("unreadable" in proc.stderr or "cannot read" in proc.stderr), proc.stderr


SIZES = "train/sizes.json"


@pytest.mark.parametrize("content", [DEEP, None, b"[1, 2]", b'{"000000.tar": "5", "000001.tar": 5}'],
                         ids=["deep", "sparse", "list", "string_count"])
def test_hostile_sizes_json_is_one_line(built: Path, checkpoint: Path, tmp_path: Path, content: bytes | None) -> None:
    dataset = _hostile_copy(built, tmp_path, SIZES, content)
    verify, report, evaluate = _run_side_by_side(
        ("audio_dataset.cli", "verify", str(dataset)),
        ("audio_dataset.cli", "report", str(dataset), "--out", str(tmp_path / "r.html")),
        ("clap_model.evaluate", "--checkpoint", str(checkpoint), "--val-data", str(dataset), "--device", "cpu",
         "--workers", "0"))
    if content is not None and content.startswith(b"{"):  # a JSON object: verify lists the bad count as a problem
        assert verify.returncode == 1 and "Traceback" not in verify.stderr and "problem" in verify.stdout
    else:
        _one_line(verify, SIZES)
    _one_line(report, SIZES)
    _one_line(evaluate, SIZES)


@pytest.mark.parametrize("content", [DEEP, None, b'{"runs": 5}'], ids=["deep", "sparse", "runs_not_list"])
def test_hostile_provenance_is_one_line(built: Path, tmp_path: Path, content: bytes | None) -> None:
    dataset = _hostile_copy(built, tmp_path, "provenance.json", content)
    _one_line(_run("audio_dataset.cli", "report", str(dataset), "--out", str(tmp_path / "r.html")), "provenance.json")


@pytest.mark.parametrize("content", [None, b"\xff\xfe  000000.tar\n"], ids=["sparse", "not_ascii"])
def test_hostile_checksums_are_one_line(built: Path, tmp_path: Path, content: bytes | None) -> None:
    dataset = _hostile_copy(built, tmp_path, "train/SHA256SUMS", content)
    _one_line(_run("audio_dataset.cli", "verify", str(dataset)), "SHA256SUMS")


# ---- checkpoints: values shown in messages, and --resume's training state ---------------------------
def _laughs() -> list:
    """A list that holds itself twice, 40 levels down: a few hundred pickle bytes, 2^40 items to print."""
    value: list = [0]
    for _ in range(40):
        value = [value, value]
    return value


def _clap(*argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_capped, cwd=ROOT)


def test_config_value_that_prints_forever_is_one_line(checkpoint: Path, built: Path, tmp_path: Path) -> None:
    """The refusal message printed str(value)[:40], which first prints all 2^40 items (hung)."""
    import torch

    saved = torch.load(checkpoint, weights_only=False)
    saved["config"]["audio"]["model_type"] = _laughs()
    torch.save(saved, tmp_path / "laughs.pt")
    proc = _clap("clap_model.evaluate", "--checkpoint", str(tmp_path / "laughs.pt"), "--val-data", str(built),
                 "--device", "cpu", "--workers", "0", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "audio.model_type is a list" in proc.stderr


@pytest.fixture(scope="module")
def trained(built: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    proc = _clap("clap_model.main", "--train-data", str(built), "--model", "tiny", "--batch-size", "2",
                 "--workers", "0", "--device", "cpu", "--max-steps", "1", "--epochs", "1", "--out", str(out),
                 timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "latest.pt"


def _no_rng(saved: dict) -> None:
    del saved["rng"]


def _python_rng(saved: dict) -> None:
    saved["rng"][0]["python"] = (1, 2)


def _moment_shape(saved: dict) -> None:
    import torch

    state = saved["optimizer"]["state"]
    state[next(iter(state))]["exp_avg"] = torch.zeros(3)  # failed the first step, mid-run


def _laughs_args(saved: dict) -> None:
    saved["args"]["lr"] = _laughs()  # printed in the "resumed with other options" note (hung)


@pytest.mark.parametrize("damage", [_no_rng, _python_rng, _moment_shape, _laughs_args],
                         ids=["no_rng", "python_rng", "moment_shape", "laughs_args"])
def test_resume_from_damaged_state_is_one_line(trained: Path, built: Path, tmp_path: Path, damage) -> None:
    import torch

    saved = torch.load(trained, weights_only=False)
    damage(saved)
    torch.save(saved, tmp_path / "damaged.pt")
    proc = _clap("clap_model.main", "--train-data", str(built), "--model", "tiny", "--batch-size", "2",
                 "--workers", "0", "--device", "cpu", "--max-steps", "2", "--epochs", "1",
                 "--out", str(tmp_path / "run"), "--resume", str(tmp_path / "damaged.pt"), timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    if damage is _laughs_args:  # a value it cannot show is named by its type, and the run goes on
        assert proc.returncode == 0 and "--lr a list" in proc.stdout, (proc.stdout[-1000:], proc.stderr[-1000:])
    else:
        assert proc.returncode == 2 and "damaged.pt" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("record", [b"{}", b'{"settings": 5}', b'{"settings": {}}'],
                         ids=["no_settings", "settings_int", "no_model"])
def test_search_on_damaged_embed_record_is_one_line(built: Path, checkpoint: Path, tmp_path: Path,
                                                    record: bytes) -> None:
    """embed/.embed/run.json is the dataset's, not the user's: a KeyError/TypeError traceback before."""
    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    (dataset / "embed" / ".embed").mkdir(parents=True)
    (dataset / "embed" / ".embed" / "run.json").write_bytes(record)
    proc = _run("audio_dataset.cli", "search", str(dataset), "a bird", "--checkpoint", str(checkpoint))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "run.json" in proc.stderr and "rerun `audiodata embed`" in proc.stderr, proc.stderr


def test_ordered_dict_state_cannot_shadow_methods(checkpoint: Path, built: Path, tmp_path: Path) -> None:
    """BUILD on an OrderedDict admitted any attribute: `get` = 5 on the checkpoint dict made every
    reader's checkpoint.get(...) a TypeError traceback. Only a state dict's `_metadata` is admitted."""
    from collections import OrderedDict

    import torch

    class Shadowing(OrderedDict):
        def __reduce_ex__(self, protocol: int):  # what a crafted pickle holds: OrderedDict, then BUILD
            return OrderedDict, (), {"get": 5}, None, iter(list(OrderedDict.items(self)))

    torch.save(Shadowing(torch.load(checkpoint, weights_only=False)), tmp_path / "shadow.pt")
    proc = _clap("clap_model.evaluate", "--checkpoint", str(tmp_path / "shadow.pt"), "--val-data", str(built),
                 "--device", "cpu", "--workers", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "sets the state of a OrderedDict" in proc.stderr


def test_a_fifo_named_like_a_shard_is_not_read(built: Path, tmp_path: Path) -> None:
    """A FIFO (or a link to one) named NNNNNN.tar in a received dataset: verify, stats and report
    opened it and waited forever for a writer. It is not a shard; listed in sizes.json, it is missing."""
    import json
    import os

    dataset = tmp_path / "ds"
    shutil.copytree(built, dataset)
    os.mkfifo(tmp_path / "fifo")
    (dataset / "train" / "000005.tar").symlink_to(tmp_path / "fifo")
    os.mkfifo(dataset / "train" / "000006.tar")
    sizes = json.loads((dataset / SIZES).read_text())
    (dataset / SIZES).write_text(json.dumps({**sizes, "000005.tar": 1}))
    verify = _clap("audio_dataset.cli", "verify", str(dataset), timeout=60)
    assert verify.returncode == 1 and "000005.tar: listed in sizes.json but missing" in verify.stdout, verify.stdout
    for argv in (["stats", str(dataset)], ["report", str(dataset), "--out", str(tmp_path / "r.html")]):
        proc = _clap("audio_dataset.cli", *argv, timeout=60)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
