"""Attentional feature fusion (Dai et al., WACV 2021) as LAION-CLAP uses it for long clips.

Module names (`local_att`, `global_att`, `local_att2`) match LAION-CLAP's feature_fusion.py so
their fusion checkpoints load.
"""
from __future__ import annotations

import torch
from torch import nn


def _attention(channels: int, inter: int, pooled: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if pooled else []
    layers += [nn.Conv2d(channels, inter, 1), nn.BatchNorm2d(inter), nn.ReLU(inplace=True),
               nn.Conv2d(inter, channels, 1), nn.BatchNorm2d(channels)]
    return nn.Sequential(*layers)


def _with_pair(fn, xa: torch.Tensor) -> torch.Tensor:
    # The pooled branch's BatchNorm needs two values per channel in training: double a batch of one.
    if xa.shape[0] == 1:
        return fn(torch.cat([xa, xa]))[:1]
    return fn(xa)


class DAF(nn.Module):
    """Direct add."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return x + residual


class AFF(nn.Module):
    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        inter = channels // r
        self.local_att = _attention(channels, inter, pooled=False)
        self.global_att = _attention(channels, inter, pooled=True)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xa = x + residual
        weight = torch.sigmoid(_with_pair(self.local_att, xa) + _with_pair(self.global_att, xa))
        return 2 * x * weight + 2 * residual * (1 - weight)


class iAFF(nn.Module):  # noqa: N801 - LAION-CLAP's name
    def __init__(self, channels: int, r: int = 4) -> None:
        super().__init__()
        inter = channels // r
        self.local_att = _attention(channels, inter, pooled=False)
        self.global_att = _attention(channels, inter, pooled=True)
        self.local_att2 = _attention(channels, inter, pooled=False)
        # LAION-CLAP builds global_att2 but its forward reuses global_att; kept for the key layout.
        self.global_att2 = _attention(channels, inter, pooled=True).requires_grad_(False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        xa = x + residual
        weight = torch.sigmoid(_with_pair(self.local_att, xa) + _with_pair(self.global_att, xa))
        xi = x * weight + residual * (1 - weight)
        weight2 = torch.sigmoid(_with_pair(self.local_att2, xi) + _with_pair(self.global_att, xi))
        return x * weight2 + residual * (1 - weight2)


def make_fusion(fusion_type: str, channels: int) -> nn.Module:
    if fusion_type == "aff_2d":
        return AFF(channels)
    if fusion_type == "iaff_2d":
        return iAFF(channels)
    if fusion_type == "daf_2d":
        return DAF()
    raise ValueError(f"unsupported fusion type {fusion_type!r}")
