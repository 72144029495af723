"""results.json of `clap-eval --suite` and its tables (text, Markdown, CSV). No torch: `clap-eval
--table md --results results.json` converts a results file without loading a model.

A results file read back is data: its values are checked for type before they reach a table, and a
file that is not one of ours is a one-line error.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from clap_model.config import UsageError

FORMAT = "audiodata-clap-eval-suite/1"
COLUMNS = ("task", "dataset", "metric", "ours", "spread", "published", "difference", "clips", "source")
MAX_RESULTS_BYTES = 256 << 20


# C0 and C1 controls, DEL and bidi overrides: in a stranger's results file they would drive the terminal.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _plain(value: Any) -> str:
    """`value` as text, its control characters shown as escapes."""
    return _CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", str(value))


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def table_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (task, metric) the suite names: ours (the mean over repeats), its spread, the
    published number for this checkpoint where the suite has one, and ours minus published."""
    rows = []
    for task in results.get("tasks") or []:
        if not isinstance(task, dict):
            continue
        metrics = task.get("metrics") if isinstance(task.get("metrics"), dict) else {}
        spread = task.get("spread") if isinstance(task.get("spread"), dict) else {}
        published = task.get("published") if isinstance(task.get("published"), dict) else {}
        protocol = task.get("protocol") if isinstance(task.get("protocol"), dict) else {}
        wanted = protocol.get("metrics") if isinstance(protocol.get("metrics"), list) else list(metrics)
        for metric in wanted:
            ours = _number(metrics.get(metric))
            if ours is None:
                continue
            row = published.get(metric) if isinstance(published.get(metric), dict) else {}
            theirs = _number(row.get("value"))
            rows.append({"task": _plain(task.get("name", "")), "dataset": _plain(protocol.get("dataset", "")),
                         "metric": _plain(metric), "ours": ours, "spread": _number(spread.get(metric)),
                         "published": theirs, "difference": None if theirs is None else ours - theirs,
                         "clips": task.get("clips") if isinstance(task.get("clips"), int) else None,
                         "source": _plain(row.get("source", ""))})
    return rows


def _shown(value: Any, metric: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}" if "rank" in metric else f"{100 * value:.2f}"
    return str(value)


def _cells(row: dict[str, Any]) -> list[str]:
    metric = row["metric"]
    spread = "" if not row["spread"] else f" ± {_shown(row['spread'], metric)}"
    difference = "-" if row["difference"] is None else f"{'+' if row['difference'] >= 0 else ''}" \
        f"{_shown(row['difference'], metric)}"
    return [row["task"], metric, _shown(row["ours"], metric) + spread, _shown(row["published"], metric),
            difference]


HEADERS = ["task", "metric", "ours", "published", "difference"]


def text_table(results: dict[str, Any]) -> str:
    """Aligned columns for the terminal; percentages (ranks as they are); skipped tasks below."""
    lines = [HEADERS] + [_cells(r) for r in table_rows(results)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADERS))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out += [f"skipped {_plain(s.get('task'))}: {_plain(s.get('reason'))}" for s in results.get("skipped") or []
            if isinstance(s, dict)]
    return "\n".join(out) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(results: dict[str, Any]) -> str:
    """A table for a paper or README: percentages, the spread over repeated random crops, the
    published number's source as a footnote."""
    rows = table_rows(results)
    sources = sorted({r["source"] for r in rows if r["source"]})
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        cells = _cells(row)
        if row["source"]:
            cells[3] += f" [{sources.index(row['source']) + 1}]"
        lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
    checkpoint = results.get("checkpoint") if isinstance(results.get("checkpoint"), dict) else {}
    suite = results.get("suite") if isinstance(results.get("suite"), dict) else {}
    lines += ["", f"Suite `{_md_escape(_plain(suite.get('name', '')))}`, checkpoint "
                  f"`{_md_escape(_plain(checkpoint.get('name', '')))}` (sha256 {_plain(checkpoint.get('sha256'))[:12]}), "
                  "percent (ranks as they are)."]
    lines += [f"[{i + 1}] {_md_escape(s)}" for i, s in enumerate(sources)]
    lines += [f"Skipped {_md_escape(_plain(s.get('task')))}: {_md_escape(_plain(s.get('reason')))}"
              for s in results.get("skipped") or [] if isinstance(s, dict)]
    return "\n".join(lines) + "\n"


def csv_table(results: dict[str, Any]) -> str:
    """Every row with full precision (fractions, not percent) and the published number's source."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in table_rows(results):
        writer.writerow(["" if row[c] is None else _csv_safe(row[c]) for c in COLUMNS])
    return buffer.getvalue()


def _csv_safe(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (task names come from a suite file)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


TABLES = {"text": text_table, "md": markdown_table, "csv": csv_table}


def read_results(path: str) -> dict[str, Any]:
    """A results.json of `clap-eval --suite`, or a one-line UsageError."""
    file = Path(path)
    try:
        if file.stat().st_size > MAX_RESULTS_BYTES:
            raise UsageError(f"--results {path}: over {MAX_RESULTS_BYTES >> 20} MiB, not a results file")
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read --results {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise UsageError(f"--results {path}: not JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UsageError(f"--results {path}: not a results.json of clap-eval --suite (format {FORMAT})")
    return data
