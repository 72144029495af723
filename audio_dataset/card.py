"""`audiodata card DATASET`: a Hugging Face dataset card (README.md) for a build output.

A YAML header the Hub reads (licences, size category, task categories, source datasets, the split
folders' shards) and a body: sources, counts, hours, licence classes, the commands that made the
output (from provenance.json), known limits and the papers the recipe follows.

Everything the card says is read from the output, which is untrusted data: the manifest is counted
with pyarrow a batch at a time (never whole as Python objects); provenance.json and recipe.json are
used only where their fields have the expected types. Header values come from fixed vocabularies or
are cut to one clean line and written by yaml.safe_dump (the header is parsed back before writing);
text in the body is Markdown- and HTML-escaped, and commands sit in code fences longer than any run
of backticks they hold, so nothing read can add a header field, a link or markup.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from upath import UPath

from audio_dataset import manifest
from audio_dataset.provenance import PROVENANCE_FILE
from audio_dataset.provenance import redact as redact_argv
from audio_dataset.recipe import STATUS_FILE, failed_sources
from audio_dataset.redaction import redact
from audio_dataset.source import UserError
from audio_dataset.stats import StatsCounter
from audio_dataset.storage import atomic_write_bytes, is_local, read_json

CARD_FILE = "README.md"
# The line that marks a card as ours: a README.md without it is the user's and is kept (--force replaces it).
MARK = "<!-- written by `audiodata card`: rerunning it replaces this file -->"
_MARK_SCAN_BYTES = 1 << 20

# Licence classes (the manifest's license_class column); a manifest without one is `unknown`.
LICENCE_CLASSES = ("open", "sharealike", "noncommercial", "restricted", "unknown")
# Hub licence ids an SPDX id maps to by lowercasing (https://huggingface.co/docs/hub/repositories-licenses).
HF_LICENSES = frozenset({
    "apache-2.0", "mit", "bsd-2-clause", "bsd-3-clause", "isc", "unlicense", "wtfpl", "pddl", "odc-by", "odbl",
    "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0", "cc-by-nc-nd-4.0",
    "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0", "gpl-2.0", "gpl-3.0", "lgpl-2.1", "lgpl-3.0",
    "agpl-3.0", "mpl-2.0", "cdla-permissive-1.0", "cdla-permissive-2.0", "cdla-sharing-1.0",
})
# What a CLAP corpus serves (Hub task ids): zero-shot classification and text-to-audio pairs.
TASK_CATEGORIES = ["audio-classification", "text-to-audio"]
_SIZE_BUCKETS = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                 (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
# A licence key never seen before is folded into this one past this many (a hostile manifest's
# million distinct strings must not become a million table rows).
MAX_LICENCE_KEYS = 200
OTHER_LICENCES = "(other licences)"
MAX_COMMANDS = 40
MAX_COMMAND_CHARS = 2_000
_SPLIT_NAME = re.compile(r"\w{1,64}")

_CITATIONS = {
    "laion-clap": """@inproceedings{wu2023laionclap,
  title = {Large-scale Contrastive Language-Audio Pretraining with Feature Fusion and Keyword-to-Caption Augmentation},
  author = {Wu, Yusong and Chen, Ke and Zhang, Tianyu and Hui, Yuchen and Berg-Kirkpatrick, Taylor and Dubnov, Shlomo},
  booktitle = {IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year = {2023},
  eprint = {2211.06687},
  archivePrefix = {arXiv}
}""",
    "msclap-2022": """@inproceedings{elizalde2023clap,
  title = {CLAP: Learning Audio Concepts from Natural Language Supervision},
  author = {Elizalde, Benjamin and Deshmukh, Soham and Al Ismail, Mahmoud and Wang, Huaming},
  booktitle = {IEEE International Conference on Acoustics, Speech and Signal Processing (ICASSP)},
  year = {2023},
  eprint = {2206.04769},
  archivePrefix = {arXiv}
}""",
    "msclap-2023": """@misc{elizalde2023naturallanguage,
  title = {Natural Language Supervision for General-Purpose Audio Representations},
  author = {Elizalde, Benjamin and Deshmukh, Soham and Wang, Huaming},
  year = {2023},
  eprint = {2309.05767},
  archivePrefix = {arXiv}
}""",
    "wavcaps": """@misc{mei2023wavcaps,
  title = {WavCaps: A ChatGPT-Assisted Weakly-Labelled Audio Captioning Dataset for Audio-Language Multimodal Research},
  author = {Mei, Xinhao and Meng, Chutong and Liu, Haohe and Kong, Qiuqiang and Ko, Tom and Zhao, Chengqi and Plumbley, Mark D. and Zou, Yuexian and Wang, Wenwu},
  year = {2023},
  eprint = {2303.17395},
  archivePrefix = {arXiv}
}""",
}


@dataclass
class Licence:
    key: str  # the SPDX (or named) id, else the free-text licence as recorded
    cls: str
    items: int = 0
    samples: int = 0
    seconds: float = 0.0


@dataclass
class Run:
    stage: str
    tool_version: str
    finished_at: str
    command: str


@dataclass
class CardFacts:
    name: str
    stats: dict[str, Any]
    licences: list[Licence]
    runs: list[Run] = field(default_factory=list)
    runs_left_out: int = 0
    recipe: str | None = None
    failed: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- reading (untrusted)
def _one_line(value: Any, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    text = "".join(c for c in text if c.isprintable())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _manifest_batches(out: UPath) -> Iterator[tuple[pa.Table, bool]]:
    """The manifest's counted columns a batch at a time, and whether it has licence columns."""
    path = out / manifest.MANIFEST_FILE
    try:
        with path.open("rb") as handle:
            names = set(pq.ParquetFile(handle).schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{path} is not a readable parquet file ({_one_line(exc, 120)})") from None
    has_ids = {"license_id", "license_class"} <= names
    wanted = ["split", "source", "status", "error", "n_samples", "source_duration", "output_duration", "license"]
    if missing := sorted(set(wanted) - names):
        raise UserError(f"{path} is not a manifest (no column {', '.join(missing)})")
    columns = wanted + (["license_id", "license_class"] if has_ids else [])
    types = {f.name: f.type for f in manifest.SCHEMA} | {"license_id": pa.string(), "license_class": pa.string()}
    try:
        for batch in manifest.iter_batches(path, columns=columns):
            table = pa.Table.from_batches([batch])
            yield pa.table({c: table[c].cast(types[c]) for c in columns}), has_ids
    except (pa.ArrowException, ValueError) as exc:
        raise UserError(f"{path} is not a manifest ({_one_line(exc, 120)})") from None


def _licence_tally(table: pa.Table, has_ids: bool, tally: dict[tuple[str, str], Licence]) -> None:
    kept = table.filter(pc.equal(table["status"], manifest.STATUS_OK))
    if has_ids:
        key = pc.coalesce(kept["license_id"], kept["license"], pa.scalar("", pa.string()))
        cls = pc.coalesce(kept["license_class"], pa.scalar("unknown", pa.string()))
    else:  # no licence ids yet: the free text as recorded, its class unknown
        key = pc.coalesce(kept["license"], pa.scalar("", pa.string()))
        cls = pa.array(["unknown"] * len(kept), pa.string())
    grouped = pa.table({"key": key, "cls": cls, "n_samples": kept["n_samples"],
                        "seconds": kept["output_duration"]}).group_by(["key", "cls"], use_threads=False).aggregate(
        [([], "count_all"), ("n_samples", "sum"), ("seconds", "sum")])
    for row in grouped.to_pylist():
        name = _one_line(row["key"], 200) or "(none recorded)"
        kind = row["cls"] if row["cls"] in LICENCE_CLASSES else "unknown"
        if (name, kind) not in tally and len(tally) >= MAX_LICENCE_KEYS:
            name = OTHER_LICENCES
        entry = tally.setdefault((name, kind), Licence(name, kind))
        entry.items += row["count_all"]
        entry.samples += row["n_samples_sum"] or 0
        entry.seconds += row["seconds_sum"] or 0.0


def _runs(out: UPath) -> list[Run]:
    """provenance.json's runs, each field used only when it has the type written there."""
    path = out / PROVENANCE_FILE
    if not path.exists():
        return []
    try:
        data = read_json(path)
    except (UserError, OSError):  # unreadable, too large or too deep: as if absent
        return []
    runs = data.get("runs") if isinstance(data, dict) else None
    found = []
    for run in runs if isinstance(runs, list) else []:
        if not isinstance(run, dict):
            continue
        text = functools.partial(_field, run)
        command = run.get("command")
        if isinstance(command, str):
            found.append(Run(text("stage"), text("tool_version"), text("finished_at"), _safe_command(command)))
        sources = run.get("options", {}).get("sources") if isinstance(run.get("options"), dict) else None
        for name, steps in sources.items() if isinstance(sources, dict) else ():
            for step in steps if isinstance(steps, list) else []:
                if isinstance(step, str):  # a recipe's per-source commands
                    found.append(Run(f"{text('stage')} source {_one_line(name, 100)}", text("tool_version"),
                                     text("finished_at"), _safe_command(step)))
    return found


def _field(run: dict[str, Any], key: str) -> str:
    value = run.get(key)
    return _one_line(value, 100) if isinstance(value, str) else "?"


def _safe_command(command: str) -> str:
    """A recorded command, its secrets masked again (the file may come from an older or another tool)."""
    try:
        command = shlex.join(redact_argv(shlex.split(command)))
    except ValueError:  # not shell words: masked as text
        pass
    return _one_line(redact(command), MAX_COMMAND_CHARS)


def _recipe_name(out: UPath) -> str | None:
    path = out / STATUS_FILE
    try:
        data = read_json(path) if path.exists() else None
    except (UserError, OSError):
        return None
    name = data.get("recipe") if isinstance(data, dict) else None
    return _one_line(name, 100) if isinstance(name, str) else None


def gather(out: UPath) -> CardFacts:
    counter = StatsCounter()
    tally: dict[tuple[str, str], Licence] = {}
    for table, has_ids in _manifest_batches(out):
        counter.add(table)
        _licence_tally(table, has_ids, tally)
    runs, distinct = [], set()
    for run in _runs(out):  # a resumed build records the same command again: shown once
        if (run.stage, run.command) not in distinct:
            distinct.add((run.stage, run.command))
            runs.append(run)
    name = out.name or (os.path.basename(os.path.abspath(out.path)) if is_local(out) else "") or str(out)
    return CardFacts(name=_one_line(name, 100), stats=counter.result(),
                     licences=sorted(tally.values(), key=lambda l: (-l.seconds, l.key, l.cls)),
                     runs=runs[:MAX_COMMANDS], runs_left_out=max(0, len(runs) - MAX_COMMANDS),
                     recipe=_recipe_name(out), failed=failed_sources(out))


# --------------------------------------------------------------------------- the header
def hf_license(key: str) -> str | None:
    """The Hub's id for an SPDX licence id (`CC-BY-4.0` -> `cc-by-4.0`), None when it has none."""
    lowered = key.strip().lower()
    return lowered if lowered in HF_LICENSES else None


def size_category(n: int) -> str:
    for bound, name in _SIZE_BUCKETS:
        if n < bound:
            return name
    return "n>1B" if n < 10_000_000_000 else "other"


def _source_names(facts: CardFacts) -> list[str]:
    return sorted(s for s, g in facts.stats["per_source"].items() if g["by_status"]["ok"])


def header(facts: CardFacts) -> dict[str, Any]:
    ids = [hf_license(l.key) for l in facts.licences]
    licences = sorted({i for i in ids if i})
    data: dict[str, Any] = {"license": licences + (["other"] if None in ids or not ids else [])}
    if None in ids or not ids:  # per-item licences the Hub has no id for: the card's table names them
        data["license_name"] = "per-item-licences"
        data["license_link"] = CARD_FILE
    data["size_categories"] = [size_category(sum(l.samples for l in facts.licences))]  # kept samples
    data["task_categories"] = list(TASK_CATEGORIES)
    # `local` is the user's own audio; every other source is a published collection this extends.
    data["source_datasets"] = sorted({"original" if s == "local" else f"extended|{_slug(s)}"
                                      for s in _source_names(facts)}) or ["original"]
    data["pretty_name"] = facts.name
    data["tags"] = ["audio", "audio-text", "clap", "webdataset"]
    splits = [s for s, g in facts.stats["per_split"].items() if g["samples"] and _SPLIT_NAME.fullmatch(s)]
    if splits:
        data["configs"] = [{"config_name": "default",
                            "data_files": [{"split": s, "path": f"{s}/*.tar"} for s in splits]}]
    return data


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")[:100] or "unnamed"


def dump_header(data: dict[str, Any]) -> str:
    """The YAML block, checked to read back as `data` with no line the Hub would take for its end."""
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=False, width=10_000)
    if yaml.safe_load(text) != data or any(line.startswith(("---", "...")) for line in text.splitlines()):
        raise ValueError("the card header does not read back as written")
    return f"---\n{text}---\n"


# --------------------------------------------------------------------------- the body
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~:])")


def md(value: Any) -> str:
    """Text read from the output as inert Markdown: one line, punctuation escaped, no HTML."""
    escaped = _MD_SPECIAL.sub(r"\\\1", _one_line(value))
    return escaped.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def code_block(text: str) -> str:
    """A fence longer than any run of backticks in `text`, so `text` cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}sh\n{text}\n{fence}"


def format_hours(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours:,.2f}" if hours >= 1 else f"{hours:.4f}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def body(facts: CardFacts) -> str:
    stats = facts.stats
    ok = stats["by_status"]["ok"]
    kept_hours = sum(l.seconds for l in facts.licences)
    parts = [MARK, f"# {md(facts.name)}", "",
             "Audio-text pairs in [WebDataset](https://github.com/webdataset/webdataset) shards (`SPLIT/*.tar`, "
             "FLAC audio with a JSON caption record per sample) with a `manifest.parquet` listing every input "
             "item and its outcome, made by `audiodata`" + (f" with the recipe `{md(facts.recipe)}`" if facts.recipe
                                                            else "") + ".",
             "", "## Counts", "",
             f"- items listed: {stats['items']:,}; kept: {ok:,}; not kept: {stats['items'] - ok:,}",
             f"- samples (shard members; segmenting makes several per item): {stats['samples']:,}",
             f"- hours kept: {format_hours(kept_hours)}", "", "### Sources", ""]
    rows = []
    for name, group in stats["per_source"].items():
        rows.append([md(name), f"{group['by_status']['ok']:,}", f"{group['samples']:,}",
                     format_hours(group["hours_out"] * 3600), f"{group['items'] - group['by_status']['ok']:,}"])
    parts += [_table(["source", "items kept", "samples", "hours", "not kept"], rows), "", "### Splits", ""]
    parts.append(_table(["split", "samples", "hours"],
                        [[md(s), f"{g['samples']:,}", format_hours(g["hours_out"] * 3600)]
                         for s, g in stats["per_split"].items()]))
    parts += ["", "## Licences", "", "Each item keeps its own licence (the manifest's `license` column"
              + (" and `license_id`/`license_class`" if any(l.cls != "unknown" for l in facts.licences) else "")
              + "); redistributing or training on a part must follow the licences of the items in it.", ""]
    by_class = {c: sum(l.items for l in facts.licences if l.cls == c) for c in LICENCE_CLASSES}
    parts.append(_table(["class", "items kept", "hours"],
                        [[c, f"{n:,}", format_hours(sum(l.seconds for l in facts.licences if l.cls == c))]
                         for c, n in by_class.items() if n]))
    parts += ["", _table(["licence", "class", "items kept", "samples", "hours"],
                         [[md(l.key), l.cls, f"{l.items:,}", f"{l.samples:,}", format_hours(l.seconds)]
                          for l in facts.licences])]
    parts += ["", "## How it was made", ""] + _commands(facts)
    parts += ["", "## Known limits", ""] + _limits(facts, by_class)
    parts += ["", "## Citation", ""] + _citations(facts)
    return "\n".join(parts) + "\n"


def _commands(facts: CardFacts) -> list[str]:
    if not facts.runs:
        return [f"No `{PROVENANCE_FILE}` with commands in this output."]
    lines = [f"From `{PROVENANCE_FILE}` (each command once, in the order first run; secrets masked):", ""]
    for run in facts.runs:
        lines += [f"- {md(run.stage)} (audiodata {md(run.tool_version)}, finished {md(run.finished_at)}):", "",
                  *("  " + line for line in code_block(run.command).splitlines()), ""]
    if facts.runs_left_out:
        lines.append(f"... and {facts.runs_left_out:,} more.")
    return lines


def _limits(facts: CardFacts, by_class: dict[str, int]) -> list[str]:
    stats = facts.stats
    lines = [f"- not kept, by reason: {md(reason)} {count:,}" for reason, count in stats["by_reason"].items()]
    lines += [f"- source {md(name)} failed as a whole (none of its items are here): {md(why)}"
              for name, why in facts.failed.items()]
    if by_class["unknown"]:
        lines.append(f"- {by_class['unknown']:,} kept item(s) have a licence not classified "
                     "(class `unknown`): check them before redistributing")
    for cls, what in (("noncommercial", "non-commercial use only"), ("restricted", "terms that restrict use")):
        if by_class[cls]:
            lines.append(f"- {by_class[cls]:,} kept item(s) are under {what}")
    lines.append("- captions are the sources' own text (titles, descriptions, tags) or generated from "
                 "keywords: they can be noisy, and are not checked by hand")
    return lines


def _citations(facts: CardFacts) -> list[str]:
    recipe = (facts.recipe or "").lower()
    keys = []
    if recipe.startswith("laion"):
        keys.append("laion-clap")
    if recipe.startswith("msclap"):
        keys += ["msclap-2022", "msclap-2023"]
    if "wavcaps" in facts.stats["per_source"] or "wavcaps" in facts.failed:
        keys.append("wavcaps")
    if not keys:
        return ["No recipe paper: cite the sources this output was built from."]
    return ["The recipe and sources follow:", "", "```bibtex", "\n\n".join(_CITATIONS[k] for k in keys), "```"]


# --------------------------------------------------------------------------- writing
def is_ours(dest: UPath) -> bool:
    """Whether the file at `dest` carries our mark on a line of its own."""
    with dest.open("rb") as handle:
        head = handle.read(_MARK_SCAN_BYTES)
    return MARK.encode() in head.splitlines()


def render(facts: CardFacts) -> str:
    return dump_header(header(facts)) + body(facts)


def write_card(out: UPath, dest: UPath, force: bool = False) -> CardFacts:
    """Write the card of `out` to `dest`; a README.md we did not write stays unless `force`."""
    if dest.exists() and not force:
        if not dest.is_file() or not is_ours(dest):
            raise UserError(f"{dest} exists and was not written by audiodata card; give --force to replace it")
    facts = gather(out)
    atomic_write_bytes(dest, render(facts).encode("utf-8"))
    return facts
