"""CLAP model: shapes, masks, fusion inputs, mel features, LAION-CLAP checkpoint layout."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clap_model import checkpoint as ckpt
from clap_model.clap import CLAP
from clap_model.config import AudioConfig, ModelConfig, get_preset
from clap_model.features import FusionMel, mel_filterbank
from clap_model.htsat import HTSAT, shift_mask
from clap_model.text import Tokenize



pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny(**kw) -> ModelConfig:
    return replace(get_preset("tiny"), **kw)


def test_shapes_and_normalised_embeddings():
    torch.manual_seed(0)
    cfg = _tiny()
    model = CLAP(cfg).eval()
    tokens = Tokenize(cfg.text)(["a dog barks", "rain falls on a tin roof"])
    assert tokens["input_ids"].shape == (2, cfg.text.max_length)
    with torch.no_grad():
        audio = model.encode_audio(torch.randn(2, cfg.audio.clip_samples))
        text = model.encode_text(tokens)
    assert audio.shape == text.shape == (2, cfg.joint_dim)
    assert torch.allclose(audio.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_text_padding_is_masked():
    """A caption's embedding does not depend on the padding beside it in the batch."""
    torch.manual_seed(0)
    cfg = _tiny()
    model = CLAP(cfg).eval()
    tokenize = Tokenize(cfg.text)
    with torch.no_grad():
        alone = model.encode_text(tokenize(["a dog"]))
        batch = model.encode_text(tokenize(["a dog", "a much longer caption about a dog barking at night"]))
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    mask = tokenize(["a dog"])["attention_mask"][0]
    assert mask[:4].tolist() == [1, 1, 1, 1] and mask[-1] == 0  # <s> a␠dog... then padding


def test_shifted_window_mask_blocks_wrapped_regions():
    mask = shift_mask(resolution=8, window=4, shift=2)
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds one region only
    last = mask[-1]  # the bottom-right window mixes four regions after the cyclic shift
    assert torch.all(last.diagonal() == 0) and (last == -100).sum() > 0
    assert torch.equal(last, last.T)


def _audio_embedding(branch: HTSAT, waveform: torch.Tensor, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)  # the same SpecAugment stripes for both runs
    return branch(waveform)["embedding"]


def test_patch_matmul_matches_the_conv():
    """The patch embedding's matmul equals the stride == kernel Conv2d it replaces (whose weights
    LAION-CLAP's checkpoints hold)."""
    torch.manual_seed(0)
    embed = HTSAT(get_preset("tiny").audio).patch_embed
    image = torch.randn(2, 1, 64, 64)
    reference = embed.norm(embed.proj(image).flatten(2).transpose(1, 2))
    assert torch.allclose(embed(image), reference, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_features_match_eager(precision):
    """--compile's graph (captured by dynamo; the eager backend keeps this CPU test fast) gives the
    eager numbers and gradients, under autocast too, for several batch sizes without failing."""
    torch.manual_seed(0)
    branch = HTSAT(get_preset("tiny").audio).train()
    enabled = precision == "bf16"
    for batch in (2, 3):
        waveform = torch.randn(batch, branch.cfg.clip_samples)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            eager = _audio_embedding(branch, waveform)
        eager.float().sum().backward()
        eager_grad = branch.layers[0].blocks[1].attn.qkv.weight.grad.clone()
        branch.zero_grad(set_to_none=True)
        branch.compile_features(backend="eager")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            compiled = _audio_embedding(branch, waveform)
        compiled.float().sum().backward()
        branch._compiled_features = None
        compiled_grad = branch.layers[0].blocks[1].attn.qkv.weight.grad.clone()
        branch.zero_grad(set_to_none=True)
        assert compiled.dtype == eager.dtype
        assert torch.allclose(compiled.float(), eager.float(), atol=1e-5)
        assert torch.allclose(compiled_grad, eager_grad, atol=1e-5)


def test_compile_option_defaults():
    from clap_model.params import train_parser

    base = ["--train-data", "x.tar", "--out", "o"]
    assert train_parser().parse_args(base).compile is None  # resolved: on with CUDA, off on CPU
    assert train_parser().parse_args(base + ["--no-compile"]).compile is False
    assert train_parser().parse_args(base + ["--compile"]).compile is True
    assert train_parser().parse_args(base).workers >= 1


def test_mel_filterbanks():
    slaney = mel_filterbank(48_000, 1024, 64, 50, 14_000)
    htk = mel_filterbank(48_000, 1024, 64, 50, 14_000, "htk")
    assert slaney.shape == htk.shape == (513, 64)
    freqs = np.linspace(0, 24_000, 513)
    assert torch.all(slaney[freqs > 14_100] == 0) and torch.all(slaney[freqs < 49] == 0)
    peaks = htk.argmax(dim=0)
    assert torch.all(peaks[1:] >= peaks[:-1])  # centres rise with the band index
    # HTK: unit-height triangles (bands wide enough to hold several FFT bins peak near 1).
    assert torch.all(htk.max(dim=0).values[32:] > 0.8) and torch.all(htk <= 1.0)
    # Slaney area norm: each triangle (height 2/(f_hi - f_lo), base f_hi - f_lo) has area 1 in Hz.
    areas = (slaney * (24_000 / 512)).sum(dim=0)
    assert torch.allclose(areas[32:], torch.ones(32), rtol=0.05)


def test_spectrogram_fft_equals_torchlibrosa_convs():
    spectrogram = CLAP(_tiny()).eval().audio_branch.spectrogram_extractor
    wave = torch.randn(2, 96_000)
    assert spectrogram.is_dft()
    power = spectrogram(wave)[:, 0]
    real, imag = spectrogram.stft(wave)  # torchlibrosa's conv formulation with the same weights
    assert power.shape == (2, 96_000 // 768 + 1, 513)
    assert torch.allclose(power, (real**2 + imag**2).transpose(1, 2), rtol=1e-3, atol=1e-2)
    # Weights that are not a DFT (loaded through load_state_dict) are used as they are.
    state = spectrogram.state_dict()
    state["stft.conv_imag.weight"] = state["stft.conv_imag.weight"] * 0.5
    spectrogram.load_state_dict(state)
    assert not spectrogram.is_dft()
    real, imag = spectrogram.stft(wave)
    assert torch.allclose(spectrogram(wave)[:, 0], (real**2 + imag**2).transpose(1, 2))


# ---- fusion --------------------------------------------------------------------------------------


def _fusion() -> FusionMel:
    return FusionMel(48_000, 1024, 480, 64, 50, 14_000, clip_samples=480_000)


def test_fusion_short_and_exact_clips_repeat_one_mel():
    fusion = _fusion()
    wave = torch.randn(2, 480_000)
    mel, longer = fusion(wave, torch.tensor([480_000, 480_000]), torch.rand(2, 3))
    assert mel.shape == (2, 4, 1001, 64)
    assert not longer.any()
    for channel in range(1, 4):
        assert torch.equal(mel[:, channel], mel[:, 0])


def test_fusion_long_clip_global_view_and_crops():
    torch.manual_seed(0)
    fusion = _fusion()
    seconds = 25
    wave = torch.randn(1, 48_000 * seconds)
    full = fusion.mel(wave)[0]  # (2501, 64)
    total, chunk = full.shape[0], 1001
    ranges = np.array_split(np.arange(total - chunk + 1), 3)  # LAION-CLAP's front/middle/back ranges
    for u in (0.0, 0.999):
        mel, longer = fusion(wave, torch.tensor([wave.shape[1]]), torch.full((1, 3), u))
        assert longer.tolist() == [True]
        expect = [int(r[0] if u == 0 else r[-1]) for r in ranges]
        for channel, start in zip((1, 2, 3), expect):
            assert torch.allclose(mel[0, channel], full[start : start + chunk])
        # The global view is the whole clip resized to one chunk (bilinear, as torchvision's Resize).
        shrunk = torch.nn.functional.interpolate(full[None, None], size=(chunk, 64), mode="bilinear",
                                                 align_corners=False)[0, 0]
        assert torch.allclose(mel[0, 0], shrunk, atol=1e-3)


def test_fusion_batch_mixes_long_and_short_with_padding():
    fusion = _fusion()
    long = torch.randn(600_000)
    short = torch.randn(480_000)
    batch = torch.zeros(2, 600_000)
    batch[0], batch[1, :480_000] = long, short
    mel, longer = fusion(batch, torch.tensor([600_000, 480_000]), torch.full((2, 3), 0.5))
    assert longer.tolist() == [True, False]
    alone, _ = fusion(short[None], torch.tensor([480_000]), torch.full((1, 3), 0.5))
    # Every frame, the last ones too: their windows reach past the clip's end and see its own
    # reflection, as LAION-CLAP computes each clip's mel alone, not the batch's zero padding.
    assert torch.allclose(mel[1], alone[0], atol=1e-4, rtol=0)


def test_fusion_embedding_of_a_clip_ignores_what_shares_its_batch():
    """As LAION-CLAP, which computes each clip's mel alone: a 5 s clip batched beside a 20 s one
    (zero-padded to its length) gets the embedding it gets alone; so does a filled short clip."""
    torch.manual_seed(0)
    model = CLAP(get_preset("tiny-fusion")).eval()
    rate, clip = 48_000, get_preset("tiny-fusion").audio.clip_samples
    clips = [torch.randn(rate * 20) * 0.1, torch.randn(rate * 5) * 0.1, torch.randn(clip) * 0.1]
    batch = torch.zeros(len(clips), rate * 20)
    for row, wave in enumerate(clips):
        batch[row, : len(wave)] = wave
    lengths = torch.tensor([len(wave) for wave in clips])
    crop_u = torch.rand(len(clips), 3)
    with torch.no_grad():
        together = model.encode_audio(batch, lengths, crop_u)
        for row, wave in enumerate(clips):
            alone = model.encode_audio(wave[None], lengths[row : row + 1], crop_u[row : row + 1])
            assert torch.allclose(together[row], alone[0], atol=1e-6, rtol=0), (row, (together[row] - alone[0]).abs().max())


@pytest.mark.parametrize("name", ["tiny-fusion"])
def test_fusion_model_trains_on_short_exact_and_long(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = CLAP(cfg)
    clip = cfg.audio.clip_samples
    wave = torch.zeros(3, clip * 3)
    lengths = torch.tensor([clip // 2, clip, clip * 3])
    for row, length in enumerate(lengths):
        wave[row, :length] = torch.randn(int(length))
    batch = dict(Tokenize(cfg.text)(["short", "exact", "long"]), waveform=wave, length=lengths,
                 crop_u=torch.rand(3, 3))
    out = model(batch)
    assert out["audio"].shape == (3, cfg.joint_dim)
    out["audio"].sum().backward()
    fusion_grad = model.audio_branch.patch_embed.fusion_model.local_att[0].weight.grad
    assert fusion_grad is not None and fusion_grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        embedding = model.encode_audio(wave, lengths)
    assert torch.isfinite(embedding).all()


# ---- LAION-CLAP checkpoint layout ----------------------------------------------------------------
# The expected names and shapes below are written out from LAION-CLAP's model.py, htsat.py,
# pann_model.py, feature_fusion.py, torchlibrosa's stft.py and transformers' RoBERTa, not derived
# from our modules, so a renamed or reshaped parameter fails here.


def _bn(keys: dict, name: str, n: int) -> None:
    keys.update({f"{name}.weight": (n,), f"{name}.bias": (n,), f"{name}.running_mean": (n,),
                 f"{name}.running_var": (n,), f"{name}.num_batches_tracked": ()})


def _lin(keys: dict, name: str, n_out: int, n_in: int, bias: bool = True) -> None:
    keys[f"{name}.weight"] = (n_out, n_in)
    if bias:
        keys[f"{name}.bias"] = (n_out,)


def _ln(keys: dict, name: str, n: int) -> None:
    keys.update({f"{name}.weight": (n,), f"{name}.bias": (n,)})


def _aff(keys: dict, name: str, channels: int) -> None:
    inter = channels // 4
    for branch, offset in (("local_att", 0), ("global_att", 1)):
        keys[f"{name}.{branch}.{offset}.weight"] = (inter, channels, 1, 1)
        keys[f"{name}.{branch}.{offset}.bias"] = (inter,)
        _bn(keys, f"{name}.{branch}.{offset + 1}", inter)
        keys[f"{name}.{branch}.{offset + 3}.weight"] = (channels, inter, 1, 1)
        keys[f"{name}.{branch}.{offset + 3}.bias"] = (channels,)
        _bn(keys, f"{name}.{branch}.{offset + 4}", channels)


def _features(keys: dict, a: AudioConfig) -> None:
    bins = a.window_size // 2 + 1
    keys["audio_branch.spectrogram_extractor.stft.conv_real.weight"] = (bins, 1, a.window_size)
    keys["audio_branch.spectrogram_extractor.stft.conv_imag.weight"] = (bins, 1, a.window_size)
    keys["audio_branch.logmel_extractor.melW"] = (bins, a.mel_bins)
    _bn(keys, "audio_branch.bn0", a.mel_bins)


def laion_htsat_keys(a: AudioConfig, fusion: bool) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    _features(keys, a)
    p, e = "audio_branch.", a.embed_dim
    keys[p + "patch_embed.proj.weight"] = (e, 1, a.patch_size, a.patch_size)
    keys[p + "patch_embed.proj.bias"] = (e,)
    _ln(keys, p + "patch_embed.norm", e)
    if fusion:  # aff_2d
        keys[p + "patch_embed.mel_conv2d.weight"] = (e, 1, a.patch_size, a.patch_size * 3)
        keys[p + "patch_embed.mel_conv2d.bias"] = (e,)
        _aff(keys, p + "patch_embed.fusion_model", e)
    res = a.spec_size // a.patch_size
    for i, depth in enumerate(a.depths):
        dim, r = e * 2**i, res // 2**i
        w = min(a.window, r)
        for j in range(depth):
            b = f"{p}layers.{i}.blocks.{j}."
            _ln(keys, b + "norm1", dim)
            keys[b + "attn.relative_position_bias_table"] = ((2 * w - 1) ** 2, a.num_heads[i])
            keys[b + "attn.relative_position_index"] = (w * w, w * w)
            _lin(keys, b + "attn.qkv", 3 * dim, dim)
            _lin(keys, b + "attn.proj", dim, dim)
            _ln(keys, b + "norm2", dim)
            _lin(keys, b + "mlp.fc1", 4 * dim, dim)
            _lin(keys, b + "mlp.fc2", dim, 4 * dim)
            if j % 2 == 1 and r > a.window:
                keys[b + "attn_mask"] = ((r // w) ** 2, w * w, w * w)
        if i < len(a.depths) - 1:
            _lin(keys, f"{p}layers.{i}.downsample.reduction", 2 * dim, 4 * dim, bias=False)
            _ln(keys, f"{p}layers.{i}.downsample.norm", 4 * dim)
    nf = e * 2 ** (len(a.depths) - 1)
    _ln(keys, p + "norm", nf)
    sf = a.spec_size // 2 ** (len(a.depths) - 1) // a.patch_size // (a.spec_size // a.mel_bins)
    keys[p + "tscam_conv.weight"] = (a.class_num, nf, sf, 3)
    keys[p + "tscam_conv.bias"] = (a.class_num,)
    _lin(keys, p + "head", a.class_num, a.class_num)
    return keys


def laion_pann_keys(a: AudioConfig, fusion: bool) -> dict[str, tuple]:
    keys: dict[str, tuple] = {}
    _features(keys, a)
    widths = (1, 64, 128, 256, 512, 1024, 2048)
    for i in range(6):
        b = f"audio_branch.conv_block{i + 1}."
        keys[b + "conv1.weight"] = (widths[i + 1], widths[i], 3, 3)
        keys[b + "conv2.weight"] = (widths[i + 1], widths[i + 1], 3, 3)
        _bn(keys, b + "bn1", widths[i + 1])
        _bn(keys, b + "bn2", widths[i + 1])
    _lin(keys, "audio_branch.fc1", 2048, 2048)
    _lin(keys, "audio_branch.fc_audioset", a.class_num, 2048)
    if fusion:
        keys["audio_branch.mel_conv2d.0.weight"] = (64, 1, 5, 5)
        keys["audio_branch.mel_conv2d.0.bias"] = (64,)
        _bn(keys, "audio_branch.mel_conv2d.1", 64)
        _aff(keys, "audio_branch.fusion_model", 64)
    return keys


def laion_roberta_keys(t, vocab: int) -> dict[str, tuple]:
    h, p = t.hidden_size, "text_branch."
    keys = {p + "embeddings.word_embeddings.weight": (vocab, h),
            p + "embeddings.position_embeddings.weight": (t.max_length + 2, h),
            p + "embeddings.token_type_embeddings.weight": (2, h)}
    _ln(keys, p + "embeddings.LayerNorm", h)
    for i in range(t.layers):
        b = f"{p}encoder.layer.{i}."
        for name in ("query", "key", "value"):
            _lin(keys, b + f"attention.self.{name}", h, h)
        _lin(keys, b + "attention.output.dense", h, h)
        _ln(keys, b + "attention.output.LayerNorm", h)
        _lin(keys, b + "intermediate.dense", t.intermediate_size, h)
        _lin(keys, b + "output.dense", h, t.intermediate_size)
        _ln(keys, b + "output.LayerNorm", h)
    _lin(keys, p + "pooler.dense", h, h)
    return keys


def laion_clap_keys(cfg: ModelConfig) -> dict[str, tuple]:
    a, j = cfg.audio, cfg.joint_dim
    keys = (laion_htsat_keys if a.model_type == "HTSAT" else laion_pann_keys)(a, cfg.enable_fusion)
    keys.update(laion_roberta_keys(cfg.text, vocab=261))
    width = 2048 if a.model_type == "PANN" else a.embed_dim * 2 ** (len(a.depths) - 1)
    for side, n_in in (("audio", width), ("text", cfg.text.hidden_size)):
        _lin(keys, f"{side}_projection.0", j, n_in)
        _lin(keys, f"{side}_projection.2", j, j)
        _lin(keys, f"{side}_transform.sequential.0", j, j)
        _lin(keys, f"{side}_transform.sequential.3", j, j)
    keys["logit_scale_a"] = ()
    keys["logit_scale_t"] = ()
    return keys


_POOLER_TEXT = replace(get_preset("tiny").text, pooling="pooler")


@pytest.mark.parametrize("cfg", [
    _tiny(text=_POOLER_TEXT),
    _tiny(text=_POOLER_TEXT, enable_fusion=True),
    replace(get_preset("htsat-tiny-roberta-fusion"), text=_POOLER_TEXT),  # LAION's real HTSAT-tiny geometry
    replace(get_preset("htsat-base-roberta"), text=_POOLER_TEXT),
    replace(get_preset("pann14-roberta-fusion"), text=_POOLER_TEXT),
], ids=["tiny", "tiny-fusion", "htsat-tiny-fusion", "htsat-base", "pann14-fusion"])
def test_laion_layout_loads_strict(cfg):
    expected = laion_clap_keys(cfg)
    with torch.device("meta"):
        model = CLAP(cfg)
    state = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    # As released: saved from DDP ('module.' prefix) by a transformers that kept position_ids.
    released = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 45}
    released["state_dict"]["module.text_branch.embeddings.position_ids"] = torch.empty(1, 50, device="meta")
    cleaned = ckpt.clean_state_dict(released)
    result = model.load_state_dict(cleaned, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_laion_checkpoint_file_round_trip(tmp_path):
    """A real file in LAION-CLAP's layout loads with values, and a mismatched one says why."""
    torch.manual_seed(0)
    cfg = _tiny(text=_POOLER_TEXT)
    source = CLAP(cfg).eval()
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    assert set(k[len("module."):] for k in state) == set(laion_clap_keys(cfg))
    path = tmp_path / "laion.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    with pytest.raises(ckpt.CheckpointError, match="pass --model"):
        ckpt.load_model(path)
    target = CLAP(cfg).eval()
    ckpt.load_weights(target, ckpt.read(path))
    wave = torch.randn(1, cfg.audio.clip_samples)
    with torch.no_grad():
        assert torch.allclose(source.encode_audio(wave), target.encode_audio(wave), atol=1e-6)
    wrong = CLAP(_tiny(text=_POOLER_TEXT, enable_fusion=True))
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        ckpt.load_weights(wrong, ckpt.read(path))


def test_checkpoint_files_that_cannot_load_say_why(tmp_path):
    import argparse

    model = CLAP(_tiny(text=_POOLER_TEXT))
    optimizer = torch.optim.AdamW(model.parameters())
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()  # an optimizer state with moments and step counts, as a real run saves
    # As LAION-CLAP's training saved them (zip) and as torch < 1.6 did (a bare pickle): both load.
    for name, zipped in (("new.pt", True), ("legacy.pt", False)):
        torch.save({"epoch": 1, "name": "run", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()},
                   tmp_path / name, _use_new_zipfile_serialization=zipped)
        assert set(ckpt.read(tmp_path / name)) == {"epoch", "name", "state_dict", "optimizer"}
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="is not a PyTorch checkpoint"):
        ckpt.read(tmp_path / "notes.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "new.pt").read_bytes()[:5000])
    with pytest.raises(ckpt.CheckpointError, match="truncated or damaged"):
        ckpt.read(tmp_path / "cut.pt")
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "objects.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"besides tensors and plain data \(the first: argparse.Namespace\); refused"):
        ckpt.read(tmp_path / "objects.pt")


@pytest.mark.parametrize("fusion", [False, True])
def test_pann_cnn14_forward(fusion):
    torch.manual_seed(0)
    base = get_preset("pann14-roberta-fusion" if fusion else "pann14-roberta")
    cfg = replace(base, audio=replace(base.audio, clip_samples=48_000), text=_tiny().text)  # 1 s clips
    model = CLAP(cfg)
    lengths = torch.tensor([24_000, 48_000, 150_000])
    wave = torch.zeros(3, 150_000)
    for row, length in enumerate(lengths):
        wave[row, :length] = torch.randn(int(length)) * 0.1
    if not fusion:
        wave, lengths = wave[:, :48_000], None
    with torch.no_grad():
        train_emb = model.train().encode_audio(wave, lengths, torch.rand(3, 3))
        eval_emb = model.eval().encode_audio(wave, lengths)
    assert train_emb.shape == eval_emb.shape == (3, cfg.joint_dim)
    assert torch.isfinite(eval_emb).all() and not torch.allclose(eval_emb[0], eval_emb[2])


def test_zeroshot_ties_count_against_the_true_class():
    from clap_model.metrics import zeroshot_metrics

    # A collapsed model: every class prompt embeds the same, so every class ties.
    audio, class_text = torch.ones(4, 8), torch.ones(3, 8)
    metrics = zeroshot_metrics(audio, class_text, torch.tensor([0, 0, 1, 2]))
    assert metrics["zeroshot_top1"] == 0.0 and metrics["zeroshot_top5"] == 1.0
    assert metrics["zeroshot_mAP"] == pytest.approx(1 / 3)


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_retrieval_metrics_one_caption_per_clip():
    from clap_model.metrics import retrieval_metrics

    audio = _unit([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    # Text 0 and 2 sit on their clips; text 1 is nearer clip 2 (rank 1) than its own clip 1.
    text = _unit([[1, 0, 0], [0, 0.6, 0.8], [0, 0, 1]])
    m = retrieval_metrics(audio, text)
    # audio->text: every clip scores its own text highest (clip 1: text 1 at 0.6, the others 0).
    assert m["audio_to_text_R@1"] == 1.0 and m["audio_to_text_mAP@10"] == 1.0
    # text->audio: text 1 scores clip 2 (0.8) above clip 1 (0.6): rank 1.
    assert m["text_to_audio_R@1"] == pytest.approx(2 / 3) and m["text_to_audio_R@5"] == 1.0
    assert m["text_to_audio_mAP@10"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["text_to_audio_mean_rank"] == pytest.approx(4 / 3)


def test_retrieval_metrics_several_captions_per_clip_as_laion_clap():
    from clap_model.metrics import retrieval_metrics

    audio = _unit([[1, 0, 0, 0], [0, 1, 0, 0]])
    # Clip 0 has three captions, clip 1 two. Scores against clip 0: t0 0.9, t3 0.8, t1 0.5, t4 0.3, t2 0.
    text = _unit([[0.9, 0.1, 0.2, 0.1], [0.5, 0.1, 0.8, 0], [0, 0.2, 1, 0], [0.8, 0.9, 0.1, 0],
                  [0.3, 0.95, 0, 0]])
    owner = torch.tensor([0, 0, 0, 1, 1])
    logits = audio @ text.T
    m = retrieval_metrics(audio, text, owner)
    # audio->text, by hand from the logits: the ranks of each clip's own captions, sorted.
    ranks = {clip: sorted(int((logits[clip] > logits[clip, j]).sum()) for j in range(5) if owner[j] == clip)
             for clip in (0, 1)}
    best = [r[0] for r in ranks.values()]
    assert m["audio_to_text_R@1"] == sum(b < 1 for b in best) / 2
    ap = [sum((i + 1) / (r + 1) for i, r in enumerate(rs) if r < 10) / len(rs) for rs in ranks.values()]
    assert m["audio_to_text_mAP@10"] == pytest.approx(sum(ap) / 2)
    # text->audio: every caption ranks the clips; its own clip's rank counts.
    t2a = [int((logits[:, j] > logits[owner[j], j]).sum()) for j in range(5)]
    assert m["text_to_audio_R@1"] == pytest.approx(sum(r < 1 for r in t2a) / 5)
    assert m["text_to_audio_mean_rank"] == pytest.approx(sum(t2a) / 5 + 1)
    assert m["text_to_audio_R@1"] < 1.0 and m["audio_to_text_mAP@10"] < 1.0  # the example is not trivial


def test_inference_arrays_in_either_layout_integer_pcm_and_empty_inputs():
    from clap_model.inference import CLAPInference

    torch.manual_seed(0)
    clap = CLAPInference(CLAP(get_preset("tiny")), device="cpu")
    rate = clap.spec.sample_rate
    wave = (0.3 * np.sin(np.linspace(0, 2000, rate)) * np.hanning(rate)).astype(np.float32)
    stereo = np.stack([wave, 0.5 * wave])
    reference = clap.embed_audio([stereo.mean(axis=0)], sample_rate=rate)
    # (channels, samples) as torchaudio, (samples, channels) as soundfile.read: the same clip.
    for layout in (stereo, stereo.T, torch.from_numpy(stereo.T.copy())):
        assert torch.allclose(clap.embed_audio([layout], sample_rate=rate), reference, atol=1e-5)
    pcm = np.round(wave * 32768).astype(np.int16)  # integer PCM is scaled like the shards' FLAC
    as_float = clap.embed_audio([pcm.astype(np.float32) / 32768], sample_rate=rate)
    assert torch.allclose(clap.embed_audio([pcm], sample_rate=rate), as_float, atol=1e-6)
    assert clap.embed_audio([]).shape == clap.embed_text([]).shape == (0, clap.model.cfg.joint_dim)
