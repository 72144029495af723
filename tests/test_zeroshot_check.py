"""Zero-shot accuracy as clap-eval computes it (shards -> loader -> model -> prompts -> ranks)
equals the accuracy computed here, independently, from CLAPInference embeddings of the same clips:
a build of the bundled clips (two_shard_build: each clip's first tag is its class), a tiny model
with random weights whose projections are centred on these clips and prompts so that its
predictions differ from clip to clip (a trained tiny model would take minutes here)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import soundfile
import torch

from audio_dataset.shards import iter_shard
from clap_model import evaluate as clap_eval
from clap_model.clap import CLAP
from clap_model.config import get_preset
from clap_model.inference import CLAPInference
from random_weights import centre, perturb  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPLATE = "This is a sound of {}."


def clips_and_labels(build: Path) -> tuple[list, list[str]]:
    """Every sample of the build's train split: its audio (float, 48 kHz) and first tag."""
    arrays, labels = [], []
    for shard in sorted((build / "train").glob("*.tar")):
        for sample in iter_shard(shard):
            arrays.append(soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")[0])
            labels.append(json.loads(sample["json"])["tag"][0])
    return arrays, labels


def test_clap_eval_zero_shot_equals_accuracy_from_inference_embeddings(two_shard_build, tmp_path):
    arrays, labels = clips_and_labels(two_shard_build)
    classes = sorted(set(labels))  # clap-eval's default: every label found, sorted
    prompts = [TEMPLATE.format(name) for name in classes]
    torch.manual_seed(0)
    model = CLAP(get_preset("tiny")).eval()
    perturb(model, seed=4)
    clap = CLAPInference(model, device="cpu")
    centre(model.audio_projection[-1], lambda: clap.embed_audio(arrays, sample_rate=48_000))
    centre(model.text_projection[-1], lambda: clap.embed_text(prompts))
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, checkpoint)

    out = tmp_path / "metrics.json"
    assert clap_eval.main(["--checkpoint", str(checkpoint), "--zeroshot-data", str(two_shard_build),
                           "--zeroshot-template", TEMPLATE, "--batch-size", "3", "--workers", "0",
                           "--out", str(out)]) == 0
    pipeline = json.loads(out.read_text())

    # Independently: the same clips and prompts through the inference API, ranked here.
    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    scores = clap.similarity(clap.embed_audio(arrays, sample_rate=48_000), clap.embed_text(prompts))
    truth = torch.tensor([classes.index(label) for label in labels])
    ranks = (scores > scores.gather(1, truth[:, None])).sum(dim=1).float()  # classes scoring above the truth
    predicted = scores.argmax(dim=1)
    assert len(set(predicted.tolist())) >= 3  # the model tells the clips apart: the check has teeth
    assert pipeline["zeroshot_samples"] == len(arrays) == 10 and pipeline["zeroshot_classes"] == len(classes)
    assert pipeline["zeroshot_top1"] == pytest.approx(float((predicted == truth).float().mean()))
    assert pipeline["zeroshot_top5"] == pytest.approx(float((ranks < 5).float().mean()))
    assert pipeline["zeroshot_mAP"] == pytest.approx(float((1 / (ranks + 1)).mean()), abs=1e-6)
