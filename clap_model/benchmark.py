"""`clap-eval --suite`: score a checkpoint on a benchmark suite's tasks, as each reference did.

For every task whose dataset is built under DATA_ROOT (DATA_ROOT/<dataset>/<split>/ holding
sizes.json and shards), the split's clips are embedded (fixed crop by default: the start, centred
local crops for fusion, as `embed` does; or the reference's random crop, seeded per clip), and:
- zeroshot: single-label accuracy (top-1, top-5, mean rank) and per-class accuracy against one text
  embedding per class (the mean of its prompts' normalised embeddings);
- multilabel: macro mAP over classes (FSD50K);
- retrieval: R@1/5/10, mAP@10, mean and median rank each way, every caption of a clip counted
  (clap_model.metrics.retrieval_metrics).
A task whose data is absent is skipped with its reason. The results carry every protocol choice.

The sample JSON fields read: `class_labels` (list, the dataset's spelling; `tag` when absent),
`class_ids` (orders the classes when present), `fold`; `text` for retrieval captions.
"""
from __future__ import annotations

import math
import os
import stat
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from clap_model.clap import CLAP
from clap_model import files
from clap_model.config import UsageError
from clap_model.data import AudioSpec, LoaderConfig, ShardDataset, ShardSet, make_loader
from clap_model.metrics import class_ranks, multilabel_map, per_class_accuracy, retrieval_metrics
from clap_model.suites import Prompts, Suite, Task
from clap_model.text import Tokenize
from clap_model.train import Embedded, autocast, embed_batches, to_device
from audio_dataset.schema import SIZES_FILE

META_FIELDS = ("class_labels", "class_ids", "fold", "tag")


@dataclass
class Options:
    """How the suite is run (the command line's choices)."""

    crop: str = "fixed"  # fixed | random
    seed: int = 0
    repeats: int = 1
    batch_size: int = 64
    workers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "fp32"
    max_fusion_seconds: float = 60.0
    prompts: Prompts | None = None
    log: Callable[[str], None] = print


@dataclass
class TaskResult:
    task: Task
    metrics: dict[str, float]  # the mean over repeats
    spread: dict[str, float]  # the standard deviation over repeats (0 for one)
    repeats: list[dict[str, float]]
    clips: int
    details: dict[str, Any]  # classes, per-class accuracy, prompts, skipped clips
    seconds: float


# ---- which tasks have data ------------------------------------------------------------------------


def task_folder(task: Task, data_root: Path) -> tuple[Path | None, str]:
    """The task's split folder under the data root, or None and why it is skipped. Links are not
    followed: a build's folders are folders."""
    for path in (data_root / task.dataset, data_root / task.dataset / task.split):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            if path.name == task.dataset:
                return None, f"{task.dataset} is not built under {data_root}"
            return None, f"{data_root / task.dataset} has no {task.split} split"
        if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
            return None, f"{path} is {'a symbolic link' if stat.S_ISLNK(mode) else 'not a folder'}; not read"
    folder = data_root / task.dataset / task.split
    if not (folder / SIZES_FILE).is_file():
        return None, f"{folder} holds no build ({SIZES_FILE} missing)"
    return folder, ""


# ---- embedding ----------------------------------------------------------------------------------


def audio_spec_for(model: CLAP, task: Task, opts: Options) -> AudioSpec:
    """The model's own rate and clip length (what it was trained on); the task's filling."""
    cfg = model.cfg
    truncating = "fusion" if cfg.enable_fusion else "rand_trunc"
    return AudioSpec(cfg.audio.sample_rate, cfg.audio.clip_samples, truncating, task.filling,
                     int(opts.max_fusion_seconds * cfg.audio.sample_rate))


def embed_split(model: CLAP, folder: Path, spec: AudioSpec, tokenize: Tokenize, opts: Options,
                crop_seed: int | None, captions: bool) -> Embedded:
    cfg = LoaderConfig(batch_size=opts.batch_size, audio=spec, train=False, meta_fields=META_FIELDS,
                       eval_crop_seed=crop_seed)
    dataset = ShardDataset(ShardSet.from_spec(str(folder)), cfg, tokenize)
    return embed_batches(model, make_loader(dataset, opts.workers), opts.device, opts.precision, captions)


@torch.no_grad()
def class_embeddings(model: CLAP, tokenize: Tokenize, prompts: list[list[str]], device: torch.device,
                     precision: str, batch_size: int = 256) -> torch.Tensor:
    """One embedding per class: the mean of its prompts' normalised text embeddings, renormalised
    (CLIP's prompt ensembles; one prompt gives its own embedding)."""
    flat = [p for group in prompts for p in group]
    parts = []
    for start in range(0, len(flat), batch_size):
        tokens = to_device(dict(tokenize(flat[start : start + batch_size])), device)
        with autocast(device, precision):
            parts.append(model.encode_text(tokens).float().cpu())
    text = torch.nn.functional.normalize(torch.cat(parts), dim=-1)
    owner = torch.tensor([i for i, group in enumerate(prompts) for _ in group])
    means = torch.zeros(len(prompts), text.shape[1]).index_add_(0, owner, text)
    return torch.nn.functional.normalize(means, dim=-1)


# ---- labels --------------------------------------------------------------------------------------


def labels_of(meta: dict[str, Any]) -> list[str]:
    labels = meta.get("class_labels")
    if labels is None:
        labels = meta.get("tag")
    if isinstance(labels, str):
        labels = [labels]
    return [x for x in labels if isinstance(x, str) and x] if isinstance(labels, list) else []


def class_list(meta: list[dict[str, Any]]) -> list[str]:
    """Every label of the split, in the dataset's id order where its samples carry ids, else sorted."""
    ids: dict[str, int] = {}
    names: set[str] = set()
    for m in meta:
        labels = labels_of(m)
        names.update(labels)
        found = m.get("class_ids")
        if isinstance(found, list) and len(found) == len(labels):
            for label, index in zip(labels, found):
                if isinstance(index, int) and not isinstance(index, bool):
                    ids.setdefault(label, index)
    return sorted(names, key=lambda n: (ids.get(n, math.inf), n))


def in_folds(meta: dict[str, Any], folds: tuple[int, ...]) -> bool:
    fold = meta.get("fold")
    return not folds or (isinstance(fold, int) and not isinstance(fold, bool) and fold in folds)


# ---- scoring --------------------------------------------------------------------------------------


def score_classification(model: CLAP, tokenize: Tokenize, task: Task, embedded: Embedded, opts: Options
                         ) -> tuple[dict[str, float], dict[str, Any]]:
    classes = class_list(embedded.meta)
    if len(classes) < 2:
        raise UsageError(f"task {task.name}: its clips carry {len(classes)} class label(s) "
                         "(class_labels or tag); zero-shot needs at least two")
    prompts = opts.prompts or Prompts()
    class_prompts = [prompts.prompts(task, c) for c in classes]
    class_text = class_embeddings(model, tokenize, class_prompts, opts.device, opts.precision)
    index = {c: i for i, c in enumerate(classes)}
    keep = [i for i, m in enumerate(embedded.meta) if in_folds(m, task.folds)]
    details: dict[str, Any] = {"classes": classes, "prompts": dict(zip(classes, class_prompts)),
                               "clips_outside_folds": len(embedded.meta) - len(keep)}
    if task.kind == "multilabel":
        targets = torch.zeros(len(keep), len(classes))
        for row, i in enumerate(keep):
            for label in labels_of(embedded.meta[i]):
                targets[row, index[label]] = 1.0
        if not keep:
            raise UsageError(f"task {task.name}: no clip in folds {list(task.folds)}")
        found, per_class = multilabel_map(embedded.audio[keep], class_text, targets)
        details["per_class_ap"] = dict(zip(classes, per_class))
        details["clips_scored"] = len(keep)
        return {"mAP": found}, details
    single = [i for i in keep if len(labels_of(embedded.meta[i])) == 1]
    details["clips_without_one_label"] = len(keep) - len(single)
    if not single:
        raise UsageError(f"task {task.name}: no clip in folds {list(task.folds) or 'all'} has one class label")
    labels = torch.tensor([index[labels_of(embedded.meta[i])[0]] for i in single])
    ranks = class_ranks(embedded.audio[single], class_text, labels)
    details["per_class_accuracy"] = dict(zip(classes, per_class_accuracy(ranks, labels, len(classes))))
    details["predictions"] = {embedded.keys[i]: classes[int(p)] for i, p in
                              zip(single, (embedded.audio[single] @ class_text.T).argmax(dim=1))}
    ranks = ranks.float()
    metrics = {"accuracy": float((ranks < 1).double().mean()), "top5": float((ranks < 5).double().mean()),
               "mean_rank": float(ranks.mean() + 1)}
    details["clips_scored"] = len(single)
    return metrics, details


def score_retrieval(task: Task, embedded: Embedded) -> tuple[dict[str, float], dict[str, Any]]:
    keep = [i for i, m in enumerate(embedded.meta) if in_folds(m, task.folds)]
    if len(keep) < len(embedded.meta):
        rows = torch.tensor(keep)
        mask = torch.isin(embedded.owner, rows)
        remap = torch.full((len(embedded.meta),), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(keep))
        audio, text, owner = embedded.audio[rows], embedded.text[mask], remap[embedded.owner[mask]]
    else:
        audio, text, owner = embedded.audio, embedded.text, embedded.owner
    metrics = retrieval_metrics(audio, text, owner)
    counts = torch.bincount(owner, minlength=len(audio))
    return metrics, {"clips_scored": len(audio), "captions": len(text),
                     "captions_per_clip": sorted({int(c) for c in counts})}


def run_task(model: CLAP, tokenize: Tokenize, task: Task, folder: Path, opts: Options,
             cache: dict[tuple, Embedded] | None = None) -> TaskResult:
    """One task, `opts.repeats` times under random crops; `cache` keeps a split's embeddings for the
    next task on the same clips under the same audio settings (ESC-50 fold 1, then all of it).
    The details (per-class accuracy, predictions) are the last repeat's."""
    start = time.perf_counter()
    cache = {} if cache is None else cache
    spec = audio_spec_for(model, task, opts)
    runs, details, clips = [], {}, 0
    seeds = [opts.seed + r for r in range(opts.repeats)] if opts.crop == "random" else [None]
    for crop_seed in seeds:
        captions = task.kind == "retrieval"
        key = (str(folder), spec, crop_seed, captions)
        if key not in cache:
            cache[key] = embed_split(model, folder, spec, tokenize, opts, crop_seed, captions)
        embedded = cache[key]
        if task.kind == "retrieval":
            found, details = score_retrieval(task, embedded)
        else:
            found, details = score_classification(model, tokenize, task, embedded, opts)
        runs.append({m: found[m] for m in found})
        clips = details["clips_scored"] if "clips_scored" in details else len(embedded.meta)
        opts.log(f"{task.name}: " + " ".join(f"{k} {v:.4f}" for k, v in found.items() if k in task.metrics)
                 + (f" (crop seed {crop_seed})" if crop_seed is not None else ""))
    names = list(runs[0])
    mean = {m: statistics.fmean(r[m] for r in runs) for m in names}
    spread = {m: statistics.pstdev([r[m] for r in runs]) if len(runs) > 1 else 0.0 for m in names}
    details["of_crop_seed"] = seeds[-1]
    details["audio"] = {"sample_rate": spec.sample_rate, "clip_seconds": spec.clip_samples / spec.sample_rate,
                        "truncating": spec.truncating, "filling": spec.filling,
                        "crop": "random" if opts.crop == "random" else
                        ("centre (fusion)" if spec.truncating == "fusion" else "start"),
                        "crop_seeds": seeds if opts.crop == "random" else []}
    # The model is fed what it was trained on; say so where the reference fed its own model otherwise.
    reference = (task.sample_rate, task.clip_seconds)
    ours = (spec.sample_rate, spec.clip_samples / spec.sample_rate)
    details["audio"]["as_reference"] = None if None in reference else reference == ours
    return TaskResult(task, mean, spread, runs, clips, details, time.perf_counter() - start)


# ---- the whole suite -------------------------------------------------------------------------------


def checkpoint_sha256(path: str) -> str | None:
    """The file's sha256; a folder's (Hugging Face) over its files' names and contents in name order;
    None for a hub id (nothing local to hash)."""
    target = Path(path)
    if not (target.is_file() or target.is_dir()):
        return None
    return files.tree_sha256(target, skip_links=True)


def published_for(task: Task, checkpoint: str, reference: str | None) -> dict[str, dict[str, Any]]:
    """metric -> the published row for this checkpoint: the one `reference` names, else the one whose
    checkpoint is this file's (or folder's, or hub id's) name."""
    wanted = reference or Path(checkpoint.rstrip("/")).name
    rows = {}
    for row in task.published:
        if row.checkpoint == wanted or (not reference and row.checkpoint == checkpoint):
            rows[row.metric] = {"value": row.value, "checkpoint": row.checkpoint, "source": row.source}
    return rows


def run_suite(model: CLAP, tokenize: Tokenize, suite: Suite, data_root: Path, opts: Options
              ) -> tuple[list[TaskResult], list[dict[str, str]]]:
    results, skipped = [], []
    cache: dict[tuple, Embedded] = {}
    for task in suite.tasks:
        folder, why = task_folder(task, data_root)
        if folder is None:
            skipped.append({"task": task.name, "dataset": task.dataset, "reason": why})
            opts.log(f"{task.name}: skipped ({why})")
            continue
        try:
            results.append(run_task(model, tokenize, task, folder, opts, cache))
        except UsageError as exc:  # this task's data cannot be scored: named, the others go on
            skipped.append({"task": task.name, "dataset": task.dataset, "reason": f"not scored: {exc}"})
            opts.log(f"{task.name}: not scored ({exc})")
    return results, skipped


def results_document(suite: Suite, results: list[TaskResult], skipped: list[dict[str, str]], model: CLAP,
                     checkpoint: str, reference: str | None, opts: Options, version: str) -> dict[str, Any]:
    """results.json: the suite, the checkpoint (name, sha256, what the model takes), how it was run,
    and per task every protocol choice, the metrics (mean, spread and each repeat), the published
    numbers beside them, per-class accuracy; the tasks skipped and why."""
    from clap_model.suite_results import FORMAT

    cfg = model.cfg
    tasks = []
    for result in results:
        published = published_for(result.task, checkpoint, reference)
        tasks.append({
            "name": result.task.name, "protocol": result.task.protocol(), "audio": result.details.pop("audio"),
            "clips": result.clips, "seconds": round(result.seconds, 3),
            "metrics": result.metrics, "spread": result.spread, "repeats": result.repeats,
            "published": published,
            "difference": {m: result.metrics[m] - row["value"] for m, row in published.items() if m in result.metrics},
            "published_for": sorted({row.checkpoint for row in result.task.published}),
            "details": result.details,
        })
    return {
        "format": FORMAT, "tool": "clap-eval", "version": version,
        "suite": {"name": suite.name, "file": suite.path, "description": suite.description,
                  "left_out": list(suite.left_out)},
        "checkpoint": {"path": checkpoint, "name": Path(checkpoint.rstrip("/")).name,
                       "sha256": checkpoint_sha256(checkpoint), "reference": reference,
                       "sample_rate": cfg.audio.sample_rate, "clip_seconds": cfg.audio.clip_samples / cfg.audio.sample_rate,
                       "fusion": cfg.enable_fusion},
        "run": {"crop": opts.crop, "seed": opts.seed, "repeats": opts.repeats, "batch_size": opts.batch_size,
                "device": str(opts.device), "precision": opts.precision,
                "max_fusion_seconds": opts.max_fusion_seconds,
                "templates": opts.prompts.record() if opts.prompts else None},
        "tasks": tasks,
        "skipped": skipped,
    }
