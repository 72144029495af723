"""`audiodata plan RECIPE`: what a recipe will cost before it starts, per source and in total.

Items and hours come from each source's definition (the paper's counts, `paper_clips` and
`paper_hours`, or the recipe entry's `expect`); download bytes from the definition's `[plan]
media_kbps` (the bitrate of what the source serves); shard bytes from the output format (16-bit
PCM at the recipe's rate and channels times `flac_ratio`, FLAC's typical size on full-band audio).

Wall time per cluster size is the slowest of three bounds:
- transcode: the audio seconds one core turns into FLAC per second, measured by
  `bench/transcode.py` (bench/RESULTS.md "plan figure": the audio of distinct clips over the CPU
  seconds of the whole build that made them, checked to hold every sample), spread over every
  core of every node;
- downloads: one shard worker per core keeps the source's `fetch_concurrency` requests in flight,
  at `fraction of ceiling` x in-flight / latency (bench/download.py measured 0.88 at 50 ms);
- bandwidth: the download bytes over each node's link (`node_gbps`, 1 Gbit/s unless told);
- rate limits: each host's documented limit (definition `[plan] rate_limits`: requests per item,
  per second, per day), which no number of nodes raises.
A source with a `k2c` step adds its captioning after the build: on CPUs at the rate
bench/k2c.py measured for the t5-base shape (3.01 captions/s on 2 cores at batch 16; no GPU
figure has been measured, and on GPUs the step is far shorter), nothing for `model = "template"`.
Sources are built one after another, so the recipe's total is the sum of its sources' times.

Recaptioning the result (`audiodata caption`: listen, write, check) is GPU work, sized in the
listening model's 30 s windows: a clip is at least one, a long one more. No GPU run has been
measured here (bench/caption.py measures it with --device cuda): the rate is an estimate,
`--caption-rate` takes the figure measured on your GPUs.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any

from audio_dataset.recipe import Recipe, RecipeSource
from audio_dataset.source import UserError, read_definition

# bench/RESULTS.md, transcode, "plan figure": `bench/transcode.py` over distinct clips on 2 cores,
# audio seconds per CPU second of the whole build (driver, Ray's services, workers), the build
# checked to have made every sample. CPU seconds rather than wall time, which the other work on a
# shared machine stretches; Ray's services still cost more CPU the longer a run takes, so a figure
# taken on a loaded machine errs low (a plan that is too long, not too short); this one is an idle
# machine's (2026-12-07, 1,536 items).
AUDIO_SECONDS_PER_CORE_SECOND = 635
# bench/RESULTS.md, download: fraction of the in-flight / latency ceiling at the default 16 in flight.
DOWNLOAD_CEILING_FRACTION = 0.88
# bench/RESULTS.md, k2c: t5-base (k2t-base's shape), batch 16, 2 CPU cores.
MEASURED_K2C_CAPTIONS_PER_SECOND = 3.01
MEASURED_K2C_CORES = 2
# An estimate, not a measurement (no GPU was lent to measure one; bench/RESULTS.md, caption): a
# 7B audio-language model in bf16 at batch 32 answers AudioSetCaps' three questions (~60 tokens
# each) for about 5 windows/s on one H100 with transformers' generate, the 7B writer (~60 tokens)
# about 15 captions/s; CLAP's check is negligible. Listen and write on the same GPU: ~3.7/s,
# rounded down to 2 for retries and padding.
ESTIMATED_CAPTION_WINDOWS_PER_GPU_SECOND = 2.0
CAPTION_WINDOW_SECONDS = 30.0  # Qwen2-Audio's (Whisper's) window
CAPTION_GPU_COUNTS = (1, 8, 64)
DEFAULT_LATENCY_S = 0.2  # a real CDN round trip; the benchmark's loopback server added 50 ms
DEFAULT_FLAC_RATIO = 0.6
DEFAULT_NODE_GBPS = 1.0
NODE_COUNTS = (1, 8, 64)
CORES_PER_NODE = 16


@dataclass
class RateLimit:
    host: str
    requests_per_item: float
    per_second: float | None = None
    per_day: float | None = None

    def seconds(self, items: float) -> float:
        requests = items * self.requests_per_item
        bounds = [requests / self.per_second if self.per_second else 0.0,
                  requests / self.per_day * 86400 if self.per_day else 0.0]
        return max(bounds)


@dataclass
class SourcePlan:
    name: str
    source: str
    items: float | None
    hours: float | None
    download_bytes: float | None
    shard_bytes: float | None
    core_hours: float | None
    # nodes -> (seconds, what bounds it)
    wall: dict[int, tuple[float, str]] = field(default_factory=dict)
    note: str = ""


def _rate_limit(value: Any, name: str) -> RateLimit:
    try:
        return RateLimit(**value)
    except TypeError:
        raise UserError(f"source {name}: a rate limit is {{ host, requests_per_item, per_second, per_day }}, "
                        f"not {value!r}") from None


def _figures(entry: RecipeSource) -> tuple[float | None, float | None, dict[str, Any]]:
    definition = read_definition(entry.source)
    plan = {**definition.get("plan", {}), **entry.plan}
    items = entry.expect.get("clips", definition.get("paper_clips"))
    hours = entry.expect.get("hours", definition.get("paper_hours"))
    return (float(items) if items is not None else None, float(hours) if hours is not None else None, plan)


def _fetch_concurrency(source: str) -> int:
    return int(importlib.import_module(f"pipelines.{source}").SOURCE.fetch_concurrency)


@dataclass
class Assumptions:
    # Seconds of audio one core transcodes per second: `bench/transcode.py` prints it for a machine.
    transcode_rate: float = AUDIO_SECONDS_PER_CORE_SECOND
    flac_ratio: float = DEFAULT_FLAC_RATIO
    latency: float = DEFAULT_LATENCY_S
    node_gbps: float = DEFAULT_NODE_GBPS
    cores: int = CORES_PER_NODE
    # Listening-model windows one GPU captions per second (listen + write + check).
    caption_rate: float = ESTIMATED_CAPTION_WINDOWS_PER_GPU_SECOND


def plan_source(entry: RecipeSource, sample_rate: int, channels: int, assume: Assumptions) -> SourcePlan:
    items, hours, plan = _figures(entry)
    if items is None or hours is None:
        return SourcePlan(entry.name, entry.source, items, hours, None, None, None,
                          note="no expected counts (set `expect = { clips = N, hours = H }`)")
    seconds = hours * 3600
    kbps = plan.get("media_kbps")
    download = seconds * float(kbps) * 1000 / 8 if kbps else None
    shards = seconds * sample_rate * channels * 2 * assume.flac_ratio
    core_seconds = seconds / assume.transcode_rate
    limits = [_rate_limit(limit, entry.name) for limit in plan.get("rate_limits", [])]
    latency = float(plan.get("latency_s", assume.latency))  # a source slower per item than one GET
    per_worker = _fetch_concurrency(entry.source) * DOWNLOAD_CEILING_FRACTION / latency
    captioning = entry.k2c is not None and entry.k2c.get("caption_model") != "template"
    k2c_core_seconds = items / (MEASURED_K2C_CAPTIONS_PER_SECOND / MEASURED_K2C_CORES) if captioning else 0.0
    result = SourcePlan(entry.name, entry.source, items, hours, download, shards,
                        (core_seconds + k2c_core_seconds) / 3600, note=entry.note or str(plan.get("note", "")))
    for nodes in NODE_COUNTS:
        cores = nodes * assume.cores
        bounds = [(core_seconds / cores, "transcode"), (items / (per_worker * cores), "downloads"),
                  ((download or 0.0) / (nodes * assume.node_gbps * 1e9 / 8), "bandwidth")]
        bounds += [(limit.seconds(items), f"{limit.host} rate") for limit in limits]
        wall, bound = max(bounds)
        if captioning:
            wall, bound = wall + k2c_core_seconds / cores, f"{bound} + k2c on CPUs"
        result.wall[nodes] = (wall, bound)
    return result


def plan_recipe(recipe: Recipe, assume: Assumptions | None = None) -> list[SourcePlan]:
    assume = assume or Assumptions()
    sample_rate = int(recipe.build.get("sample_rate", 48_000))
    channels = int(recipe.build.get("channels", 1))
    plans = []
    for entry in recipe.sources:
        rate = int(entry.build.get("sample_rate", sample_rate))
        plans.append(plan_source(entry, rate, int(entry.build.get("channels", channels)), assume))
    return plans


# --------------------------------------------------------------------------- formatting


def human_bytes(value: float | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if value < 1000 or unit == "PB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return "-"


def human_duration(seconds: float) -> str:
    if seconds < 60:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _count(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_plan(recipe: Recipe, plans: list[SourcePlan], assume: Assumptions | None = None) -> str:
    assume = assume or Assumptions()
    nodes = [f"{n} node{'s' if n > 1 else ''}" for n in NODE_COUNTS]
    header = ["source", "items", "hours", "download", "shards", "core-h", *nodes, "bound by (1 node)"]
    rows = []
    for p in plans:
        wall = [human_duration(p.wall[n][0]) if p.wall else "-" for n in NODE_COUNTS]
        rows.append([p.name, _count(p.items), _count(p.hours, 1), human_bytes(p.download_bytes),
                     human_bytes(p.shard_bytes), _count(p.core_hours, 1), *wall,
                     p.wall[NODE_COUNTS[0]][1] if p.wall else p.note])
    known = [p for p in plans if p.wall]
    total_wall = [human_duration(total_seconds(plans, n)) for n in NODE_COUNTS]
    rows.append(["total", _count(sum(p.items for p in known)), _count(sum(p.hours for p in known), 1),
                 human_bytes(sum(p.download_bytes or 0 for p in known)),
                 human_bytes(sum(p.shard_bytes or 0 for p in known)),
                 _count(sum(p.core_hours or 0 for p in known), 1), *total_wall, "sources in sequence"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"recipe {recipe.name}: {recipe.title}".rstrip(": ")]
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) if i in (0, len(row) - 1) else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    lines.append(f"nodes of {assume.cores} cores and {assume.node_gbps:g} Gbit/s; transcode "
                 f"{assume.transcode_rate:.0f} s of audio per core-second and downloads at "
                 f"{DOWNLOAD_CEILING_FRACTION:g} x in-flight / {assume.latency:g} s (bench/RESULTS.md); shards as "
                 f"FLAC at {assume.flac_ratio:g} x 16-bit PCM (FLAC's size depends on the audio)")
    lines.append(caption_line(known, assume))
    unknown = [p.name for p in plans if not p.wall]
    if unknown:
        lines.append(f"not in the totals (no expected counts): {', '.join(unknown)}")
    lines += [f"{p.name}: {p.note}" for p in plans if p.wall and p.note]
    for part in recipe.missing:
        items = part.get("items")
        lines.append(f"missing: {part.get('name')}" + (f" ({items:,} items)" if isinstance(items, int) else "")
                     + (f": {part['note']}" if part.get("note") else ""))
    return "\n".join(lines)


def caption_windows(plans: list[SourcePlan]) -> float:
    """The listening model's windows over the recipe's clips: one a clip, more for long ones."""
    return math.fsum(max(p.items or 0.0, (p.hours or 0.0) * 3600 / CAPTION_WINDOW_SECONDS) for p in plans)


def caption_line(plans: list[SourcePlan], assume: Assumptions) -> str:
    windows = caption_windows(plans)
    gpu_seconds = windows / assume.caption_rate
    source = "estimate" if assume.caption_rate == ESTIMATED_CAPTION_WINDOWS_PER_GPU_SECOND else "--caption-rate"
    walls = ", ".join(f"{human_duration(gpu_seconds / n)} on {n} GPU{'s' if n > 1 else ''}" for n in CAPTION_GPU_COUNTS)
    return (f"recaption (audiodata caption: listen, write, check): {windows:,.0f} windows of "
            f"{CAPTION_WINDOW_SECONDS:g} s, {gpu_seconds / 3600:,.0f} GPU-h at {assume.caption_rate:g} windows/s "
            f"per GPU ({source}): {walls}")


def total_seconds(plans: list[SourcePlan], nodes: int) -> float:
    return math.fsum(p.wall[nodes][0] for p in plans if p.wall)
