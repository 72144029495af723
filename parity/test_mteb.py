"""MTEB (mteb 2, its audio tasks) with our checkpoints, in MTEB's own virtualenv:
    bash parity/run.sh parity/test_mteb.py
(mteb 2 wants transformers 5, which the reference packages' pins exclude: see requirements-mteb.txt.)

- mteb.evaluate runs a checkpoint through clap_model.mteb_model.CLAPEncoder on a zero-shot task
  made from the bundled clips (no download): its accuracy and its per-clip predictions are those
  computed directly from CLAPInference embeddings.
- `clap-eval --suite` results convert to TaskResults that mteb reads back and validates against
  its own tasks' metadata (ESC50_Zeroshot, ClothoA2TRetrieval, ...).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

mteb = pytest.importorskip("mteb")

from datasets import Dataset, DatasetDict  # noqa: E402
from mteb.abstasks import AbsTaskZeroShotClassification  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402
from mteb.results import TaskResult  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from random_weights import centre, perturb  # noqa: E402

from clap_model.clap import CLAP  # noqa: E402
from clap_model.config import get_preset  # noqa: E402
from clap_model.data import decode_audio  # noqa: E402
from clap_model.inference import CLAPInference  # noqa: E402
from clap_model.metrics import retrieval_metrics  # noqa: E402
from clap_model.mteb_model import CLAPEncoder, mteb_results, write_mteb_results  # noqa: E402

REAL_AUDIO = REPO / "tests" / "data" / "real-audio"
RATE = 16_000  # MTEB hands the encoder 16 kHz audio here: CLAPEncoder resamples it as clap-eval does
PROMPTS = [f"This is a sound of {name}." for name in ("speech", "music", "a bird", "a dog", "a whale")]
LABELS = {"speech": 0, "audiobook": 0, "music": 1, "classical music": 1, "bird": 2, "dog": 3, "whale": 4}


def bundled() -> tuple[list[np.ndarray], list[int]]:
    """The bundled clips' first 4 s at 16 kHz, each labelled by its first tag that is a class."""
    arrays, labels = [], []
    for path in sorted(REAL_AUDIO.glob("*.ogg")):
        tags = json.loads(path.with_suffix(".json").read_text())["tag"]
        arrays.append(decode_audio(path.read_bytes(), RATE)[: 4 * RATE])
        labels.append(next((LABELS[t] for t in tags if t in LABELS), 1))  # trumpet, drums: music
    return arrays, labels


class BundledZeroshot(AbsTaskZeroShotClassification):
    """An MTEB audio zero-shot task over the bundled clips, its data given, not downloaded."""

    metadata = TaskMetadata(
        name="AudiodataBundledZeroshot", description="The bundled test clips of audiodata.",
        reference=None, dataset={"path": "audiodata/bundled", "revision": "local"},
        type="AudioZeroshotClassification", category="a2t", eval_splits=["test"], eval_langs=["zxx-Zxxx"],
        main_score="accuracy", date=None, domains=None, task_subtypes=None, license=None,
        annotations_creators=None, dialect=None, modalities=["audio", "text"], sample_creation=None,
        bibtex_citation=None)
    input_column_name = "audio"
    label_column_name = "label"

    def load_data(self, **kwargs) -> None:
        arrays, labels = bundled()
        audio = [{"array": a.tolist(), "sampling_rate": RATE} for a in arrays]
        self.dataset = DatasetDict({"test": Dataset.from_dict({"audio": audio, "label": labels})})
        self.data_loaded = True

    def get_candidate_labels(self) -> list[str]:
        return PROMPTS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model with random weights, saved as clap-train saves (config and state dict)."""
    torch.manual_seed(0)
    model = CLAP(get_preset("tiny")).eval()
    perturb(model, seed=1)
    clap = CLAPInference(model, device="cpu")
    centre(model.audio_projection[-1], lambda: clap.embed_audio(bundled()[0], sample_rate=RATE))
    centre(model.text_projection[-1], lambda: clap.embed_text(PROMPTS))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)
    return path


def test_mteb_zero_shot_task_scores_our_checkpoint_as_clap_inference_does(checkpoint, tmp_path):
    encoder = CLAPEncoder(str(checkpoint), device="cpu")
    result = mteb.evaluate(encoder, BundledZeroshot(), cache=None, co2_tracker=False, show_progress_bar=False,
                           prediction_folder=tmp_path)
    [task_result] = result.task_results
    [scores] = task_result.scores["test"]

    arrays, labels = bundled()
    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    ours = (clap.embed_audio(arrays, sample_rate=RATE) @ clap.embed_text(PROMPTS).T).argmax(dim=1)
    assert len(set(ours.tolist())) >= 2  # the random model tells the clips apart: the check has teeth
    assert scores["accuracy"] == pytest.approx(float((ours == torch.tensor(labels)).float().mean()))
    predictions = json.loads(next(tmp_path.glob("*predictions.json")).read_text())
    probabilities = np.asarray(predictions["test"] if "test" in predictions else predictions["default"]["test"])
    assert probabilities.argmax(axis=1).tolist() == ours.tolist()


def suite_results() -> dict:
    """A results.json of `clap-eval --suite` as it lays one out (the parts the converter reads)."""
    torch.manual_seed(0)
    audio = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    text = torch.nn.functional.normalize(audio.repeat_interleave(5, 0) + 0.8 * torch.randn(30, 8), dim=1)
    retrieval = retrieval_metrics(audio, text, torch.arange(6).repeat_interleave(5))

    def task(name, dataset, kind, metrics, folds=(), split="test"):
        return {"name": name, "protocol": {"dataset": dataset, "kind": kind, "split": split, "folds": list(folds)},
                "metrics": metrics, "clips": 6, "seconds": 1.5}

    return {"format": "audiodata-clap-eval-suite/1", "tool": "clap-eval", "version": "0.1.0",
            "checkpoint": {"name": "../630k-audioset-best.pt", "sha256": "ab" * 32},
            "tasks": [task("esc50-all", "esc50", "zeroshot", {"accuracy": 0.875, "top5": 0.99, "mean_rank": 1.4}),
                      task("esc50-fold1", "esc50", "zeroshot", {"accuracy": 0.9}, folds=(1,)),
                      task("us8k", "us8k", "zeroshot", {"accuracy": 0.75}),
                      task("gtzan", "gtzan", "zeroshot", {"accuracy": 0.5}),
                      task("clotho", "clotho", "retrieval", retrieval)]}


def test_suite_results_convert_to_results_mteb_reads_and_validates(tmp_path):
    results = suite_results()
    converted, left_out = mteb_results(results)
    assert [c["task_name"] for c in converted] == ["ESC50_Zeroshot", "UrbanSound8kZeroshot", "ClothoA2TRetrieval",
                                                   "ClothoT2ARetrieval"]
    assert any(line.startswith("esc50-fold1: folds [1]") for line in left_out)
    assert any(line.startswith("gtzan: no MTEB task") for line in left_out)
    retrieval = results["tasks"][-1]["metrics"]
    for entry in converted:
        task = mteb.get_task(entry["task_name"])
        loaded = TaskResult.from_dict(entry)
        # mteb's own check: the splits and languages its task scores are there
        assert loaded.validate_and_filter_scores(task=task).scores == loaded.scores
        assert task.metadata.main_score in loaded.scores[task.metadata.eval_splits[0]][0]
    a2t, t2a = (TaskResult.from_dict(c).scores["test"][0] for c in converted[2:])
    assert a2t["hit_rate_at_5"] == a2t["main_score"] == retrieval["audio_to_text_R@5"]
    assert t2a["recall_at_10"] == retrieval["text_to_audio_R@10"] and t2a["map_at_10"] == retrieval["text_to_audio_mAP@10"]
    assert TaskResult.from_dict(converted[0]).get_score() == 0.875

    written = write_mteb_results(results, tmp_path / "results")
    assert [p.parent.relative_to(tmp_path) for p in written] == [Path("results/audiodata__630k-audioset-best.pt/abababababab")] * 4
    assert TaskResult.from_disk(written[2]).scores == TaskResult.from_dict(converted[2]).scores
    with pytest.raises(ValueError, match="not a clap-eval --suite results file"):
        mteb_results({"tasks": []})
