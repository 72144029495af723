"""`embed --windows all`: a clip longer than the model's window is embedded as the normalised mean
of the windows covering it (the last ending at the clip's end); the default embeds the first window."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from audio_dataset.cli import main
from audio_dataset.curate.embed import EmbedOptions, EmbedProcessor, window_starts
from audio_dataset.shards import iter_shard
from audio_dataset.stage_runner import ShardJob
from conftest import REAL_AUDIO_DIR
from test_curate import CLIPS, RATE, _pcm, _sample, _write  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WINDOW = 96_000  # the tiny preset's 2 s at 48 kHz


def test_windows_cover_the_clip():
    assert window_starts(50, 100) == [0] and window_starts(100, 100) == [0]
    assert window_starts(250, 100) == [0, 100, 150]  # the last window ends at the clip's end
    assert window_starts(300, 100) == [0, 100, 200]
    assert window_starts(301, 100) == [0, 100, 200, 201]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    torch.manual_seed(0)
    model = CLAP(get_preset("tiny"), pretrained_text=False)
    path = tmp_path_factory.mktemp("windows") / "tiny.pt"
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)
    return path


def _long_clip() -> np.ndarray:
    """5 s: the waltz's first 2 s, then the dog's 3 s (a clip whose start says little of its end)."""
    return np.concatenate([_pcm(REAL_AUDIO_DIR / f"{CLIPS['waltz']}.ogg", 2.0),
                           _pcm(REAL_AUDIO_DIR / f"{CLIPS['dog']}.ogg", 3.0)], axis=1)


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def test_all_windows_is_the_mean_of_the_windows_and_first_is_the_start(checkpoint):
    from clap_model.inference import CLAPInference

    long, short = _sample("waltz", _long_clip()), _sample("robin", _pcm(REAL_AUDIO_DIR / f"{CLIPS['robin']}.ogg", 1.5))
    job = ShardJob("train", "000000.tar", "", "", "")
    rows = {windows: EmbedProcessor(EmbedOptions(checkpoint=checkpoint, windows=windows), "cpu").process(
        job, [long, short])[1] for windows in ("first", "all")}
    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    pcm = soundfile.read(io.BytesIO(long["flac"]), dtype="float32")[0]  # what the FLAC holds
    pieces = [pcm[start : start + WINDOW] for start in (0, WINDOW, len(pcm) - WINDOW)]
    windows = clap.embed_audio(pieces, sample_rate=RATE).numpy()
    np.testing.assert_allclose(rows["all"][0]["audio"], _unit(windows.mean(axis=0)), atol=1e-5)
    np.testing.assert_allclose(rows["first"][0]["audio"], windows[0], atol=1e-5)
    assert float(rows["all"][0]["audio"] @ rows["first"][0]["audio"]) < 0.999  # the rest of the clip counts
    # A clip within one window is embedded the same either way.
    np.testing.assert_allclose(rows["all"][1]["audio"], rows["first"][1]["audio"], atol=1e-6)
    assert abs(float(np.linalg.norm(rows["all"][0]["audio"])) - 1) < 1e-5


def test_embed_records_its_windows_and_refuses_mixing_them(tmp_path, checkpoint, ray_local, capsys):
    dataset = tmp_path / "dataset"
    _write(dataset, "train", [[_sample("waltz", _long_clip())]])
    assert main(["embed", str(dataset), "--checkpoint", str(checkpoint), "--windows", "all", "--no-progress"]) == 0
    settings = json.loads((dataset / "embed" / ".embed" / "run.json").read_text())["settings"]
    assert settings["windows"] == "all" and settings["window_seconds"] == 2.0
    assert settings["index_parameters"]["kind"] == "auto"
    sample = next(iter_shard(next((dataset / "train").glob("*.tar"))))
    processed = EmbedProcessor(EmbedOptions(checkpoint=checkpoint, windows="all"), "cpu").process(
        ShardJob("train", "000000.tar", "", "", ""), [sample])[1]
    np.testing.assert_allclose(np.load(dataset / "embed" / "train.audio.npy")[0], processed[0]["audio"], atol=1e-5)
    capsys.readouterr()
    # Embeddings of first windows are another space of judgement: not mixed into the same output.
    assert main(["embed", str(dataset), "--checkpoint", str(checkpoint), "--no-progress"]) == 2
    assert "other settings (windows)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["embed", str(dataset), "--checkpoint", str(checkpoint), "--windows", "most"])
    assert usage.value.code == 2
