"""Benchmark suites: each reference's evaluation protocol as data (manifests/suites/*.toml).

A suite names, per task, the dataset (an audiodata source's name: DATA_ROOT/<dataset>/ holds its
build), the split and folds, the prompt template(s), how labels become class names, the
reference's sample rate, clip length, crop and filling, the metrics, and the published numbers
with where each comes from. Pure Python (no torch): `clap-eval --suite` checks the file before
loading a model. A suite file is read as data, never executed; a mistake in it is one line.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from clap_model.config import UsageError

KINDS = ("zeroshot", "multilabel", "retrieval")
CROPS = ("random", "start", "centre")
FILLINGS = ("repeatpad", "repeat", "pad")
# The metrics each kind reports (names as results.json and the table give them).
METRICS: dict[str, tuple[str, ...]] = {
    "zeroshot": ("accuracy", "top5", "mean_rank"),
    "multilabel": ("mAP",),
    "retrieval": tuple(f"{d}_{m}" for d in ("text_to_audio", "audio_to_text")
                       for m in ("R@1", "R@5", "R@10", "mAP@10", "mean_rank", "median_rank")),
}
MAX_SUITE_BYTES = 1 << 20


class SuiteError(UsageError):
    """A suite or templates file that cannot be used: one line, exit 2."""


@dataclass(frozen=True)
class Published:
    """One number a reference published for one of its checkpoints."""

    checkpoint: str  # the released file (or hub id) the number is for
    metric: str
    value: float  # a fraction (0.9275), as ours are
    source: str  # paper table or README line, with the version read


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    kind: str
    split: str = "test"
    folds: tuple[int, ...] = ()  # empty: every clip of the split
    templates: tuple[str, ...] = ("This is a sound of {}.",)
    underscores_to_spaces: bool = True
    lowercase: bool = False
    sample_rate: int | None = None  # the reference's; the model's own rate is what it is fed
    clip_seconds: float | None = None
    crop: str = "random"  # what the reference did; clap-eval's default is a fixed crop all the same
    filling: str = "repeatpad"
    metrics: tuple[str, ...] = ()
    published: tuple[Published, ...] = ()
    notes: str = ""

    def class_name(self, label: str) -> str:
        """A dataset's label as the reference wrote it into its prompts."""
        name = label.replace("_", " ") if self.underscores_to_spaces else label
        return name.lower() if self.lowercase else name

    def protocol(self) -> dict[str, Any]:
        """Every protocol choice, for results.json."""
        return {"dataset": self.dataset, "kind": self.kind, "split": self.split, "folds": list(self.folds),
                "templates": list(self.templates), "underscores_to_spaces": self.underscores_to_spaces,
                "lowercase": self.lowercase, "reference_sample_rate": self.sample_rate,
                "reference_clip_seconds": self.clip_seconds, "reference_crop": self.crop,
                "filling": self.filling, "metrics": list(self.metrics), "notes": self.notes}


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    tasks: tuple[Task, ...]
    left_out: tuple[str, ...] = ()
    path: str = ""


# ---- reading -----------------------------------------------------------------------------------


def shipped_suites() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("manifests").joinpath("suites").iterdir()
                  if p.name.endswith(".toml"))


def suite_text(name_or_file: str) -> tuple[str, str]:
    """(text, where) of a shipped suite's name or a suite file's path."""
    shipped = resources.files("manifests").joinpath("suites", f"{name_or_file}.toml")
    if "/" not in name_or_file and not name_or_file.endswith(".toml") and shipped.is_file():
        return shipped.read_text(encoding="utf-8"), f"suite {name_or_file}"
    path = Path(name_or_file)
    if not path.is_file():
        raise SuiteError(f"--suite {name_or_file}: no such suite (shipped: {', '.join(shipped_suites())}) "
                         "nor suite file")
    if path.stat().st_size > MAX_SUITE_BYTES:
        raise SuiteError(f"{path}: over {MAX_SUITE_BYTES >> 20} MiB, not a suite file")
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read suite file {path}: {exc}") from None


def load_suite(name_or_file: str) -> Suite:
    """A shipped suite by name (`laion-clap`) or a suite file, checked whole; SuiteError otherwise."""
    text, where = suite_text(name_or_file)
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:  # tomllib recurses per nested array or table
        raise SuiteError(f"{where}: not valid TOML ({str(exc)[:200]})") from None
    return parse_suite(data, where)


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise SuiteError(f"{where}: missing {key!r}")
        return default
    value = table[key]
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise SuiteError(f"{where}: {key!r} must be {_kind_name(kind)}, not a boolean")
    if not isinstance(value, kind):
        raise SuiteError(f"{where}: {key!r} must be {_kind_name(kind)}, not {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join({str: "a string", int: "an integer", float: "a number", bool: "true or false",
                        list: "a list", dict: "a table"}.get(k, k.__name__) for k in kinds)


def _strings(table: dict[str, Any], key: str, where: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    values = _get(table, key, list, where, list(default))
    if not all(isinstance(v, str) for v in values):
        raise SuiteError(f"{where}: {key!r} must be a list of strings")
    return tuple(values)


def check_template(template: str, where: str) -> None:
    """A prompt template with one bare `{}` for the class name. Nothing else in braces: str.format
    would read attributes (`{0.__class__}`) or pad to any width (`{:>99999999}`) for a stranger's file."""
    if template.count("{") != 1 or template.count("}") != 1 or "{}" not in template:
        raise SuiteError(f"{where}: template {template!r} needs exactly one {{}} for the class name")


def _published(rows: Any, where: str, metrics: tuple[str, ...]) -> tuple[Published, ...]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise SuiteError(f"{where}: 'published' must be a list of tables")
    out = []
    for i, row in enumerate(rows):
        at = f"{where} published[{i}]"
        metric = _get(row, "metric", str, at)
        if metric not in metrics:
            raise SuiteError(f"{at}: metric {metric!r} is not one of this task's ({', '.join(metrics)})")
        value = float(_get(row, "value", (int, float), at))
        if not 0.0 <= value <= (1e6 if "rank" in metric else 1.0):
            raise SuiteError(f"{at}: value {value} out of range (fractions: 0.9275, not 92.75)")
        source = _get(row, "source", str, at)
        if not source.strip():
            raise SuiteError(f"{at}: every published number needs its source")
        out.append(Published(_get(row, "checkpoint", str, at), metric, value, source))
    return tuple(out)


def parse_task(table: Any, where: str) -> Task:
    if not isinstance(table, dict):
        raise SuiteError(f"{where}: a task is a table")
    name = _get(table, "name", str, where)
    where = f"{where} ({name})"
    known = {"name", "dataset", "kind", "split", "folds", "templates", "underscores_to_spaces", "lowercase",
             "sample_rate", "clip_seconds", "crop", "filling", "metrics", "published", "notes"}
    if unknown := sorted(set(table) - known):
        raise SuiteError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    kind = _get(table, "kind", str, where)
    if kind not in KINDS:
        raise SuiteError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    dataset = _get(table, "dataset", str, where)
    if not dataset or "/" in dataset or dataset.startswith("."):
        raise SuiteError(f"{where}: dataset {dataset!r} must be a source's name (a folder under --data-root)")
    split = _get(table, "split", str, where, "test")
    if not split or "/" in split or split.startswith((".", "_")):
        raise SuiteError(f"{where}: split {split!r} must be a split's folder name")
    folds = _get(table, "folds", list, where, [])
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in folds):
        raise SuiteError(f"{where}: 'folds' must be a list of integers")
    templates = _strings(table, "templates", where, ("This is a sound of {}.",))
    if kind != "retrieval":
        if not templates:
            raise SuiteError(f"{where}: a classification task needs at least one template")
        for template in templates:
            check_template(template, where)
    crop = _get(table, "crop", str, where, "random")
    filling = _get(table, "filling", str, where, "repeatpad")
    if crop not in CROPS or filling not in FILLINGS:
        raise SuiteError(f"{where}: crop must be one of {', '.join(CROPS)} and filling one of {', '.join(FILLINGS)}")
    metrics = _strings(table, "metrics", where, METRICS[kind])
    if bad := [m for m in metrics if m not in METRICS[kind]]:
        raise SuiteError(f"{where}: metric {bad[0]!r} is not one of {', '.join(METRICS[kind])}")
    rate = _get(table, "sample_rate", int, where, None)
    seconds = _get(table, "clip_seconds", (int, float), where, None)
    return Task(name=name, dataset=dataset, kind=kind, split=split, folds=tuple(folds), templates=templates,
                underscores_to_spaces=_get(table, "underscores_to_spaces", bool, where, True),
                lowercase=_get(table, "lowercase", bool, where, False), sample_rate=rate,
                clip_seconds=float(seconds) if seconds is not None else None, crop=crop, filling=filling,
                metrics=metrics, published=_published(table.get("published", []), where, metrics),
                notes=_get(table, "notes", str, where, ""))


def parse_suite(data: dict[str, Any], where: str) -> Suite:
    head = _get(data, "suite", dict, where)
    tasks = _get(data, "task", list, where)
    if not tasks:
        raise SuiteError(f"{where}: no [[task]]")
    parsed = tuple(parse_task(t, f"{where} task {i + 1}") for i, t in enumerate(tasks))
    names = [t.name for t in parsed]
    if len(set(names)) < len(names):
        raise SuiteError(f"{where}: two tasks are named {next(n for n in names if names.count(n) > 1)!r}")
    name = _get(head, "name", str, where)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise SuiteError(f"{where}: suite name {name!r} must be letters, digits, '.', '_' or '-' "
                         "(it names the default output folder)")
    return Suite(name=name, description=_get(head, "description", str, where, ""),
                 tasks=parsed, left_out=_strings(head, "left_out", where), path=where)


# ---- --templates FILE ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompts:
    """Prompt ensembles and class descriptions (`--templates FILE`): a class's text embedding is the
    mean of its prompts' normalised embeddings (as CLIP's ensembles), renormalised. Its prompts are
    every template filled with its name, and its descriptions as written."""

    templates: tuple[str, ...] = ()  # for every classification task without its own
    per_dataset: dict[str, tuple[str, ...]] = field(default_factory=dict)
    descriptions: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)  # dataset -> class -> texts
    path: str = ""

    def templates_for(self, task: Task) -> tuple[str, ...]:
        return self.per_dataset.get(task.dataset) or self.templates or task.templates

    def prompts(self, task: Task, label: str) -> list[str]:
        """The prompts of one class (`label` as the dataset spells it)."""
        name = task.class_name(label)
        described = self.descriptions.get(task.dataset, {})
        extra = described.get(label) or described.get(name) or ()
        return [t.format(name) for t in self.templates_for(task)] + list(extra)

    def record(self) -> dict[str, Any]:
        return {"file": self.path, "templates": list(self.templates),
                "per_dataset": {k: list(v) for k, v in self.per_dataset.items()},
                "descriptions": {d: {c: list(t) for c, t in m.items()} for d, m in self.descriptions.items()}}


def load_prompts(path: str) -> Prompts:
    """A templates file (TOML):

        templates = ["This is a sound of {}.", "A recording of {}."]   # every dataset
        [datasets.gtzan]
        templates = ["This is a {} song."]                               # this dataset's own
        [datasets.esc50.descriptions]
        dog = ["a dog barking"]                                          # added to the class's prompts
    """
    file = Path(path)
    try:
        if file.stat().st_size > MAX_SUITE_BYTES:
            raise SuiteError(f"--templates {path}: over {MAX_SUITE_BYTES >> 20} MiB")
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SuiteError(f"cannot read --templates {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise SuiteError(f"--templates {path}: not valid TOML ({str(exc)[:200]})") from None
    where = f"--templates {path}"
    if unknown := sorted(set(data) - {"templates", "datasets"}):
        raise SuiteError(f"{where}: unknown key {unknown[0]!r} (known: templates, datasets)")
    templates = _strings(data, "templates", where)
    per_dataset: dict[str, tuple[str, ...]] = {}
    descriptions: dict[str, dict[str, tuple[str, ...]]] = {}
    for dataset, table in _get(data, "datasets", dict, where, {}).items():
        at = f"{where} datasets.{dataset}"
        if not isinstance(table, dict):
            raise SuiteError(f"{at}: must be a table")
        if own := _strings(table, "templates", at):
            per_dataset[dataset] = own
        described = _get(table, "descriptions", dict, at, {})
        descriptions[dataset] = {label: _strings(described, label, at) for label in described}
    for template in (*templates, *(t for own in per_dataset.values() for t in own)):
        check_template(template, where)
    if not (templates or per_dataset or any(descriptions.values())):
        raise SuiteError(f"{where}: no templates and no descriptions")
    return Prompts(templates, per_dataset, descriptions, str(path))
