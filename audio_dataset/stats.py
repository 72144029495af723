"""Dataset figures from the manifest (and shards, for caption lengths), printed and plotted."""
from __future__ import annotations

import io
import re
import sys
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

import pyarrow as pa
import pyarrow.compute as pc

from audio_dataset import manifest
from audio_dataset.licenses import CLASSES, UNKNOWN
from audio_dataset.schema import JSON_EXT, SampleRefused, load_json_object, split_order
from audio_dataset.shards import DamagedShard, Sample, iter_shard, refusal, shard_paths
from audio_dataset.storage import Location, location

if TYPE_CHECKING:  # matplotlib is imported only when plotting (builds print stats too)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATS_FILE = "stats.json"
PLOT_FILE = "stats.png"


def _hours(seconds: float | None) -> float:
    return round((seconds or 0.0) / 3600, 4)


_GROUP_KEYS = ["split", "source", "status", "error", "license_class"]
_SUMS = ["n_samples", "source_duration", "output_duration"]


class StatsCounter:
    """The figures of `compute_stats`, added up a manifest table at a time (memory stays flat)."""

    def __init__(self) -> None:
        # (split, source, status, error, license_class) -> [items, samples, seconds in, seconds out]
        self.groups: dict[tuple, list[float]] = {}

    def add(self, table: pa.Table) -> None:
        counted = table.select(_GROUP_KEYS + _SUMS).group_by(_GROUP_KEYS, use_threads=False).aggregate(
            [([], "count_all")] + [(name, "sum") for name in _SUMS])
        for row in counted.to_pylist():
            total = self.groups.setdefault(tuple(row[k] for k in _GROUP_KEYS), [0, 0, 0.0, 0.0])
            total[0] += row["count_all"]
            total[1] += row["n_samples_sum"] or 0
            total[2] += row["source_duration_sum"] or 0.0
            total[3] += row["output_duration_sum"] or 0.0

    def _group(self, keep: Callable[[tuple], bool]) -> dict[str, Any]:
        statuses: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        items = samples = 0
        seconds_in = seconds_out = 0.0
        for key, (count, n_samples, s_in, s_out) in self.groups.items():
            if not keep(key):
                continue
            statuses[key[2]] += count
            if key[3]:
                reasons[key[3]] += count
            items, samples = items + count, samples + n_samples
            seconds_in, seconds_out = seconds_in + s_in, seconds_out + s_out
        return {
            "items": int(items),
            "by_status": {s: statuses.get(s, 0) for s in manifest.STATUSES},
            "by_reason": dict(sorted(reasons.items())),
            "samples": int(samples),
            "hours_in": _hours(seconds_in),
            "hours_out": _hours(seconds_out),
        }

    def result(self) -> dict[str, Any]:
        splits = sorted({k[0] for k in self.groups}, key=split_order)
        sources = sorted({k[1] for k in self.groups})
        classes = [c for c in CLASSES if any((k[4] or UNKNOWN) == c for k in self.groups)]
        return {
            **self._group(lambda key: True),
            "per_split": {s: self._group(lambda key, s=s: key[0] == s) for s in splits},
            "per_source": {s: self._group(lambda key, s=s: key[1] == s) for s in sources},
            "per_license_class": {c: self._group(lambda key, c=c: (key[4] or UNKNOWN) == c) for c in classes},
            # source -> licence class -> hours written: what a publishable subset would hold
            "license_class_hours": {s: {c: _hours(sum(v[3] for k, v in self.groups.items()
                                                     if k[1] == s and (k[4] or UNKNOWN) == c))
                                        for c in classes} for s in sources},
        }


def compute_stats(table: pa.Table) -> dict[str, Any]:
    counter = StatsCounter()
    counter.add(table)
    return counter.result()


FAILURE_COLUMNS = ("status", "reason", "source", "source_id", "url", "shard", "detail")


def failures(table: pa.Table, reasons: Collection[str] = ()) -> list[dict[str, Any]]:
    """Every item not kept (optionally only these reasons), by reason then source id: what to fix."""
    keep = pc.not_equal(table["status"], manifest.STATUS_OK)
    if reasons:
        keep = pc.and_(keep, pc.is_in(table["error"], value_set=pa.array(sorted(reasons), pa.string())))
    columns = ["status", "error", "source", "source_id", "url", "shard", "error_detail"]
    rows = table.filter(keep).select(columns).to_pylist()  # only the failed rows become Python objects
    return [{"status": r["status"], "reason": r["error"], "source": r["source"], "source_id": r["source_id"],
             "url": r["url"] or "", "shard": r["shard"] or "", "detail": r["error_detail"] or ""}
            for r in sorted(rows, key=lambda r: (r["error"], r["source"], r["source_id"]))]


# Characters a terminal or a viewer acts on (C0 and C1 controls, DEL, bidi overrides): escaped.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# A cell starting with one of these is a formula to a spreadsheet (OWASP's CSV injection list).
_FORMULA_STARTS = ("=", "+", "-", "@")


def one_line(value: Any) -> str:
    """Text on one line with the characters a terminal or viewer acts on shown as escapes."""
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256 else f"\\u{ord(m.group()):04x}",
                         " ".join(str(value).split()))


def tsv_cell(value: Any) -> str:
    """A TSV cell on one line, inert: a decoder's multi-line message must not start a new row, a
    file's name or a server's message must not move the terminal's cursor or run as a formula."""
    text = one_line(value)
    return "'" + text if text.startswith(_FORMULA_STARTS) else text



def print_failures(rows: list[dict[str, Any]], file: TextIO | None = None) -> None:
    """Tab-separated with a header, one item per line (`cut`, `awk` and spreadsheets read it)."""
    file = file or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
    print("\t".join(FAILURE_COLUMNS), file=file)
    for row in rows:
        print("\t".join(tsv_cell(row[c]) for c in FAILURE_COLUMNS), file=file)


def print_summary(stats: dict[str, Any], file: TextIO | None = None, out: Location | None = None) -> None:
    """The end-of-run table: one line per split plus a total, then failure reasons (and how to list them)."""
    file = file or sys.stdout
    header = f"{'split':<8}{'items':>8}{'ok':>8}{'dropped':>9}{'failed':>8}{'excluded':>10}{'samples':>9}{'h in':>9}{'h out':>9}"
    print(header, file=file)
    groups = list(stats["per_split"].items()) + [("total", stats)]
    for name, g in groups:
        s = g["by_status"]
        print(f"{name:<8}{g['items']:>8}{s['ok']:>8}{s['dropped']:>9}{s['failed']:>8}{s['excluded']:>10}"
              f"{g['samples']:>9}{g['hours_in']:>9.3f}{g['hours_out']:>9.3f}", file=file)
    if classes := stats.get("per_license_class"):
        print("licences: " + ", ".join(f"{name} {g['by_status']['ok']} ({g['hours_out']:.3f} h)"
                                       for name, g in classes.items()), file=file)
    if stats["by_reason"]:
        reasons = ", ".join(f"{k}={v}" for k, v in stats["by_reason"].items())
        print(f"reasons: {reasons}", file=file)
        if out is not None:
            print(f"list them: audiodata failures {out} [--reason REASON]", file=file)


def _splits(table: pa.Table) -> list[str]:
    return sorted(set(table.column("split").to_pylist()), key=split_order)


def caption_lengths(out: Location, splits: list[str]) -> tuple[list[int], dict[str, str]]:
    """Words per first caption, read from the shards' JSON; and the shards that could not be read
    to their end (SPLIT/NNNNNN.tar -> why), whose readable samples still count."""
    lengths: list[int] = []
    damaged: dict[str, str] = {}
    for split in splits:
        for path in shard_paths(location(out) / split):
            name = f"{split}/{path.name}"
            try:
                for sample in iter_shard(path):
                    try:
                        lengths.append(_first_caption_words(sample))
                    except (SampleRefused, KeyError, TypeError, IndexError, AttributeError) as exc:  # an edited member
                        damaged.setdefault(name, f"sample {sample['__key__']}: {_why(exc)}")
            except DamagedShard as exc:
                damaged[name] = exc.detail
    return lengths, damaged


def _first_caption_words(sample: Sample) -> int:
    refused = refusal(sample)
    if refused is not None:
        raise refused
    text = load_json_object(sample[JSON_EXT])["text"]
    return len(text[0].split()) if text else 0


def _why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SampleRefused) else f"bad JSON ({type(exc).__name__}: {exc})"


def warn_damaged(out: Location, damaged: dict[str, str], file: TextIO | None = None) -> None:
    """One line per damaged shard, naming it, for every reader's command."""
    file = file or sys.stderr
    for name, detail in damaged.items():
        print(f"audiodata: warning: damaged shard {location(out) / name} ({detail}); "
              f"`audiodata verify {out}` lists every problem", file=file)


@dataclass
class PlotData:
    """What the plots show, gathered once: `stats.png` and the HTML report draw the same panels."""

    durations: list[float]  # seconds written per ok item
    caption_words: list[int]
    hours_per_source: dict[str, float]
    reasons: dict[str, int]  # not-ok items by reason
    damaged: dict[str, str] = field(default_factory=dict)  # shards not readable to their end -> why


def plot_data(out: Location, table: pa.Table) -> PlotData:
    rows = [r for r in table.to_pylist() if r["status"] == manifest.STATUS_OK]
    seconds: Counter[str] = Counter()
    for r in rows:
        seconds[r["source"]] += r["output_duration"]
    reasons = Counter(e for e in table.column("error").to_pylist() if e)
    words, damaged = caption_lengths(out, _splits(table))
    return PlotData(durations=[r["output_duration"] for r in rows], caption_words=words,
                    hours_per_source={s: seconds[s] / 3600 for s in sorted(seconds)},
                    reasons=dict(reasons.most_common()), damaged=damaged)


def _integer_ticks(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _draw_durations(ax: Axes, data: PlotData) -> None:
    ax.hist(data.durations, bins=30, color="tab:blue")
    ax.set(title="Clip duration", xlabel="seconds", ylabel="items")
    _integer_ticks(ax.yaxis)


def _draw_caption_words(ax: Axes, data: PlotData) -> None:
    ax.hist(data.caption_words, bins=20, color="tab:green")
    ax.set(title="Caption length", xlabel="words (first caption)", ylabel="samples")
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)


def _draw_source_hours(ax: Axes, data: PlotData) -> None:
    ax.bar(list(data.hours_per_source), list(data.hours_per_source.values()), color="tab:orange")
    ax.set(title="Hours per source", ylabel="hours written")
    ax.tick_params(axis="x", rotation=30)


def _draw_reasons(ax: Axes, data: PlotData) -> None:
    names = list(data.reasons)
    colors = [_REASON_COLORS[manifest.status_for_reason(n)] for n in names]
    ax.barh(names, list(data.reasons.values()), color=colors)
    ax.invert_yaxis()
    ax.set(title="Items not kept, by reason", xlabel="items")
    _integer_ticks(ax.xaxis)
    if not names:
        ax.set(xticks=[], yticks=[])
        ax.text(0.5, 0.5, "every item kept", ha="center", va="center", transform=ax.transAxes)


_REASON_COLORS = {manifest.STATUS_DROPPED: "tab:gray", manifest.STATUS_FAILED: "tab:red",
                  manifest.STATUS_EXCLUDED: "tab:purple"}
# Panel name -> drawer; the order is the order in stats.png and in the report.
PANELS: dict[str, Callable[[Axes, PlotData], None]] = {
    "duration": _draw_durations, "caption_words": _draw_caption_words,
    "source_hours": _draw_source_hours, "failure_reasons": _draw_reasons,
}


def _png(fig: Figure) -> bytes:
    png = io.BytesIO()
    fig.tight_layout()
    fig.savefig(png, format="png", dpi=100)
    return png.getvalue()


def panel_pngs(data: PlotData) -> dict[str, bytes]:
    """Each panel as its own PNG (the report lays them out itself)."""
    from matplotlib.figure import Figure

    pngs = {}
    for name, draw in PANELS.items():
        fig = Figure(figsize=(5.5, 3.6))
        draw(fig.add_subplot(), data)
        pngs[name] = _png(fig)
    return pngs


def stats_png(out: Location, table: pa.Table) -> tuple[bytes, PlotData]:
    """All panels side by side in one PNG, and what it drew (with the damaged shards it met)."""
    from matplotlib.figure import Figure

    data = plot_data(out, table)
    fig = Figure(figsize=(5 * len(PANELS), 4))
    for ax, draw in zip(fig.subplots(1, len(PANELS)), PANELS.values()):
        draw(ax, data)
    return _png(fig), data

