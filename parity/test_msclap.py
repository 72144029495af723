"""Parity with Microsoft CLAP (msclap 1.3.4): its own models, random weights, our loader and exporter.

Run in the parity virtualenv (numpy<2, transformers<5, msclap and torchlibrosa):
    bash parity/run.sh parity/test_msclap.py -x

For each version (2022: CNN14 + BERT, 2023: HTSAT + GPT-2) msclap's `CLAP` is built from its own yml
config exactly as its CLAPWrapper does, with random weights whose norm statistics, norm affines and
biases are perturbed (so a wrong mapping of any of them shows), and saved as its release files are
laid out (`{'model': state_dict}`, with the causal-mask / position-id buffers older transformers
wrote). Our `load_model` reads that file; both sides get the same real audio through their own
front end (msclap's: torchlibrosa inside its audio encoder) and the same token ids (from msclap's
own `preprocess_text` on a byte-level tokenizer: no hub). Then our `save_msclap` file goes back
into a fresh msclap model, which must give the same embeddings.
"""
from __future__ import annotations

import importlib.util
import re
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from transformers import AutoModel, BertConfig, GPT2Config  # first: it looks for torchaudio (finds none)

# msclap/__init__.py imports CLAPWrapper, which imports torchaudio for reading and resampling files.
# Neither is used here (the torchaudio wheels on the index are CUDA builds that do not load beside
# CPU torch), so empty stand-ins satisfy those imports only.
if importlib.util.find_spec("torchaudio") is None:
    _torchaudio = types.ModuleType("torchaudio")
    _torchaudio.transforms = types.ModuleType("torchaudio.transforms")
    sys.modules.update({"torchaudio": _torchaudio, "torchaudio.transforms": _torchaudio.transforms})

import msclap  # noqa: E402
from msclap.CLAPWrapper import CLAPWrapper  # noqa: E402
from msclap.models import clap as ms_clap  # noqa: E402

from clap_model.checkpoint import load_model  # noqa: E402
from clap_model.clap import CLAP  # noqa: E402
from clap_model.config import PRESETS  # noqa: E402
from clap_model.data import decode_audio, fill  # noqa: E402
from clap_model.msclap_format import save_msclap  # noqa: E402
from clap_model.text import Tokenize  # noqa: E402

REAL_AUDIO = Path(__file__).resolve().parent.parent / "tests" / "data" / "real-audio"
CLIPS = ("456440__inspectorj__bird-whistling-robin-single-13", "198-209-0000")  # 2.7 s (filled), 13.9 s
CAPTIONS = ["A robin whistles a single phrase!", "A woman reads a chapter of Sense and Sensibility aloud."]
MEL_DB_TOL = 0.05
EMBED_TOL = 1e-4


class OfflineAutoModel:
    """msclap's TextEncoder calls AutoModel.from_pretrained(name): build that architecture from
    transformers' config defaults instead (gpt2-small, bert-base-uncased), random weights, no hub."""

    @staticmethod
    def from_pretrained(name: str) -> nn.Module:
        return AutoModel.from_config({"gpt2": GPT2Config, "bert-base-uncased": BertConfig}[name]())


def ms_config(version: str) -> dict:
    return yaml.safe_load((Path(msclap.__file__).parent / "configs" / f"config_{version}.yml").read_text())


def build_msclap(version: str, monkeypatch: pytest.MonkeyPatch) -> nn.Module:
    """msclap's CLAP with the arguments CLAPWrapper.load_clap passes."""
    args = ms_config(version)
    monkeypatch.setattr(ms_clap, "AutoModel", OfflineAutoModel)
    model = ms_clap.CLAP(audioenc_name=args["audioenc_name"], sample_rate=args["sampling_rate"],
                         window_size=args["window_size"], hop_size=args["hop_size"], mel_bins=args["mel_bins"],
                         fmin=args["fmin"], fmax=args["fmax"], classes_num=args["num_classes"],
                         out_emb=args["out_emb"], text_model=args["text_model"],
                         transformer_embed_dim=args["transformer_embed_dim"], d_proj=args["d_proj"])
    return model.eval()


@torch.no_grad()
def perturb(model: nn.Module, wave: torch.Tensor, seed: int) -> None:
    """Random norm affines and biases (initialised to 1 / 0, they would hide a wrong or missing
    mapping), a little noise on every other trained weight; the STFT and mel filterbank stay as
    built (they are the front end). Then each BatchNorm's running statistics are set, layer by
    layer, near the statistics of what it sees on these clips but off by a random amount: random
    statistics alone drown the audio in their offsets and every clip gets the same embedding."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "spectrogram_extractor" in name or "logmel_extractor" in name:
            continue
        noise = torch.randn(param.shape, generator=gen)
        if name.endswith("bias") or "norm" in name or "ln_" in name or "bn" in name:
            param.add_(noise * 0.1)
        else:
            param.add_(noise * 0.01)

    def set_statistics(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        seen = inputs[0].transpose(0, 1).flatten(1)  # (channels, everything else)
        shape = module.running_mean.shape
        module.running_mean.copy_(seen.mean(1) + 0.2 * seen.std(1) * torch.randn(shape, generator=gen))
        module.running_var.copy_(seen.var(1) * (0.6 + 0.8 * torch.rand(shape, generator=gen)))

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    hooks = [norm.register_forward_pre_hook(set_statistics) for norm in norms]
    model.audio_encoder(wave)  # eval mode: each norm already uses the statistics just set
    for hook in hooks:
        hook.remove()


def save_release(model: nn.Module, version: str, path: Path) -> None:
    """As CLAP_weights_{version}.pth: {'model': state_dict}, with the non-weight buffers older
    transformers saved (GPT-2's causal mask and masked_bias; BERT's position ids)."""
    state = dict(model.state_dict())
    base = "caption_encoder.base."
    if version == "2023":
        for layer in range(GPT2Config().n_layer):
            state[f"{base}h.{layer}.attn.bias"] = torch.tril(torch.ones(1024, 1024, dtype=torch.bool))[None, None]
            state[f"{base}h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    else:
        state[f"{base}embeddings.position_ids"] = torch.arange(512)[None]
    torch.save({"model": state}, path)


def clips(sample_rate: int, duration: int) -> torch.Tensor:
    """The same waveforms for both sides: decoded and resampled by our loader, repeated to the
    duration (msclap's fill) or cut at the start."""
    waves = [fill(decode_audio((REAL_AUDIO / f"{name}.ogg").read_bytes(), sample_rate), sample_rate * duration,
                  "repeat") for name in CLIPS]
    return torch.from_numpy(np.stack(waves)).float()


def ms_tokens(version: str, tokenize: Tokenize) -> dict[str, torch.Tensor]:
    """msclap's own CLAPWrapper.preprocess_text on our (byte-level) tokenizer."""
    args = ms_config(version)
    keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if version == "2022" else [])  # as load_clap
    settings = types.SimpleNamespace(text_model=args["text_model"], text_len=args["text_len"])
    wrapper = types.SimpleNamespace(tokenizer=tokenize.tokenizer, use_cuda=False, args=settings, token_keys=keys)
    wrapper.default_collate = lambda batch: CLAPWrapper.default_collate(wrapper, batch)
    wrapper.np_str_obj_array_pattern = re.compile(r"[SaUO]")
    wrapper.default_collate_err_msg_format = "default_collate: {}"
    out = CLAPWrapper.preprocess_text(wrapper, CAPTIONS)
    return {key: out[key] for key in wrapper.token_keys}


def ms_audio_base(model: nn.Module, version: str) -> nn.Module:
    return model.audio_encoder.base.htsat if version == "2023" else model.audio_encoder.base


@torch.no_grad()
def ms_embeddings(model: nn.Module, wave: torch.Tensor, tokens: dict[str, torch.Tensor]):
    return F.normalize(model.audio_encoder(wave)[0], dim=-1), F.normalize(model.caption_encoder(tokens), dim=-1)


@torch.no_grad()
def our_embeddings(model: CLAP, wave: torch.Tensor, tokens: dict[str, torch.Tensor]):
    return model.encode_audio(wave), model.encode_text(tokens)


def mel_of(branch: nn.Module, wave: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return branch.logmel_extractor(branch.spectrogram_extractor(wave))


@pytest.mark.parametrize("version", ["2022", "2023"])
def test_msclap_parity(version: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    preset = PRESETS[f"msclap-{version}"]
    args = ms_config(version)
    assert (preset.audio.sample_rate, preset.audio.clip_samples) == (args["sampling_rate"],
                                                                     args["sampling_rate"] * args["duration"])
    assert (preset.text.max_length, preset.joint_dim) == (args["text_len"], args["d_proj"])
    wave = clips(args["sampling_rate"], args["duration"])
    reference = build_msclap(version, monkeypatch)
    perturb(reference, wave, seed=int(version))
    release = tmp_path / f"CLAP_weights_{version}.pth"
    save_release(reference, version, release)

    # Our front end as the preset builds it (no weights loaded) against msclap's torchlibrosa one.
    fresh = CLAP(preset, pretrained_text=False).eval()
    ours_mel, ms_mel = mel_of(fresh.audio_branch, wave), mel_of(ms_audio_base(reference, version), wave)
    del fresh
    assert ours_mel.shape == ms_mel.shape
    mel_diff = float((ours_mel - ms_mel).abs().max())
    assert mel_diff < MEL_DB_TOL

    ours = load_model(release)
    assert ours.cfg == preset
    tokenize = Tokenize(replace(preset.text, name_or_path=None))  # the preset's rules, a byte-level vocabulary
    tokens = ms_tokens(version, tokenize)
    for key, ids in tokenize(CAPTIONS).items():
        assert torch.equal(ids, tokens[key]), key
    ms_audio, ms_text = ms_embeddings(reference, wave, tokens)
    our_audio, our_text = our_embeddings(ours, wave, tokens)
    audio_diff, text_diff = float((our_audio - ms_audio).abs().max()), float((our_text - ms_text).abs().max())
    print(f"msclap-{version}: mel {mel_diff:.2e} dB, audio {audio_diff:.2e}, text {text_diff:.2e} max abs")
    assert audio_diff < EMBED_TOL
    assert text_diff < EMBED_TOL
    assert torch.allclose(ours.logit_scale_a, reference.logit_scale)
    for embeddings in (ms_audio, ms_text):  # the random model tells its inputs apart: the check has teeth
        assert float((embeddings[0] - embeddings[1]).abs().max()) > 100 * EMBED_TOL

    # Our export, loaded by msclap the way CLAPWrapper does, gives the same embeddings.
    exported = tmp_path / "exported.pth"
    save_msclap(ours, exported)
    del ours
    again = build_msclap(version, monkeypatch)
    missing, unexpected = again.load_state_dict(torch.load(exported, map_location="cpu")["model"], strict=False)
    assert (missing, unexpected) == ([], [])
    again_audio, again_text = ms_embeddings(again, wave, tokens)
    assert float((again_audio - ms_audio).abs().max()) < EMBED_TOL
    assert float((again_text - ms_text).abs().max()) < EMBED_TOL

