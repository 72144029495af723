"""`audiodata report OUT`: one self-contained HTML page about a build output.

Everything is inline (plots as base64 PNG, audio previews as `data:audio/flac` URIs, CSS in a
<style> tag) and a Content-Security-Policy forbids any other load, so the page opens offline, can be
mailed or attached to a CI run, and cannot fetch or run anything even if a caption tries to.
Captions, tags, authors and URLs come from the web: every one is HTML-escaped and only http(s)
URLs become links.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import soundfile
from upath import UPath

from audio_dataset import manifest
from audio_dataset.audio import encode_flac, resample, set_channels
from audio_dataset.licenses import sample_licence
from audio_dataset.provenance import PROVENANCE_FILE, read_runs
from audio_dataset.schema import AUDIO_EXT, JSON_EXT, SIZES_FILE, SPLITS, load_json_object
from audio_dataset.shards import DamagedShard, iter_shard, read_sizes, refusal
from audio_dataset.stats import PANELS, compute_stats, failures, panel_pngs, plot_data, warn_damaged
from audio_dataset.storage import Location, atomic_write_bytes, location

REPORT_FILE = "report.html"
DEFAULT_SAMPLES = 6
# Items not kept that the page names; the rest are counted, and `audiodata failures` lists them all.
LISTED_FAILURES = 200
PREVIEW_SECONDS = 10.0
PREVIEW_RATE = 16_000
_CSP = "default-src 'none'; img-src data:; media-src data:; style-src 'unsafe-inline'"


@dataclass
class ReportSample:
    key: str
    split: str
    meta: dict[str, Any]
    preview_flac: bytes
    preview_seconds: float


# --------------------------------------------------------------------------- gathering
def choose_samples(table: pa.Table, n: int) -> list[tuple[str, str]]:
    """Up to n (key, shard) pairs: a stable hash order within each source, taken round-robin over
    sources, so the same output always shows the same samples and every source shows up."""
    by_source: dict[str, list[tuple[str, str, str]]] = {}
    for row in table.filter(pc.equal(table["status"], manifest.STATUS_OK)).to_pylist():
        for key in row["sample_keys"]:
            digest = hashlib.sha1(key.encode()).hexdigest()
            by_source.setdefault(row["source"], []).append((digest, key, row["shard"]))
    queues = [sorted(entries) for _, entries in sorted(by_source.items())]
    picked = [entry for turn in zip_longest(*queues) for entry in turn if entry is not None]
    return [(key, shard) for _, key, shard in picked[:max(n, 0)]]


def audio_preview(flac: bytes) -> tuple[bytes, float]:
    """The first PREVIEW_SECONDS, mono, at PREVIEW_RATE, as FLAC: small enough to inline."""
    with soundfile.SoundFile(io.BytesIO(flac)) as handle:
        rate = handle.samplerate
        frames = handle.read(int(PREVIEW_SECONDS * rate), dtype="float32", always_2d=True)
    mono = resample(set_channels(np.ascontiguousarray(frames.T), 1), rate, PREVIEW_RATE)
    return encode_flac(mono, PREVIEW_RATE), mono.shape[1] / PREVIEW_RATE


def load_samples(out: UPath, chosen: list[tuple[str, str]], damaged: dict[str, str]) -> list[ReportSample]:
    """The chosen samples with previews; a shard or sample that cannot be read goes into `damaged`."""
    wanted: dict[str, set[str]] = {}
    for key, shard in chosen:
        wanted.setdefault(shard, set()).add(key)
    found: dict[str, ReportSample] = {}
    for shard, keys in sorted(wanted.items()):
        try:
            for sample in iter_shard(out / shard):
                if sample["__key__"] in keys:
                    refused = refusal(sample)
                    if refused is not None:
                        damaged.setdefault(shard, f"sample {sample['__key__']}: {refused}")
                        continue
                    found[sample["__key__"]] = _report_sample(shard, sample)
        except DamagedShard as exc:
            damaged.setdefault(shard, exc.detail)
        except (soundfile.LibsndfileError, RuntimeError, ValueError, KeyError) as exc:  # FLAC lost sync, bad JSON
            damaged.setdefault(shard, f"sample {sample['__key__']}: {' '.join(str(exc).split())}")
    return [found[key] for key, _ in chosen if key in found]


def _report_sample(shard: str, sample: dict[str, Any]) -> ReportSample:
    flac, seconds = audio_preview(sample[AUDIO_EXT])
    return ReportSample(sample["__key__"], shard.split("/")[0], load_json_object(sample[JSON_EXT]), flac,
                        seconds)


def read_split_sizes(out: UPath) -> dict[str, int]:
    """Samples per split as trainers see them (sizes.json)."""
    return {split: sum(read_sizes(out / split).values()) for split in SPLITS if (out / split / SIZES_FILE).exists()}


# --------------------------------------------------------------------------- rendering
def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _link(url: str | None) -> str:
    """Only http(s) URLs become links: a `javascript:` or `data:` URL from a listing stays text."""
    if not url:
        return "<span class=muted>none</span>"
    if urlsplit(url).scheme.lower() in ("http", "https"):
        return f'<a href="{_e(url)}" rel="noopener noreferrer nofollow">{_e(url)}</a>'
    return f"<code>{_e(url)}</code>"


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _group_table(title: str, groups: dict[str, dict[str, Any]]) -> str:
    headers = [title, "items", *manifest.STATUSES, "samples", "hours in", "hours out"]
    rows = [[name, g["items"], *(g["by_status"][s] for s in manifest.STATUSES), g["samples"],
             f"{g['hours_in']:.3f}", f"{g['hours_out']:.3f}"] for name, g in groups.items()]
    return _table(headers, rows, "num")


def _licences(stats: dict[str, Any]) -> str:
    """Hours written per licence class, per source and in total (audio_dataset/licenses.py's classes)."""
    classes = list(stats.get("per_license_class", {}))
    if not classes:
        return "<p class=muted>No licence classes recorded.</p>"
    rows = [[source, *(f"{hours.get(c, 0.0):.3f}" for c in classes)]
            for source, hours in stats["license_class_hours"].items()]
    rows.append(["total", *(f"{stats['per_license_class'][c]['hours_out']:.3f}" for c in classes)])
    items = [["kept items", *(stats["per_license_class"][c]["by_status"][manifest.STATUS_OK] for c in classes)]]
    note = ("<p class=muted>Hours written per licence class. <code>audiodata filter --license-class open,sharealike"
            "</code> writes the publishable subset; <code>audiodata attribution</code> the credit lines.</p>")
    return f"<section id=licences>{_table(['source', *classes], rows + items, 'num')}{note}</section>"


def _summary(stats: dict[str, Any], sizes: dict[str, int]) -> str:
    total = sum(sizes.values())
    facts = [("samples", f'<span id="samples-total">{total}</span>'),
             ("items", _e(stats["items"])), ("kept", _e(stats["by_status"][manifest.STATUS_OK])),
             ("hours in", f"{stats['hours_in']:.3f}"), ("hours out", f"{stats['hours_out']:.3f}")]
    cards = "".join(f'<div class=card><div class=big>{v}</div><div class=muted>{_e(k)}</div></div>' for k, v in facts)
    per_split = ", ".join(f"{_e(s)}: {n}" for s, n in sizes.items())
    return f'<section id=summary><div class=cards>{cards}</div><p class=muted>sizes.json: {per_split}</p></section>'


def _failed_sources(failed: dict[str, str]) -> str:
    if not failed:
        return ""
    rows = [[name, "failed", why] for name, why in failed.items()]
    return (f"<section id=failed-sources><p><strong>{len(failed)} source(s) of this recipe failed as a whole"
            f"</strong>: none of their items are here or counted below (rerun the recipe to retry them).</p>"
            f"{_table(['source', 'state', 'why'], rows)}</section>")


def _reasons(stats: dict[str, Any], failed: dict[str, str]) -> str:
    if not stats["by_reason"]:
        kept = "Every listed item of the other sources was kept" if failed else "Every listed item was kept"
        return f"<p>{kept}.</p>"
    rows = [[reason, manifest.status_for_reason(reason), count] for reason, count in stats["by_reason"].items()]
    for source, group in stats["per_source"].items():
        for row in rows:
            row.append(group["by_reason"].get(row[0], 0))
    return _table(["reason", "status", "items", *stats["per_source"]], rows, "num")


def _failure_list(out: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    shown = [[r["reason"], r["source"], r["source_id"], r["url"], r["detail"]] for r in rows[:LISTED_FAILURES]]
    table = _table(["reason", "source", "source id", "url", "detail"], shown, "failures")
    more = len(rows) - len(shown)
    rest = (f"<p class=muted>{more} more not shown: <code>audiodata failures {_e(out)}</code> lists all.</p>"
            if more > 0 else "")
    return f"<details id=failures open><summary>The items ({len(rows)})</summary>{table}{rest}</details>"


def _damaged(out: str, damaged: dict[str, str]) -> str:
    if not damaged:
        return ""
    rows = [[shard, "damaged", detail] for shard, detail in sorted(damaged.items())]
    return ("<h2>Damaged shards</h2><section id=damaged>"
            f"<p>These shards could not be read whole: the figures count their items from the manifest, "
            f"but some of their samples will not load. <code>audiodata verify {_e(out)}</code> lists every problem.</p>"
            f"{_table(['shard', 'state', 'why'], rows)}</section>")


def _plots(pngs: dict[str, bytes]) -> str:
    figures = []
    for name in PANELS:
        uri = "data:image/png;base64," + base64.b64encode(pngs[name]).decode("ascii")
        alt = _e(name.replace("_", " "))
        figures.append(f'<figure><img class=plot id="plot-{name}" alt="{alt}" src="{uri}"></figure>')
    return '<div class=plots>' + "".join(figures) + "</div>"


def _provenance(runs: list[dict[str, Any]]) -> str:
    if not runs:
        return f"<p class=muted>No {PROVENANCE_FILE} in this output.</p>"
    items = []
    for i, run in enumerate(runs, 1):
        options = json.dumps(run.get("options", {}), indent=2, sort_keys=True)
        items.append(
            f"<li class=run><strong>run {i}: {_e(run.get('stage'))}</strong>"
            f" with audiodata {_e(run.get('tool_version'))}"
            f" (Python {_e(run.get('python'))}), started {_e(run.get('started_at'))},"
            f" finished {_e(run.get('finished_at') or 'not recorded')}"
            f"<pre class=command>{_e(run.get('command'))}</pre>"
            f"<details><summary>options</summary><pre>{_e(options)}</pre></details></li>")
    return "<ol>" + "".join(items) + "</ol>"


def _sample_card(sample: ReportSample) -> str:
    meta = sample.meta
    captions = "".join(f"<li>{_e(t)}</li>" for t in meta.get("text") or [])
    tags = "".join(f"<span class=tag>{_e(t)}</span>" for t in meta.get("tag") or [])
    segment = meta.get("segment")
    where = f" (segment {segment[0]:.1f}–{segment[1]:.1f} s of the source)" if segment else ""
    uri = "data:audio/flac;base64," + base64.b64encode(sample.preview_flac).decode("ascii")
    return (
        f'<article class=sample data-key="{_e(sample.key)}">'
        f"<h3>{_e(sample.key)}</h3>"
        f'<p class=muted>{_e(sample.split)} · {_e(meta.get("source"))} · {float(meta.get("duration") or 0):.1f} s'
        f"{_e(where)} · preview: first {sample.preview_seconds:.1f} s, {PREVIEW_RATE // 1000} kHz mono</p>"
        f'<audio controls preload="metadata" src="{uri}"></audio>'
        f"<ul class=captions>{captions}</ul><div class=tags>{tags}</div>"
        f"<dl><dt>licence</dt><dd class=license>{_e(meta.get('license'))}</dd>"
        f"<dt>licence class</dt><dd class=license-class>{_e(_licence_of(meta))}</dd>"
        f"<dt>author</dt><dd class=author>{_e(meta.get('author'))}</dd>"
        f"<dt>source</dt><dd class=url>{_link(meta.get('url'))}</dd></dl></article>")


def _licence_of(meta: dict[str, Any]) -> str:
    """`id (class)` of the sample's `license` through the table, as filter and attribution read it."""
    found = sample_licence(meta)
    return f"{found[0] or 'unmapped'} ({found[1]})"


_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.5em;word-break:break-all}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
table.num td+td,table.num th+th{text-align:right}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1.2em}
.big{font-size:1.6em;font-weight:600}.muted{color:#777}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:1em}
.plots img{width:100%;height:auto;border:1px solid #eee}figure{margin:0}
.samples{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:1em}
.sample{border:1px solid #ddd;border-radius:6px;padding:.8em}.sample h3{font-size:.95em;word-break:break-all;margin:0}
.sample audio{width:100%}.tag{background:#eef;border-radius:3px;padding:0 .4em;margin-right:.3em;font-size:.9em}
dl{display:grid;grid-template-columns:auto 1fr;gap:.1em .8em;margin:.5em 0 0}dt{color:#777}
dd{margin:0;word-break:break-all}
pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;word-break:break-all}
"""


def render(out: str, stats: dict[str, Any], sizes: dict[str, int], pngs: dict[str, bytes],
           runs: list[dict[str, Any]], samples: list[ReportSample], not_kept: list[dict[str, Any]],
           damaged: dict[str, str], failed: dict[str, str] | None = None) -> str:
    failed = failed or {}
    sections = [
        f"<h1>audiodata report: {_e(out)}</h1>", _failed_sources(failed), _summary(stats, sizes),
        _damaged(out, damaged),
        "<h2>Per split</h2>", _group_table("split", stats["per_split"]),
        "<h2>Per source</h2>", _group_table("source", stats["per_source"]),
        "<h2>Licences</h2>", _licences(stats),
        "<h2>Items not kept</h2>", _reasons(stats, failed), _failure_list(out, not_kept),
        "<h2>Plots</h2>", _plots(pngs),
        f"<h2>Samples ({len(samples)})</h2>", '<div class=samples id=samples>',
        *(_sample_card(s) for s in samples), "</div>",
        "<h2>Provenance</h2>", _provenance(runs),
    ]
    return (f'<!doctype html><html lang=en><head><meta charset=utf-8>'
            f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
            f'<meta name=viewport content="width=device-width,initial-scale=1">'
            f"<title>audiodata report: {_e(out)}</title><style>{_STYLE}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


def report_page(out: Location, n_samples: int = DEFAULT_SAMPLES) -> bytes:
    """The report of a build output as HTML bytes. Damaged shards are named on stderr and in the page,
    sources a recipe run recorded as failed at its top."""
    from audio_dataset.recipe import failed_sources

    out = location(out)
    table = manifest.read_table(out / manifest.MANIFEST_FILE)
    data = plot_data(out, table)
    damaged = dict(data.damaged)
    samples = load_samples(out, choose_samples(table, n_samples), damaged)
    page = render(str(out), compute_stats(table), read_split_sizes(out), panel_pngs(data), read_runs(out),
                  samples, failures(table), damaged, failed_sources(out))
    warn_damaged(out, damaged)
    return page.encode("utf-8")


def write_report(out: Location, html_path: Location | None = None, n_samples: int = DEFAULT_SAMPLES) -> UPath:
    """Write the report (default OUT/report.html) atomically and return where it went."""
    dest = location(html_path) if html_path is not None else location(out) / REPORT_FILE
    atomic_write_bytes(dest, report_page(out, n_samples))
    return dest
