"""Microsoft CLAP (msclap) in clap_model: presets, msclap's text input, its weight files, training.

Parity against msclap's own code (its models, random weights) is parity/test_msclap.py, run in the
parity virtualenv; these tests need no msclap package and no hub.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from clap_model import main as clap_main
from clap_model.checkpoint import load_model, load_weights, model_config_of, read
from clap_model.clap import CLAP
from clap_model.config import PRESETS, UsageError, get_preset
from clap_model.msclap_format import is_msclap_checkpoint, load_msclap, save_msclap
from clap_model.text import Tokenize, encode
from test_clap_data import build_clap_shards  # tests/ is on sys.path (rootdir-less prepend import)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_presets_follow_msclap_configs():
    old, new = PRESETS["msclap-2022"], PRESETS["msclap-2023"]
    assert (old.audio.model_type, old.audio.sample_rate, old.audio.clip_samples, old.audio.window_size,
            old.audio.hop_size, old.audio.mel_bins, old.audio.fmin, old.audio.fmax) == (
        "PANN", 44_100, 5 * 44_100, 1024, 320, 64, 50, 14_000)
    assert (old.text.name_or_path, old.text.max_length, old.text.pooling) == ("bert-base-uncased", 100, "cls")
    assert (new.audio.model_type, new.audio.model_name, new.audio.sample_rate, new.audio.clip_samples,
            new.audio.hop_size, new.audio.mel_sample_rate) == ("HTSAT", "tiny", 44_100, 7 * 44_100, 320, 32_000)
    assert (new.text.name_or_path, new.text.max_length, new.text.suffix, new.text.pad_token) == (
        "gpt2", 77, " <|endoftext|>", "!")
    for cfg in (old, new):
        assert (cfg.joint_dim, cfg.projection, cfg.logit_scales) == (1024, "msclap", 1)
    # Another text model drops msclap's GPT-2 input rules with msclap's tower.
    swapped = get_preset("msclap-2023", "roberta-base").text
    assert (swapped.suffix, swapped.pad_token, swapped.pooling) == ("", None, "pooler")


def test_gpt2_input_and_pooling_are_msclaps():
    cfg = PRESETS["msclap-tiny"]
    tokens = Tokenize(cfg.text)(["a dog barks", "rain!"])
    ids = tokens["input_ids"]
    assert ids.shape == (2, cfg.text.max_length) and "token_type_ids" not in tokens
    # GPT-2's byte ids ("a" 64, " " 220, "!" 0), then " <|endoftext|>" and the pad "!" (0) to 48 tokens.
    assert ids[0, :13].tolist() == [64, 220, 67, 78, 70, 220, 65, 64, 81, 74, 82, 220, 256]
    assert ids[0, 13:].eq(0).all() and tokens["attention_mask"][0].sum() == 13
    model = CLAP(cfg).eval()
    with torch.no_grad():
        hidden = model.text_branch(input_ids=ids, attention_mask=tokens["attention_mask"]).last_hidden_state
        pooled = encode(model.text_branch, tokens, "eos")
    assert torch.equal(pooled[0], hidden[0, 12])  # <|endoftext|>
    # msclap counts every id 0 as padding, so a caption's own "!" moves its pooling one token left.
    assert ids[1, :7].tolist() == [81, 64, 72, 77, 0, 220, 256]
    assert torch.equal(pooled[1], hidden[1, 5])


def test_cls_pooling_takes_the_first_token():
    text = replace(PRESETS["msclap-tiny"].text, model_type="bert", pooling="cls", suffix="", pad_token=None)
    model = CLAP(replace(PRESETS["msclap-tiny"], text=text)).eval()
    tokens = Tokenize(text)(["a dog barks"])
    with torch.no_grad():
        out = model.text_branch(**tokens).last_hidden_state
        assert torch.equal(encode(model.text_branch, tokens, "cls"), out[:, 0])


def test_msclap_projection_and_one_logit_scale():
    model = CLAP(PRESETS["msclap-tiny"]).eval()
    names = set(model.state_dict())
    assert {"audio_projection.linear1.weight", "audio_projection.linear2.weight",
            "audio_projection.layer_norm.weight", "logit_scale_a"} <= names
    assert not any(n.startswith(("audio_transform", "text_transform")) or "linear1.bias" in n for n in names)
    assert "logit_scale_t" not in names
    proj = model.audio_projection
    x = torch.randn(3, proj.linear1.in_features)
    hidden = x @ proj.linear1.weight.T
    expected = torch.nn.functional.layer_norm(hidden + torch.nn.functional.gelu(hidden) @ proj.linear2.weight.T,
                                              (hidden.shape[-1],), proj.layer_norm.weight, proj.layer_norm.bias)
    assert torch.allclose(proj(x), expected, atol=1e-6)
    with pytest.raises(UsageError, match="one"):
        CLAP(PRESETS["msclap-tiny"], mlp_loss=True)


@pytest.mark.parametrize("version", ["2022", "2023"])
def test_weight_file_round_trip_and_strictness(version, large_tmp_path):
    tmp_path = large_tmp_path
    torch.manual_seed(0)
    model = CLAP(PRESETS[f"msclap-{version}"], pretrained_text=False).eval()
    path = tmp_path / f"CLAP_weights_{version}.pth"
    save_msclap(model, path)
    saved = torch.load(path, map_location="cpu", weights_only=True)
    state = saved["model"]
    audio = "audio_encoder.base.htsat." if version == "2023" else "audio_encoder.base."
    assert set(saved) == {"model"} and "logit_scale" in state
    assert any(k.startswith(audio + "bn0.") for k in state)
    assert any(k.startswith("caption_encoder.projection.linear1") for k in state)
    assert is_msclap_checkpoint(saved) and not is_msclap_checkpoint({"state_dict": model.state_dict()})
    loaded = load_model(path)  # auto-detects the version
    assert loaded.cfg == model.cfg
    assert model_config_of(saved, None, None) == model.cfg  # clap-eval's path: no --model needed
    theirs = loaded.state_dict()
    assert all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())
    load_weights(loaded, saved)  # as clap-train --pretrained does with an msclap file (strict)
    if version == "2023":
        # Old transformers' GPT-2 mask buffers are dropped (parity/test_msclap.py loads files with
        # them and BERT's position ids); any other foreign or missing name is an error naming it.
        state["caption_encoder.base.h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
        state["caption_encoder.base.h.11.attn.masked_bias"] = torch.tensor(-1e4)
        state["audio_encoder.extra.weight"] = torch.zeros(1)
        del state["logit_scale"]
        named = r"do not fit msclap-2023 \(msclap's names\): 1 missing \(e.g. \['logit_scale'\]\), 1 unexpected"
        with pytest.raises(UsageError, match=named + r" \(e.g. \['audio_encoder.extra.weight'\]\)"):
            load_msclap(saved)


def test_other_models_are_refused_in_one_line(tmp_path):
    for name in ("tiny", "msclap-tiny"):
        with pytest.raises(UsageError, match="only the msclap-2022 and msclap-2023 models"):
            save_msclap(CLAP(PRESETS[name]), tmp_path / "out.pth")
    assert not (tmp_path / "out.pth").exists()
    with pytest.raises(UsageError, match="not a Microsoft CLAP weight file"):
        load_msclap({"model": {"x": torch.zeros(1)}})


def test_clap_train_trains_the_msclap_design(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    build_clap_shards(shards, clips=8, seconds=2.0, per_shard=4)
    pattern = f"{shards}/{{000000..000001}}.tar"
    out = tmp_path / "run"
    args = ["--train-data", pattern, "--model", "msclap-tiny", "--batch-size", "8", "--workers", "1",
            "--out", str(out), "--shuffle-buffer", "8", "--seed", "3", "--data-filling", "repeat"]
    assert clap_main.main([*args, "--val-data", pattern, "--epochs", "4", "--train-num-samples", "96",
                           "--lr", "3e-3", "--warmup", "4", "--log-every", "4"]) == 0
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    recall = [r["audio_to_text_R@1"] + r["text_to_audio_R@1"] for r in results]
    assert recall[-1] >= recall[0] + 0.5, recall  # it learns (0.625 -> 1.375 of 2 here; chance is 0.25)
    saved = read(out / "epoch_4.pt")
    assert "logit_scale_t" not in saved["state_dict"] and saved["config"]["projection"] == "msclap"
    assert load_model(out / "epoch_4.pt").cfg == PRESETS["msclap-tiny"]
    capsys.readouterr()
    assert clap_main.main([*args, "--epochs", "1", "--train-num-samples", "8", "--mlp-loss",
                           "--out", str(tmp_path / "mlp-loss")]) == 2  # a new run: `run` holds one
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "second logit scale" in err[0]


def test_clap_export_msclap_and_refusals(large_tmp_path, capsys):
    """clap-export writes Microsoft's layout from our checkpoint; HF and LAION cannot hold the model."""
    tmp_path = large_tmp_path
    from clap_model.checkpoint import save_atomic
    from clap_model.export import main

    torch.manual_seed(1)
    cfg = PRESETS["msclap-2023"]
    model = CLAP(cfg, pretrained_text=False)
    save_atomic({"config": cfg.to_dict(), "state_dict": model.state_dict(), "epoch": 1}, tmp_path / "run.pt")
    assert main(["--checkpoint", str(tmp_path / "run.pt"), "--format", "msclap",
                 "--out", str(tmp_path / "CLAP_weights_2023.pth")]) == 0
    back = load_model(tmp_path / "CLAP_weights_2023.pth")
    assert back.cfg == cfg
    assert all(torch.equal(value, back.state_dict()[key]) for key, value in model.state_dict().items())
    for fmt, message in (("hf", "RoBERTa text encoder"), ("laion", "LAION-CLAP's text encoders")):
        assert main(["--checkpoint", str(tmp_path / "run.pt"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / fmt).exists()
