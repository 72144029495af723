"""Log-mel features, computed on the model's device (the loader ships waveforms only).

`Spectrogram` / `LogmelFilterBank` keep torchlibrosa's module and parameter names
(`stft.conv_real.weight`, `stft.conv_imag.weight`, `melW`) because LAION-CLAP's checkpoints hold
them. `FusionMel` rebuilds LAION-CLAP's 4-channel fusion input (torchaudio-style HTK mel: what
their data loader computed, clip by clip) from a padded batch of waveforms.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from clap_model.config import AudioConfig

AMIN = 1e-10
SILENCE_DB = 10.0 * math.log10(AMIN)  # power_to_db of silence


def _hz_to_mel(freq: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 2595.0 * np.log10(1.0 + freq / 700.0)
    # Slaney: linear below 1 kHz, logarithmic above (librosa's default).
    freq = np.asarray(freq, dtype=np.float64)
    mels = freq * 3.0 / 200.0
    log_region = freq >= 1000.0
    mels = np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-12) / 1000.0) / (math.log(6.4) / 27.0), mels)
    return mels


def _mel_to_hz(mels: np.ndarray, scale: str) -> np.ndarray:
    if scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    freqs = mels * 200.0 / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp((math.log(6.4) / 27.0) * (mels - 15.0)), freqs)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float,
                   scale: str = "slaney") -> torch.Tensor:
    """Triangular mel filters, shape (n_fft // 2 + 1, n_mels).

    scale='slaney' matches librosa.filters.mel (Slaney scale and area norm: torchlibrosa's melW);
    scale='htk' matches torchaudio's MelSpectrogram defaults (HTK scale, no norm).
    """
    n_freqs = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_freqs)
    mel_pts = np.linspace(_hz_to_mel(np.array(fmin, dtype=np.float64), scale),
                          _hz_to_mel(np.array(fmax, dtype=np.float64), scale), n_mels + 2)
    hz_pts = _mel_to_hz(mel_pts, scale)
    fdiff = np.diff(hz_pts)
    ramps = hz_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    if scale == "slaney":
        weights *= (2.0 / (hz_pts[2 : n_mels + 2] - hz_pts[:n_mels]))[:, None]
    return torch.tensor(weights.T, dtype=torch.float32)


def power_to_db(power: torch.Tensor) -> torch.Tensor:
    # ref=1.0, amin=1e-10, no top_db: LAION-CLAP's settings for both mel paths.
    return 10.0 * torch.log10(torch.clamp(power, min=AMIN))


def dft_kernels(window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary windowed DFT rows, (n_fft // 2 + 1, n_fft): torchlibrosa's conv weights."""
    n_fft = window.shape[0]
    n = torch.arange(n_fft, dtype=torch.float64, device=window.device)
    k = torch.arange(n_fft // 2 + 1, dtype=torch.float64, device=window.device)
    angle = 2.0 * math.pi * k[:, None] * n[None, :] / n_fft
    window = window.double()
    return (torch.cos(angle) * window).float(), (-torch.sin(angle) * window).float()


class STFT(nn.Module):
    """Hann-windowed DFT as two frozen Conv1d (torchlibrosa's layout)."""

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        bins = n_fft // 2 + 1
        self.conv_real = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False)
        self.conv_imag = nn.Conv1d(1, bins, n_fft, stride=hop_length, bias=False)
        real, imag = dft_kernels(torch.hann_window(n_fft, periodic=True, dtype=torch.float64))
        with torch.no_grad():
            self.conv_real.weight.copy_(real[:, None, :])
            self.conv_imag.weight.copy_(imag[:, None, :])
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        return self.conv_real(x), self.conv_imag(x)


class Spectrogram(nn.Module):
    """Power spectrogram, (B, L) -> (B, 1, frames, n_fft // 2 + 1); frames = L // hop + 1.

    While the conv weights are a windowed DFT (they always are: torchlibrosa freezes them, and so
    do we), the same numbers come from torch.stft with that window, an FFT that costs a small
    fraction of the 1024-tap convolutions. Weights that are not a DFT run through the convs.
    """

    def __init__(self, n_fft: int, hop_length: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop_length
        self.stft = STFT(n_fft, hop_length)
        self._is_dft: bool | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_is_dft", None))

    def is_dft(self) -> bool:
        if self._is_dft is None:
            with torch.no_grad():
                real, imag = dft_kernels(self.stft.conv_real.weight[0, 0])  # row 0 is the window itself
                self._is_dft = bool(torch.allclose(self.stft.conv_real.weight[:, 0], real, atol=1e-6)
                                    and torch.allclose(self.stft.conv_imag.weight[:, 0], imag, atol=1e-6))
        return self._is_dft

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if self.is_dft():
            spec = torch.stft(waveform, self.n_fft, self.hop, window=self.stft.conv_real.weight[0, 0],
                              center=True, pad_mode="reflect", return_complex=True)
            # re² + im² as torchlibrosa sums them: the same numbers as view_as_real(..).pow(2).sum(-1)
            # at a sixth of the time on a CPU (a strided last-axis reduction is slow there).
            return (spec.real.square() + spec.imag.square()).transpose(1, 2)[:, None]
        real, imag = self.stft(waveform)
        return (real**2 + imag**2).transpose(1, 2)[:, None]


class LogmelFilterBank(nn.Module):
    def __init__(self, sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> None:
        super().__init__()
        self.melW = nn.Parameter(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax), requires_grad=False)

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        return power_to_db(torch.matmul(power, self.melW))


class SpecAugmentation(nn.Module):
    """Zero two random time stripes and two frequency stripes per example (training only)."""

    def __init__(self, time_drop_width: int, freq_drop_width: int, stripes: int = 2) -> None:
        super().__init__()
        self.time_drop_width = time_drop_width
        self.freq_drop_width = freq_drop_width
        self.stripes = stripes

    def _stripes(self, x: torch.Tensor, dim: int, width: int) -> torch.Tensor:
        batch, total = x.shape[0], x.shape[dim]
        widths = torch.randint(0, width, (batch, self.stripes), device=x.device)
        starts = (torch.rand(batch, self.stripes, device=x.device) * (total - widths + 1)).long()
        pos = torch.arange(total, device=x.device)
        hit = ((pos >= starts[..., None]) & (pos < (starts + widths)[..., None])).any(dim=1)
        shape = [batch, 1, 1, 1]
        shape[dim] = total
        return x.masked_fill(hit.view(shape), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T, F)
        if not self.training:
            return x
        x = self._stripes(x, 2, self.time_drop_width)
        return self._stripes(x, 3, self.freq_drop_width)


class FusionMel(nn.Module):
    """LAION-CLAP's fusion input: [shrunk whole clip, front, middle, back crop] of the mel.

    Input: waveforms padded to a common length, their true lengths, and three uniform numbers
    per clip (drawn by the loader so the crop positions are seeded and resumable). A clip of at
    most `clip_samples` was already filled to exactly that length by the loader; its four
    channels are the same mel, and it is not `longer`. Each clip's mel is that of the clip alone,
    whatever shares its batch (`clip_mels`).
    """

    def __init__(self, sample_rate: int, n_fft: int, hop: int, n_mels: int, fmin: float, fmax: float,
                 clip_samples: int) -> None:
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.chunk_frames = clip_samples // hop + 1
        self.clip_samples = clip_samples
        # Not persistent: LAION-CLAP's checkpoints hold no such tensor.
        self.register_buffer("fbank", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, "htk"),
                             persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def mel(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveform, self.n_fft, self.hop, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        return power_to_db(torch.matmul(spec.abs().pow(2).transpose(1, 2), self.fbank))  # (B, T, M)

    def clip_mels(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, frames, M): each clip's mel from its own samples, as LAION-CLAP computes it. Over the
        padded batch a shorter clip's last frames would see the padding's zeros instead of the
        clip's own reflection (up to 13 dB off). Clips of one length share one STFT; frames past a
        clip's end hold the mel of silence."""
        frames = waveform.shape[1] // self.hop + 1
        mel = waveform.new_full((waveform.shape[0], frames, self.fbank.shape[1]), SILENCE_DB)
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero()[:, 0]
            mel[rows, : length // self.hop + 1] = self.mel(waveform[rows, :length])
        return mel

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor, crop_u: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        mel = self.clip_mels(waveform, lengths)
        batch, _, n_mels = mel.shape
        chunk = self.chunk_frames
        total = lengths // self.hop + 1
        longer = (lengths > self.clip_samples) & (total > chunk)
        steps = torch.arange(chunk, device=mel.device)
        # Crops: split the valid starts [0, total - chunk] in three ranges, pick one start in each.
        n_starts = (total - chunk + 1).clamp(min=1)
        # np.array_split's ranges: the first (n % 3) ranges hold one extra start.
        bounds = [i * (n_starts // 3) + torch.clamp(n_starts % 3, max=i) for i in range(4)]
        starts = []
        for i in range(3):
            size = (bounds[i + 1] - bounds[i]).clamp(min=1)
            pick = (crop_u[:, i] * size).long().clamp(max=size - 1)
            starts.append(torch.where(bounds[i + 1] > bounds[i], bounds[i] + pick, torch.zeros_like(pick)))
        crops = [self._gather(mel, (s[:, None] + steps[None]).clamp(max=mel.shape[1] - 1)) for s in starts]
        shrunk = self._shrink(mel, total, chunk)
        head = mel[:, :chunk] if mel.shape[1] >= chunk else F.pad(mel, (0, 0, 0, chunk - mel.shape[1]))
        keep = longer[:, None, None]
        channels = [torch.where(keep, view, head) for view in [shrunk, *crops]]
        return torch.stack(channels, dim=1).reshape(batch, 4, chunk, n_mels), longer

    @staticmethod
    def _gather(mel: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return torch.gather(mel, 1, index[..., None].expand(-1, -1, mel.shape[2]))

    def _shrink(self, mel: torch.Tensor, total: torch.Tensor, chunk: int) -> torch.Tensor:
        """Bilinear resize of each clip's valid frames to `chunk` frames (align_corners=False)."""
        scale = total.float() / chunk
        src = ((torch.arange(chunk, device=mel.device).float()[None] + 0.5) * scale[:, None] - 0.5).clamp(min=0)
        low = src.floor().long()
        low = torch.minimum(low, (total - 1)[:, None])
        high = torch.minimum(low + 1, (total - 1)[:, None])
        frac = (src - low.float()).clamp(0, 1)[..., None]
        return self._gather(mel, low) * (1 - frac) + self._gather(mel, high) * frac


def add_mel_frontend(encoder: nn.Module, cfg: "AudioConfig", fusion: bool) -> None:
    """The waveform -> log-mel front end HTSAT and CNN14 share, under LAION-CLAP's attribute names
    (`spectrogram_extractor`, `logmel_extractor`, `fusion_mel`, `spec_augmenter`, `bn0`) so their
    checkpoints load into either encoder unchanged."""
    encoder.spectrogram_extractor = Spectrogram(cfg.window_size, cfg.hop_size)
    encoder.logmel_extractor = LogmelFilterBank(cfg.mel_sample_rate or cfg.sample_rate, cfg.window_size,
                                                cfg.mel_bins, cfg.fmin, cfg.fmax)
    if fusion:
        encoder.fusion_mel = FusionMel(cfg.sample_rate, cfg.window_size, cfg.hop_size, cfg.mel_bins,
                                       cfg.fmin, cfg.fmax, cfg.clip_samples)
    encoder.spec_augmenter = SpecAugmentation(cfg.time_drop_width, cfg.freq_drop_width)
    encoder.bn0 = nn.BatchNorm2d(cfg.mel_bins)
