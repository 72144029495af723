"""The CLAP model: audio and text encoders, projection MLPs into the joint space, temperatures.

Attribute names are LAION-CLAP's (`audio_branch`, `text_branch`, `audio_projection`,
`text_projection`, `audio_transform`, `text_transform`, `logit_scale_a`, `logit_scale_t`), so a
state dict of theirs loads into this model unchanged and ours loads into theirs. Microsoft CLAP's
design (`projection="msclap"`, one logit scale) keeps msclap's names inside the projections;
`msclap_format` maps the rest.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from clap_model import text as text_lib
from clap_model.config import ModelConfig, UsageError
from clap_model.htsat import HTSAT
from clap_model.pann import Cnn14


class MLPLayers(nn.Module):
    """LAION-CLAP's feature transform: Linear-ReLU-Dropout-Linear (keys sequential.0 / .3)."""

    def __init__(self, units: list[int], dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in zip(units[:-1], units[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(), nn.Dropout(dropout)]
        self.sequential = nn.Sequential(*layers[:-2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequential(x)


class MsclapProjection(nn.Module):
    """Microsoft CLAP's projection: LayerNorm(h + Dropout(Linear(GELU(h)))) with h = Linear(x), no biases."""

    def __init__(self, width: int, joint: int, dropout: float = 0.5) -> None:
        super().__init__()
        self.linear1 = nn.Linear(width, joint, bias=False)
        self.linear2 = nn.Linear(joint, joint, bias=False)
        self.layer_norm = nn.LayerNorm(joint)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear1(x)
        return self.layer_norm(hidden + self.drop(self.linear2(F.gelu(hidden))))


def _projection(width: int, cfg: ModelConfig) -> nn.Module:
    joint = cfg.joint_dim
    if cfg.projection == "msclap":
        return MsclapProjection(width, joint)
    return nn.Sequential(nn.Linear(width, joint), nn.ReLU() if cfg.mlp_act == "relu" else nn.GELU(),
                         nn.Linear(joint, joint))


def build_audio_branch(cfg: ModelConfig) -> nn.Module:
    fusion = cfg.fusion_type if cfg.enable_fusion else None
    if cfg.audio.model_type == "HTSAT":
        return HTSAT(cfg.audio, fusion)
    if cfg.audio.model_type == "PANN" and cfg.audio.model_name == "Cnn14":
        return Cnn14(cfg.audio, fusion)
    raise ValueError(f"unknown audio model {cfg.audio.model_type}/{cfg.audio.model_name}")


class CLAP(nn.Module):
    def __init__(self, cfg: ModelConfig, pretrained_text: bool = True, mlp_loss: bool = False) -> None:
        super().__init__()
        if mlp_loss and cfg.logit_scales == 1:
            raise UsageError("the MLP loss needs LAION-CLAP's second logit scale; this model has one (msclap's)")
        self.cfg = cfg
        joint = cfg.joint_dim
        self.audio_branch = build_audio_branch(cfg)
        self.text_branch = text_lib.build_text_model(cfg.text, pretrained=pretrained_text)
        pooler = getattr(self.text_branch, "pooler", None)
        if cfg.text.pooling != "pooler" and pooler is not None:
            pooler.requires_grad_(False)  # unused: pooled otherwise (mean, msclap's cls)
        self.audio_projection = _projection(cfg.audio.width, cfg)
        self.text_projection = _projection(text_lib.text_width(self.text_branch), cfg)
        self.logit_scale_a = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.audio_transform: MLPLayers | None = None
        self.text_transform: MLPLayers | None = None
        self.logit_scale_t: nn.Parameter | None = None
        if cfg.logit_scales == 2:
            # Used only by LAION-CLAP's optional "MLP loss"; frozen otherwise so DDP sees no idle weights.
            self.audio_transform = MLPLayers([joint, joint, joint]).requires_grad_(mlp_loss)
            self.text_transform = MLPLayers([joint, joint, joint]).requires_grad_(mlp_loss)
            self.logit_scale_t = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.logit_scale_t.requires_grad_(mlp_loss)

    def encode_audio(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None,
                     crop_u: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised joint-space audio embeddings, (B, joint_dim)."""
        features = self.audio_branch(waveform, lengths, crop_u)["embedding"]
        return F.normalize(self.audio_projection(features), dim=-1)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(self.text_projection(text_lib.encode(self.text_branch, tokens, self.cfg.text.pooling)), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        audio = self.encode_audio(batch["waveform"], batch.get("length"), batch.get("crop_u"))
        text = self.encode_text(batch)
        out = {"audio": audio, "text": text, "logit_scale_a": self.logit_scale_a.exp()}
        if self.logit_scale_t is not None:
            out["logit_scale_t"] = self.logit_scale_t.exp()
        if self.audio_transform is not None and self.audio_transform.sequential[0].weight.requires_grad:
            out["audio_mlp"] = self.audio_transform(audio)
            out["text_mlp"] = self.text_transform(text)
        return out

    @torch.no_grad()
    def clamp_logit_scale(self, max_scale: float = math.log(100)) -> None:
        self.logit_scale_a.clamp_(0, max_scale)
        if self.logit_scale_t is not None:
            self.logit_scale_t.clamp_(0, max_scale)
