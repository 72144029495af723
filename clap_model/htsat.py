"""HTS-AT (Chen et al., ICASSP 2022): a Swin Transformer over the log-mel "image".

Module names follow LAION-CLAP's htsat.py (`patch_embed`, `layers.N.blocks.M.attn.qkv`,
`tscam_conv`, ...) so their released audio branches load with no renaming. Window attention runs
through scaled_dot_product_attention with the relative-position bias (and shift mask) as its
additive mask.

GPU efficiency (the Swin stages are mostly memory-bound): under autocast the LayerNorm outputs are
cast to the autocast dtype *before* the cyclic roll and window partition (a pure permutation, so
the numbers are those the Linear would have cast anyway, at half the bytes moved); the patch
embedding's stride == kernel convolution runs as one matmul over the patches; the shift masks are
buffers built once. `HTSAT.compile_features()` puts the Swin stages under torch.compile (used in
training only, batch dimension dynamic, so one compilation serves every batch size).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clap_model.config import AudioConfig
from clap_model.features import add_mel_frontend
from clap_model.fusion import make_fusion


class DropPath(nn.Module):
    """Stochastic depth: drop the residual branch for whole examples."""

    def __init__(self, prob: float) -> None:
        super().__init__()
        self.prob = prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.prob
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) < keep
        return x * (mask.to(x.dtype) / keep)  # one pass over x instead of two


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch: int, embed_dim: int, fusion_type: str | None) -> None:
        super().__init__()
        self.img_size = img_size
        self.grid = img_size // patch
        self.proj = nn.Conv2d(1, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)
        self.fusion = fusion_type is not None
        if self.fusion:
            # The three local crops sit side by side in time, so each is a third as wide.
            self.mel_conv2d = nn.Conv2d(1, embed_dim, kernel_size=(patch, patch * 3), stride=(patch, patch * 3))
            self.fusion_model = make_fusion(fusion_type, embed_dim)

    def forward(self, x: torch.Tensor, longer_idx: torch.Tensor | None = None) -> torch.Tensor:
        if self.fusion:
            x = self._fuse(x, longer_idx).flatten(2).transpose(1, 2)
        else:
            x = self._patches(x)
        return self.norm(x)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        """The stride == kernel Conv2d as one matmul over flattened patches: (B, 1, H, W) -> (B, L, C),
        already token-major (cuDNN runs a 1-input-channel conv and its weight gradient poorly)."""
        batch, _, height, width = x.shape
        patch = self.proj.kernel_size[0]
        x = x.view(batch, height // patch, patch, width // patch, patch).permute(0, 1, 3, 2, 4)
        x = x.reshape(batch, (height // patch) * (width // patch), patch * patch)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)

    def _fuse(self, x: torch.Tensor, longer_idx: torch.Tensor | None) -> torch.Tensor:
        global_x = self.proj(x[:, 0:1])
        if longer_idx is None or longer_idx.numel() == 0:
            return global_x
        local = x[longer_idx, 1:]
        batch, crops, height, width = local.shape
        local = self.mel_conv2d(local.reshape(batch * crops, 1, height, width))
        local = local.view(batch, crops, *local.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)
        target = global_x.shape[-1]
        if local.shape[-1] < target:
            local = F.pad(local, (0, target - local.shape[-1]))
        local = local[..., :target]
        global_x = global_x.clone()
        global_x[longer_idx] = self.fusion_model(global_x[longer_idx], local.to(global_x.dtype)).to(global_x.dtype)
        return global_x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * windows, size * size, C), example-major."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // size, size, width // size, size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, size * size, channels)


def window_reverse(windows: torch.Tensor, size: int, height: int, width: int) -> torch.Tensor:
    channels = windows.shape[-1]
    x = windows.view(-1, height // size, width // size, size, size, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class WindowAttention(nn.Module):
    # SDPA with the bias as its mask runs the memory-efficient kernel on CUDA: on an H200 a step at
    # batch 256 took 184 ms with it and 208 ms with an explicit q @ k.T + bias, softmax, @ v.
    def __init__(self, dim: int, window: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1) + rel[..., 1])
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, batch: int) -> torch.Tensor:
        windows, tokens, dim = x.shape
        n_win = windows // batch
        qkv = self.qkv(x).view(batch, n_win, tokens, 3, self.heads, dim // self.heads)
        # Heads of all windows of one example form one "head" axis so the bias broadcasts over B.
        q, k, v = qkv.permute(3, 0, 1, 4, 2, 5).reshape(3, batch, n_win * self.heads, tokens, -1).unbind(0)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(tokens, tokens, self.heads).permute(2, 0, 1)  # (heads, N, N)
        bias = bias[None].expand(n_win, -1, -1, -1)
        if mask is not None:
            bias = bias + mask[:, None]
        bias = bias.reshape(1, n_win * self.heads, tokens, tokens).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(batch, n_win, self.heads, tokens, -1).permute(0, 1, 3, 2, 4).reshape(windows, tokens, dim)
        return self.proj(out)


def shift_mask(resolution: int, window: int, shift: int) -> torch.Tensor:
    """Additive mask (-100 across regions) for shifted windows, (windows, N, N)."""
    img = torch.zeros(1, resolution, resolution, 1)
    spans = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for h in spans:
        for w in spans:
            img[:, h, w, :] = label
            label += 1
    groups = window_partition(img, window).squeeze(-1)
    diff = groups[:, None, :] - groups[:, :, None]
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _to_autocast_dtype(x: torch.Tensor) -> torch.Tensor:
    """Cast to the dtype the next Linear would cast to under autocast (exact: the permutations in
    between do not change values), so rolls and window copies move half the bytes."""
    if torch.is_autocast_enabled(x.device.type):
        return x.to(torch.get_autocast_dtype(x.device.type))
    return x


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim: int, resolution: int, heads: int, window: int, shift: int, drop_path: float) -> None:
        super().__init__()
        self.resolution = resolution
        if resolution <= window:  # one window covers everything: no partition, no shift
            window, shift = resolution, 0
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * 4)
        self.register_buffer("attn_mask", shift_mask(resolution, window, shift) if shift > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        size = self.resolution
        shortcut = x
        x = _to_autocast_dtype(self.norm1(x)).view(batch, size, size, channels)
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        attn = self.attn(window_partition(x, self.window), self.attn_mask, batch)
        x = window_reverse(attn, self.window, size, size)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(batch, length, channels))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    def __init__(self, resolution: int, dim: int) -> None:
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, channels = x.shape
        x = x.view(batch, self.resolution, self.resolution, channels)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(batch, -1, 4 * channels)))


class BasicLayer(nn.Module):
    def __init__(self, dim: int, resolution: int, depth: int, heads: int, window: int,
                 drop_path: list[float], downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(dim, resolution, heads, window, 0 if i % 2 == 0 else window // 2, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x) if self.downsample is not None else x


class HTSAT(nn.Module):
    """Waveform (or fusion mel) -> {'embedding': (B, width)}."""

    def __init__(self, cfg: AudioConfig, fusion_type: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.fusion = fusion_type is not None
        self.freq_ratio = cfg.spec_size // cfg.mel_bins
        add_mel_frontend(self, cfg, self.fusion)
        self.patch_embed = PatchEmbed(cfg.spec_size, cfg.patch_size, cfg.embed_dim, fusion_type)
        grid = self.patch_embed.grid
        blocks = sum(cfg.depths)
        rates = [cfg.drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]  # linear decay rule
        self.layers = nn.ModuleList()
        for i, depth in enumerate(cfg.depths):
            start = sum(cfg.depths[:i])
            self.layers.append(BasicLayer(cfg.embed_dim * 2**i, grid // 2**i, depth, cfg.num_heads[i], cfg.window,
                                          rates[start : start + depth], downsample=i < len(cfg.depths) - 1))
        self.num_features = cfg.width
        self.norm = nn.LayerNorm(self.num_features)
        freq_groups = cfg.spec_size // 2 ** (len(cfg.depths) - 1) // cfg.patch_size // self.freq_ratio
        # AudioSet tagging head: part of LAION-CLAP's checkpoints, unused by the contrastive loss.
        self.tscam_conv = nn.Conv2d(self.num_features, cfg.class_num, kernel_size=(freq_groups, 3), padding=(0, 1))
        self.head = nn.Linear(cfg.class_num, cfg.class_num)
        self.apply(self._init_weights)
        for module in (self.tscam_conv, self.head):
            module.requires_grad_(False)
        self._compiled_features = None

    def compile_features(self, **compile_kwargs) -> None:
        """Run the Swin stages through torch.compile in training (evaluation stays eager: other
        batch sizes and no dropout would mean more compilations for little gain)."""
        self._compiled_features = torch.compile(self.forward_features, **compile_kwargs)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def mel(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None,
            crop_u: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, frames, mel_bins) in fp32 whatever the autocast, and the `longer` flags for fusion."""
        with torch.autocast(waveform.device.type, enabled=False):
            waveform = waveform.float()
            if not self.fusion:
                return self.logmel_extractor(self.spectrogram_extractor(waveform)), None
            if lengths is None:
                lengths = torch.full((waveform.shape[0],), waveform.shape[1], device=waveform.device)
            if crop_u is None:
                crop_u = torch.full((waveform.shape[0], 3), 0.5, device=waveform.device)
            return self.fusion_mel(waveform, lengths, crop_u)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor | None = None,
                crop_u: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x, longer = self.mel(waveform, lengths, crop_u)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
        longer_idx = None
        if self.fusion:
            if self.training and not bool(longer.any()):
                # As LAION-CLAP: with no long clip in the batch, one is fused anyway so the
                # fusion layers always get a gradient.
                longer = longer.clone()
                longer[torch.randint(0, longer.shape[0], (1,), device=longer.device)] = True
            longer_idx = torch.where(longer)[0]
        x = self.spec_augmenter(x)
        x = self.reshape_wav2img(x)
        if self._compiled_features is not None and self.training and longer_idx is None:
            torch._dynamo.maybe_mark_dynamic(x, 0)  # one graph for every batch size
            return {"embedding": self._compiled_features(x)}
        return {"embedding": self.forward_features(x, longer_idx)}

    def reshape_wav2img(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) -> (B, C, spec_size, spec_size): time folded into freq_ratio rows."""
        _, _, frames, bins = x.shape
        target_t = self.cfg.spec_size * self.freq_ratio
        target_f = self.cfg.spec_size // self.freq_ratio
        if frames > target_t or bins > target_f:
            raise ValueError(f"mel of {frames}x{bins} exceeds the {target_t}x{target_f} the model takes")
        if frames < target_t:
            x = F.interpolate(x, (target_t, bins), mode="bicubic", align_corners=True)
        if bins < target_f:
            x = F.interpolate(x, (x.shape[2], target_f), mode="bicubic", align_corners=True)
        x = x.permute(0, 1, 3, 2)
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2], self.freq_ratio, x.shape[3] // self.freq_ratio)
        x = x.permute(0, 1, 3, 2, 4)
        return x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3], x.shape[4])

    def forward_features(self, x: torch.Tensor, longer_idx: torch.Tensor | None = None) -> torch.Tensor:
        x = self.patch_embed(x, longer_idx)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).mean(dim=1)  # LAION-CLAP's latent_output: average over all tokens
