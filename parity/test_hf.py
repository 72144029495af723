"""Parity with transformers 4's ClapModel (the version the references pin), at LAION-CLAP's real
geometry (htsat-tiny, 10 s clips, 64 mel bins; fused and not): our `--format hf` export loads in
its ClapModel + ClapProcessor and computes our embeddings through its feature extractor and
tokenizer; a ClapModel with random weights saved by it loads in ours and computes its embeddings.
(tests/test_hf_format.py checks the same at toy size under the project's transformers 5.)"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import ClapModel, ClapProcessor

from conftest import ATOL, CAPTIONS, MEL_DB, RATE, perturb

from clap_model import hf_format
from clap_model.clap import CLAP
from clap_model.config import TextConfig, get_preset
from clap_model.data import crop_or_fill
from clap_model.inference import CLAPInference
from clap_model.text import byte_tokenizer

# A one-layer RoBERTa with the byte-level tokenizer (no hub), read through its pooler as HF does.
TEXT = TextConfig(name_or_path=None, max_length=77, hidden_size=768, layers=1, heads=12, intermediate_size=1024,
                  pooling="pooler")
CASES = {name: replace(get_preset(name), text=TEXT) for name in ("htsat-tiny-roberta", "htsat-tiny-roberta-fusion")}


def hf_embeddings(folder: Path, clips, max_length: int):
    model = ClapModel.from_pretrained(folder).eval()
    processor = ClapProcessor.from_pretrained(folder)
    features = processor.feature_extractor(clips, sampling_rate=RATE, return_tensors="pt")
    tokens = processor.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="pt")
    audio = model.get_audio_features(input_features=features["input_features"].float(),
                                     is_longer=features["is_longer"])
    text = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return features, tokens, audio, text


@pytest.mark.parametrize("preset", list(CASES))
@torch.no_grad()
def test_our_export_in_transformers_clap(preset, clips, tmp_path, crops_like_ours):
    torch.manual_seed(1)
    model = CLAP(CASES[preset], pretrained_text=False)
    perturb(model, seed=1)
    model.eval()
    hf_format.save_hf(model, tmp_path / "hf")
    features, tokens, audio, text = hf_embeddings(tmp_path / "hf", clips, TEXT.max_length)
    ours = CLAPInference(model, device="cpu")
    assert torch.equal(tokens["input_ids"], ours.tokenize(CAPTIONS)["input_ids"])
    for row, clip in enumerate(clips):
        wave, longer, crop_u = crop_or_fill(clip, ours.spec, None)
        mel, fused = model.audio_branch.mel(torch.from_numpy(wave)[None], torch.tensor([len(wave)]),
                                            torch.tensor([crop_u]))
        floor = float(mel.max()) - 110.0  # below it float32's STFT (ours) and float64's (HF's) part
        hf_mel = features["input_features"][row].float()
        assert (mel[0].clamp(min=floor) - hf_mel.clamp(min=floor)).abs().max() < MEL_DB
        if fused is not None:
            assert bool(features["is_longer"][row]) == bool(fused[0]) == longer
    assert (ours.embed_audio(clips, sample_rate=RATE) - audio).abs().max() < ATOL
    assert (ours.embed_text(CAPTIONS) - text).abs().max() < ATOL


@pytest.mark.parametrize("preset", list(CASES))
@torch.no_grad()
def test_transformers_clap_in_ours(preset, clips, tmp_path, crops_like_ours):
    cfg = CASES[preset]
    torch.manual_seed(2)
    hf = ClapModel(hf_format.hf_config(CLAP(cfg, pretrained_text=False))).eval()
    perturb(hf, seed=2)
    for name, param in hf.named_parameters():  # HF initialises these to zeros / a constant
        if "relative_position_bias_table" in name or "logit_scale" in name:
            param.normal_(0.0, 0.1)
    hf.save_pretrained(tmp_path / "hf")
    tokenizer = hf_format.roberta_tokenizer(byte_tokenizer(), TEXT.max_length)
    ClapProcessor(feature_extractor=hf_format.feature_extractor(cfg), tokenizer=tokenizer).save_pretrained(tmp_path / "hf")
    _, _, audio, text = hf_embeddings(tmp_path / "hf", clips, TEXT.max_length)
    ours = CLAPInference.from_checkpoint(tmp_path / "hf", device="cpu")
    assert (ours.embed_audio(clips, sample_rate=RATE) - audio).abs().max() < ATOL
    assert (ours.embed_text(CAPTIONS) - text).abs().max() < ATOL
