"""Parity with LAION-CLAP 1.1.7 itself: its own model (CLAP_Module, create_model) with random
weights, saved as its training saves, loads in ours and computes the same mel and embeddings on the
same real audio through each side's own front end and the same token ids; our `--format laion`
export loads in its `load_ckpt` and computes the same."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from conftest import ATOL, CAPTIONS, MEL_DB, RATE, perturb

from clap_model import checkpoint as ckpt
from clap_model.data import crop_or_fill
from clap_model.export import save_laion
from clap_model.inference import CLAPInference
from clap_model.text import SPECIALS, byte_tokenizer


def _import_laion_clap():
    """laion_clap.training.data loads BERT's, RoBERTa's and BART's tokenizers from the hub as it is
    imported. No hub here: they are the byte-level tokenizer while it imports (its roberta_tokenizer,
    which its webdataset loader tokenizes with, stays that)."""
    import transformers

    with pytest.MonkeyPatch.context() as patch:
        for cls in (transformers.BertTokenizer, transformers.RobertaTokenizer, transformers.BartTokenizer):
            patch.setattr(cls, "from_pretrained", classmethod(lambda cls, *args, **kwargs: byte_tokenizer()))
        import laion_clap  # puts its clap_module on sys.path, as its own code expects
        from laion_clap import hook
        from laion_clap.training import data
    return hook, data


hook, laion_data = _import_laion_clap()
get_audio_features = laion_data.get_audio_features

# Our preset -> LAION-CLAP's audio model name and fusion (CLAP_Module fuses with aff_2d).
CASES = {
    "htsat-tiny-roberta": ("HTSAT-tiny", False),
    "htsat-base-roberta": ("HTSAT-base", False),
    "pann14-roberta": ("PANN-14", False),
    "htsat-tiny-roberta-fusion": ("HTSAT-tiny", True),
    "pann14-roberta-fusion": ("PANN-14", True),
}
# LAION-CLAP's text projection takes 768 features; one layer keeps the tower small. Vocabulary:
# the byte-level tokenizer's (no hub), captions of LAION-CLAP's 77 tokens.
TEXT = RobertaConfig(vocab_size=len(SPECIALS) + 256, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                     intermediate_size=1024, max_position_embeddings=77 + 2, type_vocab_size=1,
                     layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory) -> Path:
    """The text tower's config and tokenizer as a local folder: our `--text-model`."""
    folder = tmp_path_factory.mktemp("text")
    TEXT.save_pretrained(folder)
    tokenizer = byte_tokenizer()
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return folder


def reference(monkeypatch, amodel: str, fusion: bool, seed: int) -> hook.CLAP_Module:
    """LAION-CLAP's CLAP_Module with random, perturbed weights; its text tower and tokenizer (which
    it takes from the hub) built from TEXT and the byte-level tokenizer instead."""
    laion_model = sys.modules["clap_module.model"]  # the module CLAP_Module's create_model builds from
    monkeypatch.setattr(laion_model, "RobertaModel", SimpleNamespace(from_pretrained=lambda name: RobertaModel(TEXT)))
    monkeypatch.setattr(hook, "RobertaTokenizer", SimpleNamespace(from_pretrained=lambda name: byte_tokenizer()))
    torch.manual_seed(seed)
    module = hook.CLAP_Module(enable_fusion=fusion, device="cpu", amodel=amodel, tmodel="roberta")
    perturb(module.model, seed)
    return module.eval()


def save_as_laion_training(module: hook.CLAP_Module, path: Path) -> None:
    """As LAION-CLAP's training loop saves: DDP's 'module.' names, epoch and optimizer state."""
    model = module.model
    optimizer = torch.optim.AdamW(model.parameters())
    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    torch.save({"epoch": 3, "optimizer": optimizer.state_dict(), "state_dict": state}, path)


def their_mel(module: hook.CLAP_Module, clip, fusion: bool) -> tuple[torch.Tensor, bool]:
    """LAION-CLAP's own front end: get_audio_features, then the model's extractors (non-fusion)."""
    sample = get_audio_features({}, torch.from_numpy(clip), module.model_cfg["audio_cfg"]["clip_samples"],
                                "fusion" if fusion else "rand_trunc", "repeatpad", module.model_cfg["audio_cfg"])
    if fusion:
        return sample["mel_fusion"], bool(sample["longer"])
    branch = module.model.audio_branch
    return branch.logmel_extractor(branch.spectrogram_extractor(sample["waveform"][None]))[0], False


def our_front_end(branch: torch.nn.Module, wave: torch.Tensor, crop_u: list[float]) -> tuple[torch.Tensor, bool]:
    """Our mel (HTSAT and CNN14 share the front end's modules), and fusion's `longer`."""
    if getattr(branch, "fusion_mel", None) is not None:
        mel, longer = branch.fusion_mel(wave, torch.tensor([wave.shape[1]]), torch.tensor([crop_u]))
        return mel, bool(longer[0])
    return branch.logmel_extractor(branch.spectrogram_extractor(wave)), False


def embeddings(module: hook.CLAP_Module, clips) -> tuple[torch.Tensor, torch.Tensor]:
    audio = module.get_audio_embedding_from_data([torch.from_numpy(c) for c in clips], use_tensor=True)
    return audio, module.get_text_embedding(CAPTIONS, use_tensor=True)


@pytest.mark.parametrize("preset", list(CASES))
@torch.no_grad()
def test_laion_clap_model_loads_in_ours_and_back(preset, clips, text_folder, tmp_path, monkeypatch,
                                                 crops_like_ours):
    amodel, fusion = CASES[preset]
    theirs = reference(monkeypatch, amodel, fusion, seed=1)
    save_as_laion_training(theirs, tmp_path / "laion.pt")
    ours = CLAPInference(ckpt.load_model(tmp_path / "laion.pt", preset, str(text_folder)), device="cpu")

    for clip in clips:
        mel, longer = their_mel(theirs, clip, fusion)
        wave, our_longer, crop_u = crop_or_fill(clip, ours.spec, None)
        our_mel, fused = our_front_end(ours.model.audio_branch, torch.from_numpy(wave)[None], crop_u)
        assert (our_mel[0] - mel).abs().max() < MEL_DB
        assert longer == our_longer == fused  # fusion: the same `longer`

    assert torch.equal(theirs.tokenizer(CAPTIONS)["input_ids"], ours.tokenize(CAPTIONS)["input_ids"])
    audio, text = embeddings(theirs, clips)
    assert (ours.embed_audio(clips, sample_rate=RATE) - audio).abs().max() < ATOL
    assert (ours.embed_text(CAPTIONS) - text).abs().max() < ATOL

    # Our export, read by LAION-CLAP's own load_ckpt into a fresh (differently seeded) model.
    save_laion(ours.model, tmp_path / "export.pt")
    again = reference(monkeypatch, amodel, fusion, seed=2)
    again.load_ckpt(str(tmp_path / "export.pt"), verbose=False)
    again_audio, again_text = embeddings(again, clips)
    assert (again_audio - audio).abs().max() < 1e-6 and (again_text - text).abs().max() < 1e-6
