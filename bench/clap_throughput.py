"""CLAP training throughput: samples/s, model FLOP utilisation (MFU) and GPU busy time.

Two measurements per batch size:
  * model: batches already on the device (what the GPU can do: samples/s and MFU from FLOPs
    counted by torch.utils.flop_counter over one full training step);
  * loader: the real clap-train data path over shards (decode, crop, tokenise in DataLoader
    workers) feeding the same training step; GPU busy = NVML's "a kernel was running" fraction
    sampled during the timed steps.

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

from clap_model.clap import CLAP  # noqa: E402
from clap_model.config import ModelConfig, get_preset  # noqa: E402
from clap_model.data import LoaderConfig, ShardDataset, ShardSet, make_loader  # noqa: E402
from clap_model.evaluate import audio_spec  # noqa: E402
from clap_model.loss import ClipLoss  # noqa: E402
from clap_model.text import Tokenize  # noqa: E402
from clap_model.train import EpochContext, TrainState, build_optimizer, to_device, train_step  # noqa: E402

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


def count_flops(ctx: EpochContext, batch: dict[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(ctx, batch, TrainState())
    return float(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(ctx: EpochContext, batches, steps: int, device: torch.device) -> tuple[float, float | None]:
    state = TrainState()
    sync(device)
    with BusySampler(device) as sampler:
        started = time.perf_counter()
        for _ in range(steps):
            train_step(ctx, to_device(next(batches), device), state)
        sync(device)
        elapsed = time.perf_counter() - started
    return elapsed, sampler.busy


def profile_steps(ctx: EpochContext, batch: dict[str, Any], device: torch.device, path: str) -> None:
    """The kernels (or CPU ops) of three training steps, heaviest first, as a text table."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            train_step(ctx, batch, TrainState())
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=90))


def repeat(batch: dict[str, Any]):
    while True:
        yield batch


def bench_batch(cfg: ModelConfig, args: argparse.Namespace, batch_size: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    model = CLAP(cfg).to(device)
    train_model = torch.compile(model) if args.compile else model
    tokenize = Tokenize(cfg.text)
    ctx = make_context(model, device, args.precision, batch_size, train_model)
    batch = synthetic_batch(cfg, tokenize, batch_size, device)
    result: dict[str, Any] = {"batch_size": batch_size, "compile": args.compile}
    try:
        flops = count_flops(ctx, batch)
        result["flops_per_step"] = flops
    except Exception as exc:  # a counting failure must not hide the timing
        flops, result["flops_error"] = None, str(exc)[:200]
    for _ in range(args.warmup):
        train_step(ctx, batch, TrainState())
    elapsed, busy = timed_steps(ctx, repeat(batch), args.steps, device)
    step_time = elapsed / args.steps
    if args.profile:
        profile_steps(ctx, batch, device, f"{args.profile}_b{batch_size}.txt")
    peak, device_name = peak_flops(device)
    result.update(device=device_name, model_step_s=step_time, model_samples_per_s=batch_size / step_time,
                  model_gpu_busy=busy)
    if flops and peak:
        result.update(mfu=flops / step_time / peak, achieved_tflops=flops / step_time / 1e12, peak_tflops=peak / 1e12)
    if device.type == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.train_data:
        spec = audio_spec(cfg, None, "repeatpad", 60.0)
        loader_cfg = LoaderConfig(batch_size=batch_size, audio=spec, shuffle_buffer=256,
                                  batches_per_worker=args.warmup + args.steps + 2)
        dataset = ShardDataset(ShardSet.from_spec(args.train_data), loader_cfg, tokenize)
        batches = iter(make_loader(dataset, args.workers))
        for _ in range(args.warmup):
            train_step(ctx, to_device(next(batches), device), TrainState())
        elapsed, busy = timed_steps(ctx, batches, args.steps, device)
        result.update(loader_workers=args.workers, loader_samples_per_s=batch_size * args.steps / elapsed,
                      loader_gpu_busy=busy)
    del model, ctx, train_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="htsat-tiny-roberta")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--train-data", default=None, help="shards for the loader-fed measurement")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", default=None,
                        help="also write the top kernels of 3 steps to PROFILE_b<batch>.txt")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    cfg = offline_config(args.model)
    results = []
    for batch_size in args.batch_sizes:
        row = bench_batch(cfg, args, batch_size, device)
        row.update(model=args.model, precision=args.precision)
        print(json.dumps(row), flush=True)
        results.append(row)
        if args.json:  # written after every row: a timeout still leaves what finished
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
