"""clap-train / clap-eval end to end on real shards with the CPU-sized `tiny` preset."""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
import torch

from audio_dataset.shards import iter_shard
from clap_model import evaluate as clap_eval
from clap_model import main as clap_main
from clap_model.checkpoint import read
from clap_model.inference import CLAPInference
from test_clap_data import build_clap_shards  # tests/ is on sys.path (rootdir-less prepend import)

ROOT = Path(__file__).parent.parent


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clap_train_shards")
    build_clap_shards(out, clips=8, seconds=2.0, per_shard=4)  # the tiny preset's clip length
    return out


def _pattern(shards: Path) -> str:
    return f"{shards}/{{000000..000001}}.tar"


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--train-data", _pattern(shards), "--model", "tiny", "--batch-size", "8", "--workers", "1",
            "--out", str(out), "--shuffle-buffer", "8", "--log-every", "5", "--seed", "3", *extra]


def _results(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_learns_until_retrieval_is_perfect(shards, tmp_path, capsys):
    out = tmp_path / "run"
    code = clap_main.main(_args(shards, out, "--val-data", _pattern(shards), "--zeroshot-data", _pattern(shards),
                                "--epochs", "8", "--train-num-samples", "200", "--lr", "3e-3", "--warmup", "10"))
    assert code == 0
    printed = capsys.readouterr().out
    assert "samples/s" in printed and "audio_to_text_R@1" in printed
    results = _results(out)
    first, last = results[0], results[-1]
    assert first["audio_to_text_R@1"] < 1.0
    best = max(r["audio_to_text_R@1"] + r["text_to_audio_R@1"] for r in results)
    assert best == 2.0, [(r["audio_to_text_R@1"], r["text_to_audio_R@1"]) for r in results]
    # Zero-shot runs on the labelled set with the prompt template (first tag = class: 6 classes).
    assert last["zeroshot_classes"] == 6 and last["zeroshot_samples"] == 8
    assert 0.0 <= last["zeroshot_top1"] <= last["zeroshot_top5"] <= 1.0
    assert {p.name for p in out.glob("*.pt")} >= {"latest.pt", "epoch_8.pt"}
    assert any((out / "tensorboard").iterdir())

    # clap-eval reproduces the final retrieval numbers from the checkpoint.
    metrics_file = tmp_path / "metrics.json"
    assert clap_eval.main(["--checkpoint", str(out / "epoch_8.pt"), "--val-data", _pattern(shards),
                           "--batch-size", "8", "--workers", "0", "--out", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["audio_to_text_R@1"] == pytest.approx(last["audio_to_text_R@1"])
    assert metrics["text_to_audio_mAP@10"] == pytest.approx(last["text_to_audio_mAP@10"], abs=1e-6)
    # Several validation datasets are scored each on its own, named by their folders as LAION-CLAP does.
    for index, name in enumerate(("clotho", "audiocaps")):
        (tmp_path / name / "test").mkdir(parents=True)
        (tmp_path / name / "test" / "000000.tar").write_bytes((shards / f"00000{index}.tar").read_bytes())
    both = f"{tmp_path}/clotho/test/000000.tar::{tmp_path}/audiocaps/test/000000.tar"
    assert clap_eval.main(["--checkpoint", str(out / "epoch_8.pt"), "--val-data", both, "--batch-size", "8",
                           "--workers", "0", "--out", str(metrics_file)]) == 0
    split = json.loads(metrics_file.read_text())
    assert split["clotho-test/num_samples"] == split["audiocaps-test/num_samples"] == 4
    assert clap_eval.main(["--checkpoint", str(out / "epoch_8.pt"), "--val-data", f"{shards}/000001.tar",
                           "--batch-size", "8", "--workers", "0", "--out", str(metrics_file)]) == 0
    alone = json.loads(metrics_file.read_text())
    assert {k: v for k, v in split.items() if k.startswith("audiocaps-test/")} == {
        f"audiocaps-test/{k}": v for k, v in alone.items()}

    # The inference API on the same clips and captions gives the same retrieval.
    clap = CLAPInference.from_checkpoint(out / "epoch_8.pt", device="cpu")
    samples = [s for shard in sorted(shards.glob("*.tar")) for s in iter_shard(shard)]
    arrays = [soundfile.read(io.BytesIO(s["flac"]), dtype="float32")[0] for s in samples]
    captions = [json.loads(s["json"])["text"][0] for s in samples]
    sims = clap.similarity(clap.embed_audio(arrays, sample_rate=48_000, batch_size=3), clap.embed_text(captions))
    assert sims.shape == (8, 8)
    r1 = float((sims.argmax(dim=1) == torch.arange(8)).float().mean())
    assert r1 == pytest.approx(last["audio_to_text_R@1"])
    wav = tmp_path / "clip.wav"
    soundfile.write(wav, arrays[0], 48_000, subtype="FLOAT")
    assert torch.allclose(clap.embed_audio([wav]), clap.embed_audio([arrays[0]], sample_rate=48_000), atol=1e-5)
    probs = clap.zero_shot([wav], ["waltz", "speech", "bird"])
    assert probs.shape == (1, 3) and float(probs.sum()) == pytest.approx(1.0, abs=1e-5)


def test_resume_continues_identically(shards, tmp_path, capsys):
    common = ("--epochs", "2", "--train-num-samples", "24", "--lr", "1e-3", "--warmup", "2")
    straight = tmp_path / "straight"
    assert clap_main.main(_args(shards, straight, *common)) == 0
    resumed = tmp_path / "resumed"
    # Stop after 4 of 6 steps (mid-epoch 2), then resume from latest.pt.
    assert clap_main.main(_args(shards, resumed, *common, "--max-steps", "4")) == 0
    assert read(resumed / "latest.pt")["step"] == 4
    capsys.readouterr()
    assert clap_main.main(_args(shards, resumed, *common, "--resume", "latest")) == 0
    assert "note: resumed with options" not in capsys.readouterr().out
    a, b = read(straight / "epoch_2.pt"), read(resumed / "epoch_2.pt")
    assert a["step"] == b["step"] == 6
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    moment = a["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(moment, b["optimizer"]["state"][0]["exp_avg"])
    # Resuming with options that change training is allowed (extending a run), and said.
    more = ("--epochs", "3", "--train-num-samples", "24", "--lr", "2e-3", "--warmup", "2")
    assert clap_main.main(_args(shards, resumed, *more, "--resume", "latest", "--log-every", "1")) == 0
    out = capsys.readouterr().out
    assert "note: resumed with options other than the checkpoint's (--epochs 2 -> 3, --lr 0.001 -> 0.002)" in out


def test_user_errors_are_one_line(shards, tmp_path, capsys):
    cases = [
        (["--train-data", f"{shards}/nope-{{0..3}}.tar", "--model", "tiny", "--out", str(tmp_path / "a")],
         "shard not found"),
        (_args(shards, tmp_path / "b", "--data-truncating", "fusion"), "fusion model"),
        (_args(shards, tmp_path / "c", "--resume", str(tmp_path / "missing.pt")), "checkpoint not found"),
        (_args(shards, tmp_path / "d", "--batch-size", "64", "--epochs", "1"), "no full batch"),
    ]
    for argv, message in cases:
        assert clap_main.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert clap_eval.main(["--checkpoint", str(tmp_path / "missing.pt"), "--val-data", _pattern(shards)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_two_process_ddp_on_gloo(shards, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "clap_model.main", *_args(shards, out, "--epochs", "1", "--batch-size", "4",
                                                              "--train-num-samples", "16", "--log-every", "1",
                                                              "--val-data", _pattern(shards))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch 4 x 2 ranks" in result.stdout
    assert "step 2/2" in result.stdout  # 16 samples / (4 x 2) per step
    saved = read(out / "epoch_1.pt")
    assert saved["step"] == 2
    assert len(saved["rng"]) == 2  # every rank's random state, for exact resume
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    assert len(_results(out)) == 1


def test_unreadable_shards_end_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"00000{i}.tar").write_bytes(b"not a tar archive" * 100)
    (bad / "sizes.json").write_text('{"000000.tar": 4, "000001.tar": 4}')
    code = clap_main.main(["--train-data", f"{bad}/{{000000..000001}}.tar", "--model", "tiny", "--batch-size", "4",
                           "--workers", "1", "--epochs", "1", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "are the shards readable" in err[0], err


def test_argument_mistakes_are_one_line_and_found_before_training(shards, tmp_path, capsys):
    cases = [
        (_args(shards, tmp_path / "a", "--model", "nonesuch"), "unknown model 'nonesuch'"),
        (_args(shards, tmp_path / "b", "--val-data", f"{shards}/nope-{{0..1}}.tar"), "shard not found"),
        (_args(shards, tmp_path / "c", "--zeroshot-data", _pattern(shards), "--zeroshot-template", "a {x}"),
         "--zeroshot-template"),
        (_args(shards, tmp_path / "d", "--zeroshot-data", _pattern(shards), "--zeroshot-template", "no class"),
         "--zeroshot-template"),
        (_args(shards, tmp_path / "e", "--text-model", str(tmp_path / "no-such-model")), "text model folder not found"),
        # The hub is offline in tests: a run failure (exit 1), found as early.
        (_args(shards, tmp_path / "f", "--text-model", "no-such-org/no-such-model"),
         "text model 'no-such-org/no-such-model' is not in the Hugging Face cache and the hub is offline"),
    ]
    for argv, message in cases:
        expected = 1 if "Hugging Face cache" in message else 2
        assert clap_main.main([*argv, "--epochs", "1", "--train-num-samples", "8"]) == expected
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not list(Path(argv[argv.index("--out") + 1]).glob("*.pt"))  # failed before training
    ckpt_path = str(tmp_path / "missing.pt")  # the argument checks come before the checkpoint is read
    for extra, message in ((["--model", "nonesuch"], "unknown model"), (["--workers", "-1"], "--workers"),
                           (["--zeroshot-template", "{0} {1}"], "--zeroshot-template")):
        assert clap_eval.main(["--checkpoint", ckpt_path, "--val-data", _pattern(shards), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_a_failing_evaluation_keeps_the_epoch_checkpoint(shards, tmp_path, capsys):
    out = tmp_path / "run"
    code = clap_main.main(_args(shards, out, "--epochs", "1", "--train-num-samples", "8", "--zeroshot-data",
                                _pattern(shards), "--zeroshot-label-field", "no_such_field"))
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--zeroshot-label-field" in err[0], err
    assert read(out / "epoch_1.pt")["step"] == 1  # the epoch's training is not lost


def test_a_data_mistake_found_in_a_loader_worker_is_one_error_line(shards, tmp_path, capsys, monkeypatch):
    """A caption field no sample has: the workers stop, clap-train names the cause in one line."""
    monkeypatch.setattr("clap_model.data.MAX_UNUSABLE_IN_A_ROW", 30)  # workers fork: they see it
    argv = _args(shards, tmp_path / "run", "--epochs", "1", "--train-num-samples", "8", "--workers", "2",
                 "--caption-fields", "nosuch")
    assert clap_main.main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("clap-train: error: 30 samples in a row could not be used; the last: ")
    assert last.endswith("sample has no caption in ('nosuch',)"), last


def test_train_and_evaluate_on_a_build_folder(shards, tmp_path, capsys):
    """`--train-data OUT` trains on OUT/train; `--val-data OUT` scores each split on its own."""
    out = tmp_path / "build"
    for split in ("train", "valid"):
        (out / split).mkdir(parents=True)
        for name in ("000000.tar", "000001.tar", "sizes.json"):
            (out / split / name).write_bytes((shards / name).read_bytes())
    run = tmp_path / "run"
    argv = _args(shards, run, "--epochs", "1", "--val-data", str(out))
    argv[argv.index("--train-data") + 1] = str(out)
    assert clap_main.main(argv) == 0
    printed = capsys.readouterr().out
    assert "2 shards, 1 steps/epoch" in printed  # OUT/train's 8 samples, not both splits' 16
    results = _results(run)[0]
    assert {"build-train/audio_to_text_R@1", "build-valid/audio_to_text_R@1"} <= set(results)
    assert results["build-train/audio_to_text_R@1"] == results["build-valid/audio_to_text_R@1"]  # same shards
    metrics_file = tmp_path / "metrics.json"
    assert clap_eval.main(["--checkpoint", str(run / "latest.pt"), "--val-data", str(out / "valid"),
                           "--batch-size", "8", "--workers", "0", "--out", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())
    assert metrics["audio_to_text_R@1"] == pytest.approx(results["build-valid/audio_to_text_R@1"])
