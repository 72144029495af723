"""CLAP training throughput: samples/s, model FLOP utilisation (MFU) and GPU busy time.

For each variant (eager, or the Swin stages under torch.compile as clap-train runs them on CUDA)
and batch size:
  * model: batches already on the device (what the GPU can do: samples/s; MFU = FLOPs counted by
    torch.utils.flop_counter over one whole training step, forward + backward as executed, over
    the dense bf16 peak; also 3 x the counted forward as a cross-check);
  * GPU busy: summed kernel time / wall time from torch.profiler (CUDA activity only) over a few
    steps, and NVML's "a kernel was running" fraction sampled during the timed steps;
  * loader: the real clap-train data path over shards (decode, crop, tokenise in DataLoader
    workers, shared-memory int16 batches, pinned non-blocking copies) feeding the same step.

The text tower is RoBERTa-base's architecture randomly initialised (no hub download on the device)
with a byte-level tokenizer: 77 tokens per caption as LAION-CLAP pads them, so the compute is
the paper model's.

    python bench/clap_throughput.py --model htsat-tiny-roberta --batch-sizes 128 256 \\
        --train-data 'shards/{000000..000003}.tar' --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import require  # noqa: E402
from clap_model.clap import CLAP  # noqa: E402
from clap_model.config import ModelConfig, get_preset  # noqa: E402
from clap_model.data import LoaderConfig, ShardDataset, ShardSet, make_loader  # noqa: E402
from clap_model.evaluate import audio_spec  # noqa: E402
from clap_model.loss import ClipLoss  # noqa: E402
from clap_model.text import Tokenize  # noqa: E402
from clap_model.params import default_workers  # noqa: E402
from clap_model.train import (EpochContext, TrainState, autocast, build_optimizer, prefetch_to_device,  # noqa: E402
                              to_device, train_step)

# Dense bf16 tensor-core peaks (FLOP/s) used as the MFU denominator.
PEAKS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def offline_config(name: str) -> ModelConfig:
    cfg = get_preset(name)
    if cfg.text.name_or_path is None:
        return cfg
    return replace(cfg, text=replace(cfg.text, name_or_path=None))  # same dims, random init, byte tokens


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAKS.items():
        if key in name:
            return value, name
    return None, name


class BusySampler:
    """Samples NVML GPU utilisation (fraction of time a kernel ran) in a thread."""

    def __init__(self, device: torch.device, period: float = 0.02) -> None:
        self.samples: list[int] = []
        self.period = period
        self._stop = threading.Event()
        self._handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            except Exception:  # no NVML: report busy as unknown
                self._handle = None

    def __enter__(self) -> "BusySampler":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(self.period)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    @property
    def busy(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def synthetic_batch(cfg: ModelConfig, tokenize: Tokenize, batch: int, device: torch.device) -> dict[str, Any]:
    captions = [f"a recording number {i} of something making a sound outdoors at night" for i in range(batch)]
    tokens = tokenize(captions)
    waveform = torch.randn(batch, cfg.audio.clip_samples) * 0.1
    out = dict(tokens, waveform=waveform, length=torch.full((batch,), cfg.audio.clip_samples),
               crop_u=torch.rand(batch, 3), label=[None] * batch)
    return to_device(out, device)


def make_context(model: CLAP, device: torch.device, precision: str, batch: int, train_model) -> EpochContext:
    optimizer = build_optimizer(model, 1e-4, 0.0, (0.9, 0.999), 1e-8)
    return EpochContext(train_model, model, optimizer, ClipLoss(), device, precision, 1e-4, 10, 10_000, 10_000,
                        batch, grad_clip_norm=1.0)


class eager_features:
    """Within: the audio encoder runs eagerly even if compiled (FLOP counting sees every op)."""

    def __init__(self, model: CLAP) -> None:
        self.branch = model.audio_branch

    def __enter__(self) -> None:
        self.saved = getattr(self.branch, "_compiled_features", None)
        if self.saved is not None:
            self.branch._compiled_features = None

    def __exit__(self, *exc) -> None:
        if self.saved is not None:
            self.branch._compiled_features = self.saved


def count_flops(ctx: EpochContext, batch: dict[str, Any]) -> dict[str, float]:
    """FLOPs of one whole training step (forward + backward + loss as executed: matmuls, convs,
    attention; FFTs and elementwise work are not counted) and of the forward alone."""
    from torch.utils.flop_counter import FlopCounterMode

    with eager_features(ctx.base):
        step = FlopCounterMode(display=False)
        with step:
            train_step(ctx, batch, TrainState())
        forward = FlopCounterMode(display=False)
        with forward, torch.no_grad(), autocast(ctx.device, ctx.precision):
            ctx.loss_fn(ctx.model(batch))
    return {"flops_per_step": float(step.get_total_flops()), "forward_flops": float(forward.get_total_flops())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(ctx: EpochContext, batches, steps: int, device: torch.device) -> tuple[float, float | None]:
    state = TrainState()
    sync(device)
    with BusySampler(device) as sampler:
        started = time.perf_counter()
        for _ in range(steps):
            train_step(ctx, next(batches), state)
        sync(device)
        elapsed = time.perf_counter() - started
    return elapsed, sampler.busy


def _device_time_us(event) -> float:
    return float(getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0))


def profiled_steps(ctx: EpochContext, batches, steps: int, device: torch.device, table: str | None
                   ) -> float | None:
    """GPU busy fraction over `steps` training steps: the kernels' summed time (one stream, so they
    do not overlap) over the wall time, from torch.profiler. With `table`, the heaviest kernels (or
    CPU ops, off CUDA) are written there as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    if table and device.type == "cuda":
        activities.append(ProfilerActivity.CPU)
    batch_list = [next(batches) for _ in range(steps)] if table else None
    sync(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for i in range(steps):
            train_step(ctx, batch_list[i] if batch_list else next(batches), TrainState())
        sync(device)
        wall = time.perf_counter() - started
    averages = prof.key_averages()
    if table:
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        Path(table).write_text(f"{steps} training steps, {wall * 1e3:.1f} ms wall\n"
                               + averages.table(sort_by=key, row_limit=45, max_name_column_width=100))
    if device.type != "cuda":
        return None
    return min(1.0, _kernel_seconds(prof) / wall)


def _kernel_seconds(prof) -> float:
    """Summed duration of the device activities (kernels, copies, memsets) the profiler recorded."""
    from torch.autograd import DeviceType

    try:
        return sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type == DeviceType.CUDA) / 1e6
    except AttributeError:  # older event API: the kernels' own rows carry their time
        return sum(_device_time_us(e) for e in prof.key_averages() if e.device_type == DeviceType.CUDA) / 1e6


def repeat(batch: dict[str, Any]):
    while True:
        yield batch


def build_model(cfg: ModelConfig, device: torch.device, compiled: bool) -> CLAP:
    torch.manual_seed(0)
    model = CLAP(cfg).to(device)
    if compiled:
        model.audio_branch.compile_features()
    return model


def _write(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def bench_variant(cfg: ModelConfig, args: argparse.Namespace, variant: str, device: torch.device,
                  flops_cache: dict[int, dict[str, float]], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    variant, _, sizes = variant.partition("@")
    batch_sizes = [int(size) for size in sizes.split(",")] if sizes else args.batch_sizes
    model = build_model(cfg, device, variant == "compile")
    tokenize = Tokenize(cfg.text)
    rows = []
    for batch_size in batch_sizes:
        started = time.perf_counter()
        ctx = make_context(model, device, args.precision, batch_size, model)
        batch = synthetic_batch(cfg, tokenize, batch_size, device)
        row: dict[str, Any] = {"variant": variant, "batch_size": batch_size}
        if batch_size not in flops_cache:
            try:
                flops_cache[batch_size] = count_flops(ctx, batch)
            except Exception as exc:  # a counting failure must not hide the timing
                row["flops_error"] = str(exc)[:200]
        row.update(flops_cache.get(batch_size, {}))
        for _ in range(args.warmup):
            train_step(ctx, batch, TrainState())
        sync(device)
        row["warmup_s"] = time.perf_counter() - started
        elapsed, busy = timed_steps(ctx, repeat(batch), args.steps, device)
        step_time = elapsed / args.steps
        largest = batch_size == max(args.batch_sizes)  # one table per variant: few files come back
        table = f"{args.profile}_{variant}_b{batch_size}.txt" if args.profile and largest else None
        row["model_gpu_busy_profiler"] = profiled_steps(ctx, repeat(batch), 3, device, table)
        peak, device_name = peak_flops(device)
        row.update(device=device_name, model_step_s=step_time, model_samples_per_s=batch_size / step_time,
                   model_gpu_busy_nvml=busy)
        flops = row.get("flops_per_step")
        if flops and peak:
            row.update(mfu=flops / step_time / peak, achieved_tflops=flops / step_time / 1e12,
                       peak_tflops=peak / 1e12, mfu_3x_forward=3 * row["forward_flops"] / step_time / peak)
        if device.type == "cuda":
            row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row.update(model=args.model, precision=args.precision)
        rows.append(row)
        results.append(row)
        _write(args, results)  # before the loader-fed part: a timeout there keeps the model figures
        if args.train_data and variant in args.loader_variants:
            row.update(loader_fed(cfg, args, ctx, tokenize, batch_size, device))
            _write(args, results)
        print(json.dumps(row), flush=True)
        del ctx, batch
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
    return rows


def loader_fed(cfg: ModelConfig, args: argparse.Namespace, ctx: EpochContext, tokenize: Tokenize,
               batch_size: int, device: torch.device) -> dict[str, Any]:
    """The same step fed by the real clap-train input path (shards -> workers -> pinned copy)."""
    spec = audio_spec(cfg, None, "repeatpad", 60.0)
    steps = args.loader_steps
    loader_cfg = LoaderConfig(batch_size=batch_size, audio=spec, shuffle_buffer=256,
                              batches_per_worker=-(-(args.warmup + 2 * steps + 4) // max(args.workers, 1)) + 2)
    dataset = ShardDataset(ShardSet.from_spec(args.train_data), loader_cfg, tokenize)
    batches = prefetch_to_device(iter(make_loader(dataset, args.workers)), device)  # as clap-train feeds it
    # Warm-up long enough that every worker has filled its shuffle buffer and delivered a batch.
    for _ in range(max(args.warmup, args.workers)):
        train_step(ctx, next(batches), TrainState())
    counted = _Counted(batches)
    elapsed, busy = timed_steps(ctx, counted, steps, device)
    require(counted.samples == batch_size * steps,
            f"loader-fed: {counted.samples} samples in {steps} steps of batch {batch_size}")
    busy_profiler = profiled_steps(ctx, batches, min(steps, 8), device, None)
    return {"loader_workers": args.workers, "loader_steps": steps,
            "loader_samples_per_s": batch_size * steps / elapsed, "loader_gpu_busy_nvml": busy,
            "loader_gpu_busy_profiler": busy_profiler}


class _Counted:
    """Batches passed through, counting their samples: the loader-fed figure is of samples trained on."""

    def __init__(self, batches) -> None:
        self.batches, self.samples = batches, 0

    def __next__(self) -> dict[str, Any]:
        batch = next(self.batches)
        self.samples += len(batch["key"])
        return batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="htsat-tiny-roberta")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--variants", nargs="+", default=None,
                        help="eager|compile (the Swin stages under torch.compile), each optionally @B,B: only "
                             "these batch sizes (default: compile on CUDA, eager on CPU)")
    parser.add_argument("--train-data", default=None, help="shards for the loader-fed measurement")
    parser.add_argument("--loader-variants", nargs="*", default=None,
                        help="variants also measured fed by the loader (default: the last one)")
    parser.add_argument("--loader-steps", type=int, default=30)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None,
                        help="write the top kernels of 3 steps at the largest batch to PROFILE_<variant>_b<batch>.txt")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    args.variants = args.variants or (["compile"] if device.type == "cuda" else ["eager"])
    for variant in args.variants:
        if variant.partition("@")[0] not in ("eager", "compile"):
            parser.error(f"bad variant {variant!r}: eager or compile, optionally @B,B")
    if args.loader_variants is None:
        args.loader_variants = [args.variants[-1].partition("@")[0]]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = offline_config(args.model)
    results: list[dict[str, Any]] = []
    flops_cache: dict[int, dict[str, float]] = {}
    for variant in args.variants:
        try:
            bench_variant(cfg, args, variant, device, flops_cache, results)
        except Exception as exc:  # e.g. a compiler failure: keep the other variants' numbers
            results.append({"variant": variant, "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
            print(json.dumps(results[-1]), flush=True)
            _write(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
