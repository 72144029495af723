"""Inference API: embed audio files or arrays and texts, compare them, classify zero-shot.

    from clap_model.inference import CLAPInference
    clap = CLAPInference.from_checkpoint("run/epoch_10.pt")            # ours
    clap = CLAPInference.from_checkpoint("630k-audioset-best.pt", model="htsat-tiny-roberta")  # LAION's
    audio = clap.embed_audio(["dog.wav", "rain.flac"])
    text = clap.embed_text(["a dog barking", "rain on a roof"])
    clap.similarity(audio, text)                                         # (2, 2) cosine similarities
    clap.zero_shot(["dog.wav"], ["dog", "rain", "car horn"])             # (1, 3) probabilities

Arrays are (samples,), (channels, samples) or (samples, channels), float in [-1, 1] or integer PCM,
with their `sample_rate`. Audio longer than the model's clip is cut at its start (fusion models see
it whole, with centred local crops); shorter audio is filled as in training (repeatpad by default).
Audio needs neither tokenizer nor network, even from a LAION-CLAP release (its preset's text tower
is built from a known config); text loads the tokenizer on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from clap_model import checkpoint as ckpt
from clap_model.clap import CLAP
from clap_model.data import AudioSpec, crop_or_fill, decode_audio
from clap_model.evaluate import audio_spec
from clap_model.params import DEFAULT_TEMPLATE
from clap_model.text import Tokenize
from clap_model.train import autocast

AudioInput = Union[str, Path, np.ndarray, torch.Tensor]


class CLAPInference:
    def __init__(self, model: CLAP, device: str | torch.device | None = None, precision: str | None = None,
                 filling: str = "repeatpad") -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision or ("bf16" if self.device.type == "cuda" else "fp32")
        self.model = model.to(self.device).eval()
        self.spec: AudioSpec = audio_spec(model.cfg, None, filling, max_fusion_seconds=600.0)
        self._tokenize: Tokenize | None = None

    @property
    def tokenize(self) -> Tokenize:
        """Made on first use: embedding audio needs no tokenizer (nor the hub it may come from)."""
        if self._tokenize is None:
            self._tokenize = Tokenize(self.model.cfg.text)
        return self._tokenize

    @classmethod
    def from_checkpoint(cls, path: str | Path, model: str | None = None, text_model: str | None = None,
                        max_checkpoint_bytes: int | None = None, **kwargs) -> "CLAPInference":
        """A clap-train checkpoint, or a LAION-CLAP release with `model` naming its preset; loading it
        may allocate at most `max_checkpoint_bytes` (checkpoint.read)."""
        return cls(ckpt.load_model(path, model, text_model, max_checkpoint_bytes), **kwargs)

    def _waveform(self, item: AudioInput, sample_rate: int | None) -> np.ndarray:
        rate = self.spec.sample_rate
        if isinstance(item, (str, Path)):
            return decode_audio(Path(item).read_bytes(), rate)
        array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        # Integer PCM (int16 from a WAV) is scaled to [-1, 1) as the shards' FLAC is decoded.
        scale = float(-np.iinfo(array.dtype).min) if array.dtype.kind == "i" else 1.0
        array = array.astype(np.float32) / scale
        if array.ndim == 2:  # -> mono: channels are the short axis, (channels, samples) as torchaudio
            array = array.mean(axis=int(np.argmin(array.shape)))  # or (samples, channels) as soundfile
        if array.ndim != 1:
            raise ValueError(f"an audio array is (samples,) or 2-D with a channel axis, not {array.shape}")
        if sample_rate is None:
            raise ValueError("arrays need their sample_rate")
        if sample_rate != rate:
            import soxr

            array = soxr.resample(array, sample_rate, rate, quality="HQ").astype(np.float32)
        return array

    @torch.no_grad()
    def embed_audio(self, audio: Sequence[AudioInput], sample_rate: int | None = None,
                    batch_size: int = 16) -> torch.Tensor:
        """(N, joint_dim) L2-normalised embeddings of files or arrays (mono, or channels on either axis)."""
        out = [torch.empty(0, self.model.cfg.joint_dim)]  # no audio: (0, joint_dim)
        for start in range(0, len(audio), batch_size):
            items = [crop_or_fill(self._waveform(a, sample_rate), self.spec, None)
                     for a in audio[start : start + batch_size]]
            lengths = [len(wave) for wave, _, _ in items]
            batch = torch.zeros(len(items), max(lengths))
            for row, (wave, _, _) in enumerate(items):
                batch[row, : len(wave)] = torch.from_numpy(wave)
            crop_u = torch.tensor([u for _, _, u in items], dtype=torch.float32)
            with autocast(self.device, self.precision):
                emb = self.model.encode_audio(batch.to(self.device), torch.tensor(lengths, device=self.device),
                                              crop_u.to(self.device))
            out.append(emb.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        out = [torch.empty(0, self.model.cfg.joint_dim)]  # no texts: (0, joint_dim)
        for start in range(0, len(texts), batch_size):
            tokens = {k: v.to(self.device) for k, v in self.tokenize(list(texts[start : start + batch_size])).items()}
            with autocast(self.device, self.precision):
                out.append(self.model.encode_text(tokens).float().cpu())
        return torch.cat(out)

    @staticmethod
    def similarity(audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarity, (N audio, M texts)."""
        return audio @ text.T

    def zero_shot(self, audio: Sequence[AudioInput], classes: Sequence[str], template: str = DEFAULT_TEMPLATE,
                  sample_rate: int | None = None) -> torch.Tensor:
        """(N, len(classes)) class probabilities: softmax over the model's scaled similarities."""
        audio_emb = self.embed_audio(audio, sample_rate)
        text_emb = self.embed_text([template.format(name) for name in classes])
        scale = float(self.model.logit_scale_a.detach().exp())
        return torch.softmax(scale * self.similarity(audio_emb, text_emb), dim=-1)
