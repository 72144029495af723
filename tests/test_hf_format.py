"""Hugging Face ClapModel folders: our exports load in transformers and compute our embeddings
through HF's own feature extractor and tokenizer; HF's models load in ours and compute theirs."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from clap_model import checkpoint as ckpt
from clap_model import hf_format
from clap_model.clap import CLAP
from clap_model.config import ModelConfig, RunFailure, UsageError, get_preset
from clap_model.data import crop_or_fill, decode_audio
from clap_model.inference import CLAPInference
from clap_model.text import byte_tokenizer
from conftest import REAL_AUDIO_DIR
from random_weights import perturb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTIONS = ["a dog barks twice", "rain on a tin roof, then thunder", "ünïcode strings and digits 123"]
ATOL = 1e-4
RATE = 48_000


def _pooled(cfg: ModelConfig) -> ModelConfig:
    return replace(cfg, text=replace(cfg.text, pooling="pooler"))


TINY = _pooled(get_preset("tiny"))
# HF's feature extractor shrinks fusion mels to 64 bins; 128 // 64 keeps tiny's freq_ratio of 2.
TINY_FUSION = replace(_pooled(get_preset("tiny-fusion")),
                      audio=replace(get_preset("tiny-fusion").audio, mel_bins=64, spec_size=128))


def _clip(name: str, seconds: float | None = None) -> np.ndarray:
    wave = decode_audio((REAL_AUDIO_DIR / f"{name}.ogg").read_bytes(), RATE)
    return wave[: int(seconds * RATE)] if seconds else wave


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    """A clip shorter than tiny's 2 s (filled), one a little longer, one over 10 s (fused, cropped)."""
    return [_clip("sorohanro_-_solo-trumpet-06", 1.3), _clip("456440__inspectorj__bird-whistling-robin-single-13"),
            _clip("198-209-0000")]


@pytest.fixture
def hf_crops_like_ours(monkeypatch):
    """HF's extractor crops long clips at random; ours (evaluation) at the start, and fusion's three
    local crops at the middle of their ranges. Make HF's random picks those."""
    monkeypatch.setattr(np.random, "randint", lambda low, high=None, *a, **k: 0)
    monkeypatch.setattr(np.random, "choice", lambda options, *a, **k: options[len(options) // 2])


def _our_model(cfg: ModelConfig, seed: int) -> CLAP:
    torch.manual_seed(seed)
    model = CLAP(cfg, pretrained_text=False)
    perturb(model, seed)
    return model.eval()


def _hf_embeddings(folder: Path, clips: list[np.ndarray], max_length: int):
    from transformers import ClapModel, ClapProcessor

    hf = ClapModel.from_pretrained(folder).eval()
    processor = ClapProcessor.from_pretrained(folder)
    features = processor.feature_extractor(clips, sampling_rate=RATE, return_tensors="pt")
    tokens = processor.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=max_length,
                                 return_tensors="pt")
    with torch.no_grad():
        audio = hf.get_audio_features(input_features=features["input_features"].float(),
                                      is_longer=features["is_longer"])
        text = hf.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    # transformers 5 returns an output object whose pooler_output is the embedding; 4 the tensor.
    pooled = lambda out: getattr(out, "pooler_output", out)  # noqa: E731
    return features, tokens, pooled(audio), pooled(text)


# tiny-roberta as it is: its shipped BPE tokenizer goes into the export as it is.
@pytest.mark.parametrize("cfg", [TINY, TINY_FUSION, get_preset("tiny-roberta")], ids=["tiny", "tiny-fusion", "tiny-roberta"])
def test_export_loads_in_transformers_and_computes_our_embeddings(cfg, clips, tmp_path, hf_crops_like_ours):
    model = _our_model(cfg, seed=1)
    hf_format.save_hf(model, tmp_path / "hf")
    assert hf_format.is_hf_model(str(tmp_path / "hf"))
    features, tokens, hf_audio, hf_text = _hf_embeddings(tmp_path / "hf", clips, cfg.text.max_length)

    ours = CLAPInference(model, device="cpu")
    assert torch.equal(tokens["input_ids"], ours.tokenize(CAPTIONS)["input_ids"])  # HF's tokenizer: our ids
    # The same mel from HF's extractor and our front end, and the same `is_longer` (fusion).
    for row, clip in enumerate(clips):
        wave, longer, crop_u = crop_or_fill(clip, ours.spec, None)
        with torch.no_grad():
            mel, our_longer = model.audio_branch.mel(torch.from_numpy(wave)[None], torch.tensor([len(wave)]),
                                                     torch.tensor([crop_u]))
        # Over 110 dB below a clip's peak float32's STFT (ours) and float64's (HF's) part: the
        # resampled 22 kHz clips have only rounding noise above 11 kHz. Compare above that floor.
        floor = float(mel.max()) - 110.0
        hf_mel = features["input_features"][row].float()
        assert (mel[0].clamp(min=floor) - hf_mel.clamp(min=floor)).abs().max() < 0.05  # dB
        if cfg.enable_fusion:
            assert bool(features["is_longer"][row]) == bool(our_longer[0]) == longer == (len(clip) > cfg.audio.clip_samples)
    assert (hf_audio - ours.embed_audio(clips, sample_rate=RATE)).abs().max() < ATOL
    assert (hf_text - ours.embed_text(CAPTIONS)).abs().max() < ATOL


def _hf_random_model(cfg: ModelConfig, folder: Path) -> None:
    """An HF ClapModel of `cfg`'s geometry with random weights, saved by HF with its processor."""
    from transformers import ClapModel, ClapProcessor

    torch.manual_seed(2)
    config = hf_format.hf_config(CLAP(cfg, pretrained_text=False))
    hf = ClapModel(config).eval()
    perturb(hf, seed=2)
    with torch.no_grad():
        for name, param in hf.named_parameters():  # HF initialises these to zeros / constants
            if "relative_position_bias_table" in name or "logit_scale" in name:
                param.normal_(0.0, 0.1)
    hf.save_pretrained(folder)
    tokenizer = hf_format.roberta_tokenizer(byte_tokenizer(), cfg.text.max_length)
    ClapProcessor(feature_extractor=hf_format.feature_extractor(cfg), tokenizer=tokenizer).save_pretrained(folder)


@pytest.mark.parametrize("cfg", [TINY, TINY_FUSION], ids=["tiny", "tiny-fusion"])
def test_hf_saved_model_loads_in_ours_and_computes_its_embeddings(cfg, clips, tmp_path, hf_crops_like_ours):
    folder = tmp_path / "hf"
    _hf_random_model(cfg, folder)
    _, _, hf_audio, hf_text = _hf_embeddings(folder, clips, cfg.text.max_length)
    ours = CLAPInference.from_checkpoint(folder, device="cpu")  # the inference API takes the folder
    assert ours.model.cfg.enable_fusion == cfg.enable_fusion and ours.model.cfg.audio == replace(
        cfg.audio, time_drop_width=ours.model.cfg.audio.time_drop_width,
        freq_drop_width=ours.model.cfg.audio.freq_drop_width)  # SpecAugment widths: training only, not in HF
    assert (hf_audio - ours.embed_audio(clips, sample_rate=RATE)).abs().max() < ATOL
    assert (hf_text - ours.embed_text(CAPTIONS)).abs().max() < ATOL
    scale = ours.model.logit_scale_a.detach()
    assert torch.equal(scale, ckpt.load_model(folder).logit_scale_a.detach())  # clap-eval --checkpoint
    assert torch.equal(ckpt.read(folder)["state_dict"]["logit_scale_a"], scale)  # clap-train --pretrained


def test_what_hf_cannot_hold_is_refused_in_one_line(tmp_path):
    cases = {
        "PANN": replace(get_preset("pann14-roberta"), text=TINY.text),
        "pools text with RoBERTa's pooler": get_preset("tiny"),
        "AFF": replace(TINY_FUSION, fusion_type="iaff_2d"),
        "64 mel bins": _pooled(get_preset("tiny-fusion")),
        "whole seconds": replace(TINY, audio=replace(TINY.audio, clip_samples=100_000)),
    }
    for message, cfg in cases.items():
        with pytest.raises(UsageError, match=message) as caught:
            hf_format.save_hf(CLAP(cfg, pretrained_text=False), tmp_path / "out")
        assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_hf_model_names(tmp_path):
    (tmp_path / "clap").mkdir()
    (tmp_path / "clap" / "config.json").write_text('{"model_type": "clap"}')
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "run.pt").write_bytes(b"PK\x03\x04")
    assert hf_format.is_hf_model(str(tmp_path / "clap"))
    assert hf_format.is_hf_model("laion/clap-htsat-unfused")  # a hub id
    for name in (tmp_path / "bert", tmp_path / "run.pt", tmp_path, "runs/epoch_3.pt", "latest.pt"):
        assert not hf_format.is_hf_model(str(name))
    # Offline in tests: one line, no traceback; an unreachable hub fails the run (exit 1), not the command line.
    with pytest.raises(RunFailure, match="Hugging Face CLAP model 'nobody/no-such-clap' is not in the Hugging Face cache"):
        hf_format.load_hf("nobody/no-such-clap")


def test_rename_table_round_trips_every_weight():
    model = CLAP(TINY_FUSION, pretrained_text=False)
    state = model.state_dict()
    back = hf_format.from_hf_state(hf_format.to_hf_state(state))
    held = {k for k in state if not hf_format.OURS_ONLY.fullmatch(k)}
    assert set(back) == held
    assert all(torch.equal(back[k], state[k]) for k in held)


def _saved(cfg: ModelConfig, path: Path) -> CLAP:
    model = _our_model(cfg, seed=3)
    ckpt.save_atomic({"config": cfg.to_dict(), "state_dict": model.state_dict(), "epoch": 1}, path)
    return model


def test_clap_export_hf_and_laion(tmp_path, capsys):
    from clap_model.export import main

    model = _saved(TINY, tmp_path / "run.pt")
    assert main(["--checkpoint", str(tmp_path / "run.pt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    back = ckpt.load_model(tmp_path / "hf")
    held = [k for k in model.state_dict() if not hf_format.OURS_ONLY.fullmatch(k)]
    assert all(torch.equal(back.state_dict()[k], model.state_dict()[k]) for k in held)
    assert back.text_branch.config.model_type == "roberta"
    # A model loaded from HF exports to HF again, the same weights.
    assert main(["--checkpoint", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "hf2")]) == 0
    again = hf_format.load_hf(str(tmp_path / "hf2"))
    assert all(torch.equal(again.state_dict()[k], model.state_dict()[k]) for k in held)
    # Back out of HF into LAION-CLAP's layout: needs LAION's geometry (the tiny preset is not one).
    assert main(["--checkpoint", str(tmp_path / "hf"), "--format", "laion", "--out", str(tmp_path / "laion.pt")]) == 2
    assert "LAION-CLAP builds HTSAT tiny/base/large only" in capsys.readouterr().err
    assert not (tmp_path / "laion.pt").exists()


def test_clap_export_laion_layout(tmp_path):
    from clap_model.export import laion_state

    cfg = replace(get_preset("htsat-tiny-roberta"), text=replace(TINY.text, hidden_size=768, heads=12,
                                                                  intermediate_size=64, layers=1))
    with torch.device("meta"):
        model = CLAP(cfg, pretrained_text=False)
    state = laion_state(model)["state_dict"]
    assert all(key.startswith("module.") for key in state)
    assert state["module.text_branch.embeddings.position_ids"].shape == (1, TINY.text.max_length + 2)
    assert ckpt.clean_state_dict({"state_dict": state}).keys() == model.state_dict().keys()


@pytest.mark.parametrize("argv, message", [
    (["--format", "hf"], "pools text with RoBERTa's pooler"),  # the tiny preset's mean pooling
    (["--format", "laion"], "LAION-CLAP builds HTSAT"),
    (["--format", "onnx"], "invalid choice"),
])
def test_clap_export_refusals_are_one_line_exit_2(argv, message, tmp_path, capsys):
    from clap_model.export import main

    _saved(get_preset("tiny"), tmp_path / "run.pt")
    try:
        code = main(["--checkpoint", str(tmp_path / "run.pt"), *argv, "--out", str(tmp_path / "out")])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_clap_export_keeps_an_existing_folder(tmp_path, capsys):
    from clap_model.export import main

    _saved(TINY, tmp_path / "run.pt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    assert main(["--checkpoint", str(tmp_path / "run.pt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["notes.txt"]
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--format", "hf", "--out", str(tmp_path / "new")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
