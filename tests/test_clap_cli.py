"""clap-train, clap-eval and clap-export as commands: `--help` at once and with the defaults, a
mistake in one line, `--version`, a run folder never trained over, Ctrl-C / SIGTERM leaving a
checkpoint `--resume latest` continues, an unreachable hub in one quick line, and the shipped
tokenizer of the `tiny-roberta` preset. (Every option's help text: tests/test_failures.py.)"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clap_model import main as clap_main
from clap_model.checkpoint import read
from test_clap_data import build_clap_shards  # tests/ is on sys.path (rootdir-less prepend import)

ROOT = Path(__file__).parent.parent
COMMANDS = {"clap-train": "clap_model.main", "clap-eval": "clap_model.evaluate", "clap-export": "clap_model.export"}
TRAIN_STEPS_PER_EPOCH = 4  # 8 clips, batch 2


def _run(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 300
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clap_cli_shards")
    build_clap_shards(out, clips=8, seconds=2.0, per_shard=4, augment=False)
    return out


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--train-data", f"{shards}/{{000000..000001}}.tar", "--model", "tiny", "--batch-size", "2",
            "--workers", "1", "--shuffle-buffer", "8", "--epochs", "3", "--log-every", "1", "--seed", "5",
            "--out", str(out), *extra]


# --------------------------------------------------------------------------- the command lines


@pytest.mark.parametrize("prog", COMMANDS)
def test_help_comes_at_once_with_the_defaults(prog):
    started = time.monotonic()
    result = _run(COMMANDS[prog], "--help", env={**os.environ, "COLUMNS": "2000"})  # unwrapped lines
    elapsed = time.monotonic() - started
    assert result.returncode == 0 and elapsed < 3, (elapsed, result.stderr)  # torch is not loaded to parse
    text = result.stdout
    assert "--version" in text and "(default: None)" not in text
    if prog == "clap-train":
        assert "(default: htsat-tiny-roberta)" in text and "(default: 64)" in text and "(default: 10)" in text
    if prog != "clap-eval":  # which presets need the hub, where a preset is chosen
        assert "tiny, tiny-roberta, tiny-fusion, msclap-tiny need no download" in text
    if prog == "clap-eval":
        assert "(default: repeatpad)" in text and "(default: This is a sound of {}.)" in text


@pytest.mark.parametrize("prog,argv", [("clap-train", ["--train-data", "x", "--out", "y", "--epochs", "many"]),
                                       ("clap-train", ["--no-such-option"]),
                                       ("clap-eval", ["--checkpoint", "x.pt", "--data-filling", "loop"]),
                                       ("clap-export", ["--checkpoint", "x.pt", "--out", "out", "--format", "onnx"])])
def test_a_usage_mistake_is_one_line_at_once(prog, argv):
    started = time.monotonic()
    result = _run(COMMANDS[prog], *argv)
    assert time.monotonic() - started < 3
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and f"(see {prog} --help)" in lines[0], lines


@pytest.mark.parametrize("prog", COMMANDS)
def test_version(prog):
    result = _run(COMMANDS[prog], "--version")
    assert result.returncode == 0 and result.stdout.startswith(f"{prog} ") and result.stdout.split()[1][0].isdigit()


# --------------------------------------------------------------------------- the hub


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hub_env(tmp_path: Path, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY",
                        "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env["HF_HOME"] = str(tmp_path / "empty-hf-home")  # nothing cached
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    else:  # online, but the endpoint refuses every connection: the network is down
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    return env


HUB_CASES = [
    ("clap-eval", ["--checkpoint", "nobody/no-such-clap", "--val-data", "{shards}", "--workers", "0"]),
    ("clap-export", ["--checkpoint", "nobody/no-such-clap", "--format", "laion", "--out", "{tmp}/out.pt"]),
    ("clap-train", ["--train-data", "{shards}", "--model", "htsat-tiny-roberta", "--batch-size", "2", "--workers", "0",
                    "--out", "{tmp}/run"]),
]


def _check_hub_line(prog: str, code: int, stderr: str, offline: bool, tmp_path: Path) -> None:
    lines = stderr.strip().splitlines()
    assert code == 1, stderr  # the command line is fine: the run cannot go on
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: ") and "Hugging Face cache" in lines[0], lines
    assert ("offline" if offline else "cannot be reached") in lines[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "endpoint-down"])
@pytest.mark.parametrize("prog,argv", HUB_CASES, ids=[case[0] for case in HUB_CASES])
def test_an_unreachable_hub_is_one_quick_line_and_a_run_failure(prog, argv, offline, shards, tmp_path, capfd,
                                                                monkeypatch):
    """A model id that is not cached, with the hub offline or its endpoint refusing connections:
    one line, exit 1, within seconds (not transformers' retries, 35 s and 11 lines)."""
    import importlib

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if not offline:
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.delenv(name, raising=False)
    main = importlib.import_module(COMMANDS[prog]).main
    capfd.readouterr()
    started = time.monotonic()
    code = main([arg.format(shards=shards, tmp=tmp_path) for arg in argv])
    elapsed = time.monotonic() - started
    _check_hub_line(prog, code, capfd.readouterr().err, offline, tmp_path)
    assert elapsed < 10, elapsed


@pytest.mark.parametrize("offline", [True, False], ids=["HF_HUB_OFFLINE", "endpoint-down"])
def test_an_unreachable_hub_from_the_environment(offline, shards, tmp_path):
    """The same as a user meets it: HF_HUB_OFFLINE or HF_ENDPOINT in the environment, a fresh process."""
    prog, argv = HUB_CASES[1]
    result = _run(COMMANDS[prog], *[arg.format(shards=shards, tmp=tmp_path) for arg in argv],
                  env=_hub_env(tmp_path, offline), timeout=120)
    _check_hub_line(prog, result.returncode, result.stderr, offline, tmp_path)


# --------------------------------------------------------------------------- the run folder


def test_an_existing_run_folder_is_refused_without_resume(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert clap_main.main(_train_args(shards, out, "--epochs", "1")) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"latest.pt", "epoch_1.pt"} <= set(before)
    capsys.readouterr()
    assert clap_main.main(_train_args(shards, out, "--epochs", "1", "--seed", "6")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run (latest.pt)" in err[0] and "--resume latest" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing touched
    (tmp_path / "empty").mkdir()  # an empty folder is a new run's
    assert clap_main.main(_train_args(shards, tmp_path / "empty", "--max-steps", "1")) == 0


# --------------------------------------------------------------------------- signals


def _interrupt(argv: list[str], signum: int, after_step: int, group: bool) -> subprocess.CompletedProcess[str]:
    """clap-train, sent `signum` once it has logged step `after_step`: to its process group, as
    Ctrl-C in a terminal does (the loader's workers get it too), or to it alone, as `kill` does."""
    proc = subprocess.Popen([sys.executable, "-m", "clap_model.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if f"(global {after_step})" in line:
                (os.killpg if group else os.kill)(proc.pid, signum)
                break
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(out) + stdout, stderr)


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    """The uninterrupted run's last checkpoint."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert clap_main.main(_train_args(shards, out)) == 0
    return out / "epoch_3.pt"


@pytest.mark.parametrize("signum,group", [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["ctrl-c", "sigterm"])
@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_a_signal_saves_a_checkpoint_that_resume_continues(shards, straight, tmp_path, capsys, signum, group):
    capsys.readouterr()
    out = tmp_path / "run"
    result = _interrupt(_train_args(shards, out), signum, after_step=TRAIN_STEPS_PER_EPOCH + 2, group=group)
    assert result.returncode == 128 + signum, result.stderr
    lines = result.stderr.strip().splitlines()
    name = signal.Signals(signum).name
    assert lines == [f"clap-train: interrupted ({name}); {out / 'latest.pt'} holds step "
                     f"{read(out / 'latest.pt')['step']}: continue with the same command and --resume latest"]
    saved = read(out / "latest.pt")
    # Stopped at the end of a step in the second epoch: not the epoch's end, not the run's.
    assert TRAIN_STEPS_PER_EPOCH + 2 <= saved["step"] < 2 * TRAIN_STEPS_PER_EPOCH and saved["epoch"] == 1
    assert saved["step_in_epoch"] == saved["step"] - TRAIN_STEPS_PER_EPOCH

    assert clap_main.main(_train_args(shards, out, "--resume", "latest")) == 0
    assert f"resumed from {out / 'latest.pt'}: epoch 1, step {saved['step']}" in capsys.readouterr().out
    # The interrupted and resumed run is the uninterrupted one.
    ours, theirs = read(out / "epoch_3.pt")["state_dict"], read(straight)["state_dict"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc to see torch load")
@pytest.mark.parametrize("later", [0.0, 1.0], ids=["torch-loading", "start-up"])
def test_a_signal_during_start_up_is_one_line_and_leaves_no_run(shards, tmp_path, later):
    """While torch loads and the model is built: nothing to save, one line, no traceback, no crash."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "clap_model.main", *_train_args(shards, out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.monotonic() + 60
    while "libtorch" not in _maps(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(later)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])  # not 139: a segfault
    assert stderr.strip().splitlines() == ["clap-train: interrupted (SIGINT); nothing saved"], (stdout, stderr)
    assert not (out / "latest.pt").exists()


# --------------------------------------------------------------------------- the shipped tokenizer


def test_the_shipped_vocabulary_is_what_its_readme_says(tmp_path):
    """clap_model/vocab/audioset-bpe is reproduced from the AudioSet ontology's names as its README says."""
    from clap_model.text import SHIPPED_VOCABULARIES, shipped_tokenizer, train_audioset_bpe

    names = [c["name"] for c in json.loads((ROOT / "audio_dataset/k2c/ontology.json").read_text())]
    train_audioset_bpe(names, tmp_path / "bpe")
    shipped = SHIPPED_VOCABULARIES["audioset-bpe"]
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "bpe" / name).read_bytes() == (shipped / name).read_bytes(), name
    tokenizer = shipped_tokenizer("audioset-bpe")
    ids = tokenizer(["The sound of Dog, Bark and Speech"])["input_ids"][0]
    assert len(ids) < 16 and tokenizer.decode(ids, skip_special_tokens=True) == "The sound of Dog, Bark and Speech"


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_an_evaluation_a_stop_cut_short_is_done_on_resume(shards, tmp_path, capsys):
    """Stopped after an epoch's checkpoint but before its evaluation row: `--resume latest` evaluates
    that epoch first, so results.jsonl holds every epoch's row, as the uninterrupted run's does."""
    out = tmp_path / "run"
    args = _train_args(shards, out, "--val-data", f"{shards}/{{000000..000001}}.tar")
    assert clap_main.main(args) == 0
    rows = (out / "results.jsonl").read_text().splitlines()
    assert [json.loads(row)["epoch"] for row in rows] == [1, 2, 3]
    (out / "results.jsonl").write_text("\n".join(rows[:2]) + "\n")  # the last epoch's evaluation never ran
    capsys.readouterr()
    assert clap_main.main([*args, "--resume", "latest"]) == 0
    assert "eval epoch 3" in capsys.readouterr().out
    resumed = [json.loads(row) for row in (out / "results.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert resumed[2] == json.loads(rows[2])  # the same weights give the same metrics
    assert clap_main.main([*args, "--resume", "latest"]) == 0  # nothing missing: no second row
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
