"""Symmetric contrastive (InfoNCE) loss over features gathered from every rank."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' features, concatenated in rank order, with gradients flowing back to each rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(features.contiguous()), dim=0)


def _rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pair_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, local_loss: bool) -> torch.Tensor:
    """CE(a->b) + CE(b->a), halved. `local_loss`: only this rank's rows against all columns."""
    rank, world = _rank_and_size()
    all_a, all_b = gather_features(a), gather_features(b)
    if local_loss:
        labels = torch.arange(a.shape[0], device=a.device) + rank * a.shape[0]
        logits_ab = scale * a @ all_b.T
        logits_ba = scale * b @ all_a.T
    else:
        labels = torch.arange(all_a.shape[0], device=a.device)
        logits_ab = scale * all_a @ all_b.T
        logits_ba = logits_ab.T
    return (F.cross_entropy(logits_ab.float(), labels) + F.cross_entropy(logits_ba.float(), labels)) / 2


class ClipLoss:
    """LAION-CLAP's loss. With `mlp_loss` it adds their second pair: audio-MLP vs text and
    text-MLP vs audio, each with its own temperature."""

    def __init__(self, local_loss: bool = False) -> None:
        self.local_loss = local_loss

    def __call__(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        if "audio_mlp" not in out:
            return _pair_loss(out["audio"], out["text"], out["logit_scale_a"], self.local_loss)
        loss_a = _pair_loss(out["audio"], out["text_mlp"], out["logit_scale_a"], self.local_loss)
        loss_t = _pair_loss(out["audio_mlp"], out["text"], out["logit_scale_t"], self.local_loss)
        return (loss_a + loss_t) / 2
