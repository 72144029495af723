"""PANN CNN14 (Kong et al., 2020) as LAION-CLAP's audio branch, with its module names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clap_model.config import AudioConfig
from clap_model.features import add_mel_frontend
from clap_model.fusion import make_fusion


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        for conv in (self.conv1, self.conv2):
            nn.init.xavier_uniform_(conv.weight)

    def forward(self, x: torch.Tensor, pool: tuple[int, int] = (2, 2)) -> torch.Tensor:
        x = F.relu_(self.bn1(self.conv1(x)))
        x = F.relu_(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, kernel_size=pool)


class Cnn14(nn.Module):
    """Waveform (or fusion mel) -> {'embedding': (B, 2048)}."""

    WIDTHS = (64, 128, 256, 512, 1024, 2048)

    def __init__(self, cfg: AudioConfig, fusion_type: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.fusion = fusion_type is not None
        add_mel_frontend(self, cfg, self.fusion)
        channels = (1,) + self.WIDTHS
        for i in range(6):
            setattr(self, f"conv_block{i + 1}", ConvBlock(channels[i], channels[i + 1]))
        self.fc1 = nn.Linear(2048, 2048)
        # AudioSet tagging head: in LAION-CLAP's checkpoints, unused by the contrastive loss.
        self.fc_audioset = nn.Linear(2048, cfg.class_num).requires_grad_(False)
        if self.fusion:
            self.mel_conv2d = nn.Sequential(
                nn.Conv2d(1, 64, kernel_size=(5, 5), stride=(6, 2), padding=(2, 2)),
                nn.BatchNorm2d(64), nn.ReLU(inplace=True))
            self.fusion_model = make_fusion(fusion_type, 64)
        nn.init.xavier_uniform_(self.fc1.weight)
        nn.init.zeros_(self.fc1.bias)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None,
                crop_u: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        with torch.autocast(waveform.device.type, enabled=False):
            waveform = waveform.float()
            if self.fusion:
                if lengths is None:
                    lengths = torch.full((waveform.shape[0],), waveform.shape[1], device=waveform.device)
                if crop_u is None:
                    crop_u = torch.full((waveform.shape[0], 3), 0.5, device=waveform.device)
                x, longer = self.fusion_mel(waveform, lengths, crop_u)
            else:
                x, longer = self.logmel_extractor(self.spectrogram_extractor(waveform)), None
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        x = self.spec_augmenter(x)
        if self.fusion:
            if self.training and not bool(longer.any()):
                longer = longer.clone()
                longer[torch.randint(0, longer.shape[0], (1,), device=longer.device)] = True
            x = self._fused_first_block(x, torch.where(longer)[0])
        else:
            x = self.conv_block1(x)
        x = F.dropout(x, p=0.2, training=self.training)
        for i in range(2, 7):
            x = getattr(self, f"conv_block{i}")(x, (2, 2) if i < 6 else (1, 1))
            x = F.dropout(x, p=0.2, training=self.training)
        x = torch.mean(x, dim=3)
        x = torch.amax(x, dim=2) + torch.mean(x, dim=2)
        x = F.dropout(x, p=0.5, training=self.training)
        x = F.relu_(self.fc1(x))
        return {"embedding": F.dropout(x, p=0.5, training=self.training)}

    def _fused_first_block(self, x: torch.Tensor, longer_idx: torch.Tensor) -> torch.Tensor:
        global_x = self.conv_block1(x[:, 0:1])
        if longer_idx.numel() == 0:
            return global_x
        local = x[longer_idx, 1:]
        batch, crops, height, width = local.shape
        local = self.mel_conv2d(local.reshape(batch * crops, 1, height, width))
        local = local.view(batch, crops, *local.shape[1:]).permute(0, 2, 1, 3, 4).flatten(2, 3)
        target = global_x.shape[-2]
        if local.shape[-2] < target:
            local = F.pad(local, (0, 0, 0, target - local.shape[-2]))
        local = local[:, :, :target]
        global_x = global_x.clone()
        global_x[longer_idx] = self.fusion_model(global_x[longer_idx], local.to(global_x.dtype)).to(global_x.dtype)
        return global_x
