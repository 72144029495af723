"""One training epoch, the optimiser and schedule, and the evaluations run between epochs."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from clap_model.clap import CLAP
from clap_model.config import UsageError
from clap_model.loss import ClipLoss
from clap_model.metrics import retrieval_metrics, zeroshot_metrics

TENSOR_KEYS = ("waveform", "length", "crop_u", "input_ids", "attention_mask", "token_type_ids")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors to the device; the loader's int16 PCM becomes float there (half the bytes to copy)."""
    out = {k: (v.to(device, non_blocking=True) if k in TENSOR_KEYS else v) for k, v in batch.items()}
    if "waveform" in out and out["waveform"].dtype == torch.int16:
        out["waveform"] = out["waveform"].float() / 32768.0
    return out


def prefetch_to_device(batches: Iterator[dict[str, Any]], device: torch.device) -> Iterator[dict[str, Any]]:
    """`to_device` of each batch; on CUDA the copy (and int16 -> float) runs on a side stream, so it
    overlaps the kernels of the previous step still queued (the host runs ahead: nothing syncs per
    step) instead of sitting between steps on the compute stream. Pulls no batch before it is asked for."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    stream = torch.cuda.Stream(device)
    for host in batches:
        with torch.cuda.stream(stream):
            batch = to_device(host, device)
        compute = torch.cuda.current_stream(device)
        compute.wait_stream(stream)
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                value.record_stream(compute)  # freed tensors must wait for the compute stream
        yield batch


def build_optimizer(model: nn.Module, lr: float, wd: float, betas: tuple[float, float], eps: float
                    ) -> torch.optim.Optimizer:
    """AdamW; no decay on gains, biases, norms and temperatures (as open_clip / LAION-CLAP)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exclude = param.ndim < 2 or "bn" in name or "norm" in name or "logit_scale" in name or name.endswith(".bias")
        (no_decay if exclude else decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    fused = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def cosine_lr(step: int, base_lr: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * base_lr


@dataclass
class TrainState:
    step: int = 0  # optimiser steps taken in total
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps of the epoch in progress (mid-epoch checkpoints)


@dataclass
class EpochContext:
    model: nn.Module  # DDP-wrapped or not
    base: CLAP
    optimizer: torch.optim.Optimizer
    loss_fn: ClipLoss
    device: torch.device
    precision: str
    lr: float
    warmup: int
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    grad_clip_norm: float | None = None
    log_every: int = 10
    max_steps: int | None = None
    log: Callable[[str], None] = print
    scalar: Callable[[str, float, int], None] = lambda name, value, step: None
    on_step: Callable[[TrainState], None] = lambda state: None


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(ctx: EpochContext, batch: dict[str, Any], state: TrainState) -> torch.Tensor:
    """One optimiser step; returns the loss as a device tensor (reading it would wait for the GPU)."""
    lr = cosine_lr(state.step, ctx.lr, ctx.warmup, ctx.total_steps)
    for group in ctx.optimizer.param_groups:
        group["lr"] = lr
    with autocast(ctx.device, ctx.precision):
        out = ctx.model(batch)
        loss = ctx.loss_fn(out)
    ctx.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.grad_clip_norm:
        torch.nn.utils.clip_grad_norm_(ctx.base.parameters(), ctx.grad_clip_norm)
    ctx.optimizer.step()
    ctx.base.clamp_logit_scale()
    return loss.detach()


def train_one_epoch(ctx: EpochContext, batches: Iterator[dict[str, Any]], state: TrainState) -> None:
    ctx.model.train()
    batches = prefetch_to_device(batches, ctx.device)
    window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
    while state.step_in_epoch < ctx.steps_per_epoch:
        if ctx.max_steps is not None and state.step >= ctx.max_steps:
            return
        fetch = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            ctx.log(f"warning: the loader ran dry after {state.step_in_epoch} of {ctx.steps_per_epoch} steps")
            break
        data_wait += time.perf_counter() - fetch
        loss_tensor = train_step(ctx, batch, state)
        state.step += 1
        state.step_in_epoch += 1
        window_steps += 1
        if state.step % ctx.log_every == 0 or state.step_in_epoch == ctx.steps_per_epoch:
            loss = float(loss_tensor)  # waits for the GPU: only at log steps, so the host runs ahead
            elapsed = time.perf_counter() - window_start
            rate = window_steps * ctx.global_batch / elapsed
            lr = ctx.optimizer.param_groups[0]["lr"]
            scale = float(ctx.base.logit_scale_a.detach().exp())
            ctx.log(f"train epoch {state.epoch + 1} step {state.step_in_epoch}/{ctx.steps_per_epoch} "
                    f"(global {state.step}) loss {loss:.4f} lr {lr:.3e} logit_scale {scale:.2f} "
                    f"samples/s {rate:.1f} data_wait {data_wait / elapsed:.0%}")
            for name, value in (("train/loss", loss), ("train/lr", lr), ("train/logit_scale", scale),
                                ("train/samples_per_s", rate), ("train/data_wait", data_wait / elapsed)):
                ctx.scalar(name, value, state.step)
            window_start, data_wait, window_steps = time.perf_counter(), 0.0, 0
        ctx.on_step(state)


@dataclass
class Embedded:
    """Evaluation embeddings (fp32, CPU): clip i's captions are the text rows j with owner[j] == i."""

    audio: torch.Tensor
    text: torch.Tensor
    owner: torch.Tensor
    labels: list[Any]
    keys: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)  # the loader's meta_fields, per clip


@torch.no_grad()
def embed_batches(model: CLAP, batches, device: torch.device, precision: str, captions: bool = True) -> Embedded:
    """Audio and (unless `captions` is False: zero-shot needs none) caption embeddings, labels, keys
    and meta of every batch."""
    model.eval()
    audio, text, owner, labels, keys, meta = [], [], [], [], [], []
    clips = 0
    for batch in batches:
        batch = to_device(batch, device)
        with autocast(device, precision):
            audio.append(model.encode_audio(batch["waveform"], batch["length"], batch["crop_u"]).float().cpu())
            if captions:
                text.append(model.encode_text(batch).float().cpu())
        owner.append(batch["caption_owner"].cpu() + clips)
        clips += len(batch["key"])
        labels.extend(batch["label"])
        keys.extend(batch["key"])
        meta.extend(batch.get("meta") or [{} for _ in batch["key"]])
    if not audio:
        raise UsageError("the evaluation data yielded no samples")
    text_emb = torch.cat(text) if text else torch.empty(0, audio[0].shape[1])
    return Embedded(torch.cat(audio), text_emb, torch.cat(owner), labels, keys, meta)


def evaluate_retrieval(model: CLAP, batches, device: torch.device, precision: str) -> dict[str, float]:
    embedded = embed_batches(model, batches, device, precision)
    metrics = retrieval_metrics(embedded.audio, embedded.text, embedded.owner)
    metrics["num_samples"] = float(len(embedded.audio))
    metrics["num_captions"] = float(len(embedded.text))
    return metrics


@torch.no_grad()
def evaluate_zeroshot(model: CLAP, batches, tokenize, classes: list[str] | None, template: str,
                      device: torch.device, precision: str) -> dict[str, float]:
    embedded = embed_batches(model, batches, device, precision)
    audio, labels = embedded.audio, embedded.labels
    if classes is None:
        classes = sorted({label for label in labels if label is not None})
    index = {name: i for i, name in enumerate(classes)}
    keep = [i for i, label in enumerate(labels) if label in index]
    if not keep or len(classes) < 2:
        raise UsageError(f"zero-shot data needs labelled samples of at least two classes: {len(keep)} of "
                         f"{len(labels)} samples carry one of {len(classes)} classes "
                         "(see --zeroshot-label-field and --zeroshot-classes)")
    tokens = to_device(dict(tokenize([template.format(name) for name in classes])), device)
    with autocast(device, precision):
        class_text = model.encode_text(tokens).float().cpu()
    target = torch.tensor([index[labels[i]] for i in keep])
    metrics = zeroshot_metrics(audio[keep], class_text, target)
    metrics["zeroshot_classes"] = float(len(classes))
    return metrics
