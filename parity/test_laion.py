"""Parity with LAION-CLAP 1.1.7 itself: its own model (CLAP_Module, create_model) with random
weights, saved as its training saves, loads in ours and computes the same mel and embeddings on the
same real audio through each side's own front end and the same token ids; our `--format laion`
export loads in its `load_ckpt` and computes the same, also after a trip through `--format hf`,
where transformers' ClapModel computes LAION-CLAP's embeddings too."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import RobertaConfig, RobertaModel

from conftest import ATOL, CAPTIONS, MEL_DB, RATE, perturb
from test_hf import hf_embeddings

from clap_model import checkpoint as ckpt
from clap_model import hf_format
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
    # Without fusion the same weights gave LAION-CLAP's embeddings to 4e-7 when first checked by
    # hand (measured here: 5e-8); fusion's shrunk and cropped mels leave more (3e-5 for HTSAT).
    assert (ours.embed_audio(clips, sample_rate=RATE) - audio).abs().max() < (ATOL if fusion else 4e-7)
    assert (ours.embed_text(CAPTIONS) - text).abs().max() < ATOL

    model = ours.model
    if amodel.startswith("HTSAT"):  # the release as a Hugging Face folder: transformers 4 computes LAION-CLAP's
        hf_format.save_hf(model, tmp_path / "hf")
        _, _, hf_audio, hf_text = hf_embeddings(tmp_path / "hf", clips, 77)
        assert (hf_audio - audio).abs().max() < ATOL and (hf_text - text).abs().max() < ATOL
        model = hf_format.load_hf(str(tmp_path / "hf"))  # and on to LAION-CLAP's format from there
    # Our export, read by LAION-CLAP's own load_ckpt into its model, its weights first scrambled.
    save_laion(model, tmp_path / "export.pt")
    perturb(theirs.model, seed=2)
    theirs.load_ckpt(str(tmp_path / "export.pt"), verbose=False)
    again_audio, again_text = embeddings(theirs, clips)
    assert (again_audio - audio).abs().max() < 1e-6 and (again_text - text).abs().max() < 1e-6


def _soundfile_load(path: str) -> tuple[torch.Tensor, int]:
    """torchaudio.load's result, (channels, frames) float32 in [-1, 1), and the rate. torchaudio >= 2.9
    loads through torchcodec, whose C++ parts do not load here; libsndfile decodes 16-bit FLAC to
    the same numbers."""
    import soundfile

    samples, rate = soundfile.read(path, dtype="float32", always_2d=True)
    return torch.from_numpy(samples.T.copy()), rate


def _torch_audio(key: str, data: bytes):
    """webdataset's torch_audio decoder with _soundfile_load for torchaudio.load."""
    import os
    import re
    import tempfile

    extension = re.sub(r".*[.]", "", key)
    if extension not in ("flac", "mp3", "sox", "wav", "m4a", "ogg", "wma"):
        return None
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"file.{extension}")
        Path(path).write_bytes(data)
        return _soundfile_load(path)


def _our_samples(split: Path) -> dict[str, dict]:
    """key -> {'meta': the sample JSON, 'pcm': int16 samples}, read with the standard library."""
    import io
    import json
    import tarfile

    import numpy as np
    import soundfile

    samples: dict[str, dict] = {}
    for shard in sorted(split.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = samples.setdefault(key, {})
                if ext == "json":
                    entry["meta"] = json.loads(data)
                else:
                    entry["pcm"] = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)[0].mean(axis=1)
    assert all(set(entry) == {"meta", "pcm"} for entry in samples.values())
    return {key: {**entry, "pcm": np.asarray(entry["pcm"])} for key, entry in samples.items()}


@pytest.mark.parametrize("truncating", ["rand_trunc", "fusion"])
def test_our_shards_load_in_laion_clap_webdataset_loader(truncating, monkeypatch, crops_like_ours):
    """A build of the bundled clips (parity/run.sh makes it) through LAION-CLAP's own get_wds_dataset:
    every sample once, every field it reads (audio, captions, tags, sizes.json) as written."""
    import os

    import numpy as np

    shards = Path(os.environ.get("PARITY_SHARDS", ""))
    if not (shards / "stats.json").is_file():
        pytest.skip("PARITY_SHARDS names no audiodata build (parity/run.sh makes one)")
    monkeypatch.setattr(laion_data.wds, "torch_audio", _torch_audio)
    audio_cfg = hook.create_model.__globals__["_MODEL_CONFIGS"]["HTSAT-tiny"]["audio_cfg"]
    splits = [split for split in sorted(shards.iterdir()) if (split / "sizes.json").is_file()]
    assert splits
    for split in splits:
        ours = _our_samples(split)
        tags = sorted({tag for entry in ours.values() for tag in entry["meta"]["tag"]})
        args = SimpleNamespace(
            remotedata=False, val_data=[str(p) for p in sorted(split.glob("*.tar"))], train_data=None,
            parallel_eval=False, batch_size=3, workers=1, prefetch_factor=None, horovod=False, seed=0, world_size=1,
            val_num_samples=None, class_index_dict={tag: i for i, tag in enumerate(tags)} or None,
            data_filling="repeatpad", data_truncating=truncating, text_augment_selection=None, tmodel="roberta")
        loader = laion_data.get_wds_dataset(args, {"audio_cfg": audio_cfg}, is_train=False).dataloader
        assert loader.num_samples == len(ours)  # from our sizes.json
        seen = []
        for batch in loader:
            for row, key in enumerate(batch["__key__"]):
                seen.append(key)
                meta, pcm = ours[key]["meta"], ours[key]["pcm"]
                assert batch["full_text"][row] == meta["text"]
                raw = batch["raw_text"][row]  # one caption of several, or the list of one
                assert raw == meta["text"] if len(meta["text"]) == 1 else raw in meta["text"]
                caption = raw if isinstance(raw, str) else raw[0]
                ids = byte_tokenizer()(caption, padding="max_length", truncation=True, max_length=77,
                                       return_tensors="pt")["input_ids"][0]
                assert torch.equal(batch["text"]["input_ids"][row], ids)
                assert batch["audio_name"][row] == f"{key}.flac" and batch["text_name"][row] == f"{key}.json"
                assert batch["audio_orig_sr"][row] == meta["sample_rate"] == 48_000
                if args.class_index_dict:
                    hot = [tags[i] for i in np.flatnonzero(batch["class_label"][row].numpy())]
                    assert hot == sorted(set(meta["tag"]))
                clip = audio_cfg["clip_samples"]
                expected = pcm[:clip] / 32768.0  # their loader's start crop (crops_like_ours), or repeatpad
                if len(pcm) < clip:
                    expected = np.pad(np.tile(expected, clip // len(pcm)), (0, clip - clip // len(pcm) * len(pcm)))
                assert np.abs(batch["waveform"][row].numpy() - expected).max() < 2 / 32767  # their int16 round trip
                assert bool(batch["longer"][row]) == (len(pcm) > clip)
        assert sorted(seen) == sorted(ours)  # every sample exactly once
