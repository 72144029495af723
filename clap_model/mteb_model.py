"""MTEB (and its audio part, MAEB): any checkpoint clap-eval loads as an MTEB audio-text encoder,
and `clap-eval --suite` results in MTEB's result layout.

    import mteb
    from clap_model.mteb_model import CLAPEncoder
    model = CLAPEncoder("630k-audioset-best.pt", model="htsat-tiny-roberta")   # or ours, msclap, HF
    mteb.evaluate(model, mteb.get_tasks(tasks=["ESC50_Zeroshot"]))

`CLAPEncoder` needs the `mteb` package (parity/requirements-mteb.txt: mteb 2 wants transformers 5,
so it lives beside, not in, the parity venv). Audio reaches the model as clap-eval feeds it: our
resampler (soxr), a clip longer than the model's cut at its start (fusion: whole, centred local
crops), shorter ones filled as in training; text is tokenized by the checkpoint's tokenizer.
MTEB builds its own prompts ("This is a sound of sea_waves" for ESC-50: no full stop, underscores
kept), so its numbers follow its protocol, not a reference's.

`mteb_results` needs no mteb: it turns a results.json of `clap-eval --suite` into MTEB TaskResult
dicts, one per task that has an MTEB counterpart scoring the same clips with the same metric
(ESC-50 and UrbanSound8K zero-shot over all clips; Clotho and AudioCaps retrieval). Metrics map
only where the definitions agree: zero-shot accuracy; audio-to-text R@k (the best of the clip's
captions) is MTEB's hit_rate_at_k; text-to-audio R@k (one relevant clip) is its recall_at_k and
hit_rate_at_k; mAP@10 (ours sorted by rank) is its map_at_10 (trec's map_cut_10) in both directions.
"""
from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from clap_model import files
from clap_model.suite_results import FORMAT as RESULTS_FORMAT

# (dataset, kind) in a suite -> the MTEB task names, the split MTEB scores, its languages.
MTEB_TASKS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("esc50", "zeroshot"): (("ESC50_Zeroshot", "zeroshot"),),
    ("us8k", "zeroshot"): (("UrbanSound8kZeroshot", "zeroshot"),),
    ("clotho", "retrieval"): (("ClothoA2TRetrieval", "a2t"), ("ClothoT2ARetrieval", "t2a")),
    ("audiocaps", "retrieval"): (("AudioCapsA2TRetrieval", "a2t"), ("AudioCapsT2ARetrieval", "t2a")),
}
MTEB_SPLIT = {"zeroshot": "train", "a2t": "test", "t2a": "test"}  # the split each MTEB task scores
MTEB_LANGUAGES = {"ESC50_Zeroshot": ["zxx-Zxxx"], "UrbanSound8kZeroshot": ["zxx-Zxxx"],
                  "ClothoA2TRetrieval": ["eng-Latn"], "ClothoT2ARetrieval": ["eng-Latn"],
                  "AudioCapsA2TRetrieval": ["eng-Latn", "zxx-Zxxx"],
                  "AudioCapsT2ARetrieval": ["eng-Latn", "zxx-Zxxx"]}
MAIN_SCORE = {"zeroshot": "accuracy", "a2t": "hit_rate_at_5", "t2a": "hit_rate_at_5"}


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    return float(value) if ok else None


def _scores(kind: str, metrics: dict[str, Any]) -> dict[str, float]:
    """Our metrics under MTEB's names, those whose definitions agree (module docstring)."""
    if kind == "zeroshot":
        pairs = {"accuracy": "accuracy"}
    elif kind == "a2t":
        pairs = {f"hit_rate_at_{k}": f"audio_to_text_R@{k}" for k in (1, 5, 10)}
        pairs["map_at_10"] = "audio_to_text_mAP@10"
    else:
        pairs = {f"{name}_at_{k}": f"text_to_audio_R@{k}" for k in (1, 5, 10) for name in ("hit_rate", "recall")}
        pairs["map_at_10"] = "text_to_audio_mAP@10"
    found = {ours: _number(metrics.get(theirs)) for ours, theirs in pairs.items()}
    return {name: value for name, value in found.items() if value is not None}


def _skip_reason(task: dict[str, Any]) -> str | None:
    protocol = task.get("protocol") if isinstance(task.get("protocol"), dict) else {}
    key = (protocol.get("dataset"), protocol.get("kind"))
    if key not in MTEB_TASKS:
        return f"no MTEB task scores {key[0]} {key[1]} as this suite does"
    if key[1] == "zeroshot" and protocol.get("folds"):
        return f"folds {protocol['folds']}: MTEB's task scores every clip"
    if key[1] == "retrieval" and protocol.get("split") not in (None, "test"):
        return f"split {protocol.get('split')}: MTEB's task scores the test split"
    return None


def mteb_results(results: dict[str, Any], mteb_version: str = "audiodata") -> tuple[list[dict[str, Any]], list[str]]:
    """(MTEB TaskResult dicts, the tasks left out and why) of a `clap-eval --suite` results.json
    (read as data: a file that is not one is a ValueError)."""
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ValueError(f"not a clap-eval --suite results file (format {RESULTS_FORMAT})")
    converted, left_out = [], []
    for task in results.get("tasks") or []:
        if not isinstance(task, dict):
            continue
        name = str(task.get("name", ""))
        reason = _skip_reason(task)
        if reason:
            left_out.append(f"{name}: {reason}")
            continue
        protocol, metrics = task["protocol"], task.get("metrics") if isinstance(task.get("metrics"), dict) else {}
        for mteb_name, kind in MTEB_TASKS[(protocol["dataset"], protocol["kind"])]:
            scores = _scores(kind, metrics)
            if MAIN_SCORE[kind] not in scores:
                left_out.append(f"{name}: no {MAIN_SCORE[kind]} for {mteb_name}")
                continue
            entry = {**scores, "main_score": scores[MAIN_SCORE[kind]], "hf_subset": "default",
                     "languages": MTEB_LANGUAGES[mteb_name]}
            seconds = _number(task.get("seconds"))
            converted.append({"dataset_revision": f"audiodata:{name}", "task_name": mteb_name,
                              "mteb_version": mteb_version, "scores": {MTEB_SPLIT[kind]: [entry]},
                              "evaluation_time": seconds, "kg_co2_emissions": None})
    return converted, left_out


def _safe_part(text: str) -> str:
    """One path component from data (a checkpoint's name): no separators, no dot-only names."""
    part = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "model"
    return part[:100]


def write_mteb_results(results: dict[str, Any], out: Path) -> list[Path]:
    """MTEB's results folder layout under `out`: {model}/{revision}/{task}.json (its ResultCache
    reads it). The model is the checkpoint's name, the revision the start of its sha256."""
    converted, _ = mteb_results(results)
    checkpoint = results.get("checkpoint") if isinstance(results.get("checkpoint"), dict) else {}
    sha = checkpoint.get("sha256") if isinstance(checkpoint.get("sha256"), str) else ""
    name = Path(str(checkpoint.get("name") or "checkpoint")).name  # data: a name, never a path
    model_folder = out / _safe_part(f"audiodata__{name}")
    folder = model_folder / (_safe_part(sha[:12]) if sha else "no_revision")
    for level in (out, model_folder, folder):  # no planted link is written through
        files.make_folder(level)
    written = []
    for task in converted:
        path = folder / f"{_safe_part(task['task_name'])}.json"
        with files.replacing(path) as tmp:
            tmp.write_text(json.dumps(task, indent=2) + "\n")
        written.append(path)
    return written


@lru_cache(maxsize=None)
def _encoder_class():
    """CLAPEncoder, defined once mteb is importable (a clear error where it is not)."""
    try:
        from mteb.models.abs_encoder import AbsEncoder
    except ImportError as exc:
        raise ImportError("clap_model.mteb_model.CLAPEncoder needs the mteb package "
                          "(pip install -r parity/requirements-mteb.txt)") from exc
    import numpy as np
    import torch

    from clap_model.inference import CLAPInference

    class CLAPEncoder(AbsEncoder):
        """An MTEB encoder over CLAPInference: audio columns to audio embeddings, text to text
        embeddings, both L2-normalised (MTEB scores them by cosine similarity)."""

        def __init__(self, checkpoint: str | Path, model: str | None = None, text_model: str | None = None,
                     device: str | None = None, precision: str | None = None, name: str | None = None,
                     max_checkpoint_bytes: int | None = None) -> None:
            from mteb.models.model_meta import ModelMeta, ScoringFunction

            self.clap = CLAPInference.from_checkpoint(checkpoint, model, text_model, max_checkpoint_bytes,
                                                      device=device, precision=precision)
            self.model = self.clap.model
            label = name or f"audiodata/{Path(str(checkpoint).rstrip('/')).name}"
            self.mteb_model_meta = ModelMeta.create_empty(overwrites={
                "name": label, "revision": "local", "modalities": ["audio", "text"],
                "embed_dim": self.model.cfg.joint_dim, "similarity_fn_name": ScoringFunction.COSINE})

        def _audio(self, batches) -> np.ndarray:
            out = []
            for batch in batches:
                items = batch["audio"]
                start = 0
                while start < len(items):  # runs of one sample rate go in one call
                    rate = int(items[start]["sampling_rate"])
                    end = start
                    while end < len(items) and int(items[end]["sampling_rate"]) == rate:
                        end += 1
                    arrays = [np.asarray(item["array"], dtype=np.float32) for item in items[start:end]]
                    out.append(self.clap.embed_audio(arrays, sample_rate=rate))
                    start = end
            return torch.cat(out).numpy() if out else np.zeros((0, self.model.cfg.joint_dim), np.float32)

        def _text(self, batches) -> np.ndarray:
            out = [self.clap.embed_text(list(batch["text"])) for batch in batches]
            return torch.cat(out).numpy() if out else np.zeros((0, self.model.cfg.joint_dim), np.float32)

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
                   **kwargs: Any) -> np.ndarray:
            columns = set(inputs.dataset.column_names)
            if "audio" in columns and "text" in columns:
                raise ValueError("CLAPEncoder embeds audio or text, not both in one input")
            if "audio" in columns:
                return self._audio(inputs)
            if "text" in columns:
                return self._text(inputs)
            raise ValueError(f"CLAPEncoder found neither an audio nor a text column in {sorted(columns)}")

    return CLAPEncoder


def __getattr__(name: str):
    if name == "CLAPEncoder":
        return _encoder_class()
    raise AttributeError(name)
