"""Hugging Face `transformers.ClapModel` folders (or hub ids) in and out.

HF's ClapModel is LAION-CLAP's HTSAT + RoBERTa under other names: `RENAMES` maps ours to theirs,
one table read in both directions. HF keeps the waveform -> log-mel front end outside the model,
in its `ClapFeatureExtractor` (preprocessor_config.json), so `save_hf` writes one configured as our
front end is (fmin, fmax, hop, window, clip length, HTK mels and fusion crops for fusion models,
Slaney mels otherwise). What HF's classes cannot express (PANN audio, non-AFF fusion, a BERT or
mean-pooled text tower, Microsoft CLAP models) is refused in one line.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from clap_model.clap import CLAP
from clap_model.config import AudioConfig, ModelConfig, TextConfig, UsageError
from clap_model.inputs import is_hub_id

# (ours, theirs): `{name}` placeholders match the same text on both sides. Several names on HF's
# side split our tensor along dim 0 in that order (HTSAT's fused qkv -> query, key, value).
# The first rule that matches a name wins.
RENAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("logit_scale_{s}", ("logit_scale_{s}",)),
    ("audio_branch.bn0.{p}", ("audio_model.audio_encoder.batch_norm.{p}",)),
    ("audio_branch.patch_embed.{p}", ("audio_model.audio_encoder.patch_embed.{p}",)),
    ("audio_branch.layers.{i}.blocks.{j}.norm1.{p}", ("audio_model.audio_encoder.layers.{i}.blocks.{j}.layernorm_before.{p}",)),
    ("audio_branch.layers.{i}.blocks.{j}.norm2.{p}", ("audio_model.audio_encoder.layers.{i}.blocks.{j}.layernorm_after.{p}",)),
    ("audio_branch.layers.{i}.blocks.{j}.attn.relative_position_{p}",
     ("audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.self.relative_position_{p}",)),
    ("audio_branch.layers.{i}.blocks.{j}.attn.qkv.{p}",
     tuple(f"audio_model.audio_encoder.layers.{{i}}.blocks.{{j}}.attention.self.{part}.{{p}}"
           for part in ("query", "key", "value"))),
    ("audio_branch.layers.{i}.blocks.{j}.attn.proj.{p}", ("audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.output.dense.{p}",)),
    ("audio_branch.layers.{i}.blocks.{j}.mlp.fc1.{p}", ("audio_model.audio_encoder.layers.{i}.blocks.{j}.intermediate.dense.{p}",)),
    ("audio_branch.layers.{i}.blocks.{j}.mlp.fc2.{p}", ("audio_model.audio_encoder.layers.{i}.blocks.{j}.output.dense.{p}",)),
    ("audio_branch.layers.{i}.downsample.{p}", ("audio_model.audio_encoder.layers.{i}.downsample.{p}",)),
    ("audio_branch.norm.{p}", ("audio_model.audio_encoder.norm.{p}",)),
    ("text_branch.{p}", ("text_model.{p}",)),
    ("{side}_projection.0.{p}", ("{side}_projection.linear1.{p}",)),
    ("{side}_projection.2.{p}", ("{side}_projection.linear2.{p}",)),
)
# Held by one side only. Ours: the mel front end (HF's feature extractor computes it, from the
# config), the AudioSet tagging head, the MLP-loss transforms and the shift masks; a model loaded
# from HF gets them freshly built. HF's: buffers its text embeddings rebuild themselves.
OURS_ONLY = re.compile(r"audio_branch\.(spectrogram_extractor|logmel_extractor|tscam_conv|head)\..*"
                       r"|(audio|text)_transform\..*|audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask")
HF_ONLY = re.compile(r"text_model\.embeddings\.(position_ids|token_type_ids)")

_PLACEHOLDERS = {"p": r"[\w.]+", "i": r"\d+", "j": r"\d+", "s": r"[at]", "side": r"audio|text"}
# Our text tower's transformers config fields that HF's ClapTextConfig holds under the same names.
_TEXT_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")
LAION_CONTEXT = 77  # LAION-CLAP's caption length in tokens


def _regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    pattern = "".join(re.escape(part) if n % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})"
                      for n, part in enumerate(parts))
    return re.compile(pattern)


@dataclass(frozen=True)
class _Rule:
    ours: str
    theirs: tuple[str, ...]

    @cached_property
    def ours_re(self) -> re.Pattern[str]:
        return _regex(self.ours)

    @cached_property
    def theirs_re(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_regex(t) for t in self.theirs)


_RULES = tuple(_Rule(ours, theirs) for ours, theirs in RENAMES)


def to_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> HF ClapModel names (what HF does not hold is left out)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if OURS_ONLY.fullmatch(key):
            continue
        rule, found = next(((r, m) for r in _RULES if (m := r.ours_re.fullmatch(key))), (None, None))
        if rule is None:
            raise UsageError(f"weight {key} has no place in Hugging Face's ClapModel")
        pieces = tensor.chunk(len(rule.theirs)) if len(rule.theirs) > 1 else (tensor,)
        for name, part in zip(rule.theirs, pieces):
            out[name.format(**found.groupdict())] = part.clone()
    return out


def from_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ClapModel names -> ours; split tensors are joined back."""
    parts: dict[str, dict[int, torch.Tensor]] = {}
    count: dict[str, int] = {}
    for key, tensor in state.items():
        if HF_ONLY.fullmatch(key):
            continue
        hit = next(((r, n, m) for r in _RULES for n, pattern in enumerate(r.theirs_re)
                    if (m := pattern.fullmatch(key))), None)
        if hit is None:
            raise UsageError(f"Hugging Face weight {key} has no place in our model")
        rule, index, found = hit
        name = rule.ours.format(**found.groupdict())
        parts.setdefault(name, {})[index] = tensor
        count[name] = len(rule.theirs)
    incomplete = [name for name, got in parts.items() if len(got) != count[name]]
    if incomplete:
        raise UsageError(f"Hugging Face weights miss part of {incomplete[0]}")
    return {name: torch.cat([got[i] for i in range(count[name])]) if count[name] > 1 else got[0]
            for name, got in parts.items()}


# ---- configs -----------------------------------------------------------------------------------


def check_exportable(model: CLAP) -> None:
    """One line on the first thing HF's ClapModel / ClapFeatureExtractor cannot express."""
    if not isinstance(model, CLAP):
        raise UsageError(f"Hugging Face's ClapModel cannot hold a {type(model).__name__} model")
    cfg, audio = model.cfg, model.cfg.audio
    text_type = getattr(getattr(model.text_branch, "config", None), "model_type", None)
    if audio.model_type != "HTSAT":
        raise UsageError(f"Hugging Face's ClapModel has only an HTSAT audio encoder, not {audio.model_type}-"
                         f"{audio.model_name}: this model cannot be exported to --format hf")
    if text_type != "roberta":
        raise UsageError(f"Hugging Face's ClapModel has a RoBERTa text encoder, not {text_type or 'this one'} "
                         "(Microsoft CLAP and BERT models cannot be exported to --format hf)")
    if cfg.text.pooling != "pooler":
        raise UsageError(f"Hugging Face's ClapModel pools text with RoBERTa's pooler, this model with "
                         f"{cfg.text.pooling!r}: it cannot be exported to --format hf")
    if cfg.enable_fusion and cfg.fusion_type != "aff_2d":
        raise UsageError(f"Hugging Face's ClapModel fuses with AFF (aff_2d) only, not {cfg.fusion_type}: "
                         "this model cannot be exported to --format hf")
    if cfg.enable_fusion and audio.mel_bins != 64:
        raise UsageError(f"Hugging Face's ClapFeatureExtractor builds fusion inputs of 64 mel bins, this model "
                         f"takes {audio.mel_bins}: it cannot be exported to --format hf")
    if audio.clip_samples % audio.sample_rate:
        raise UsageError(f"Hugging Face's ClapFeatureExtractor takes clips of whole seconds, this model "
                         f"{audio.clip_samples} samples at {audio.sample_rate} Hz: it cannot be exported")


def hf_config(model: CLAP):
    """The `transformers.ClapConfig` of our model."""
    from transformers import ClapConfig

    cfg, audio = model.cfg, model.cfg.audio
    text = model.text_branch.config
    audio_config = dict(
        window_size=audio.window, num_mel_bins=audio.mel_bins, spec_size=audio.spec_size,
        patch_size=audio.patch_size, patch_stride=[audio.patch_size, audio.patch_size],
        num_classes=audio.class_num, hidden_size=audio.width, depths=list(audio.depths),
        num_attention_heads=list(audio.num_heads), num_hidden_layers=len(audio.depths),
        enable_fusion=cfg.enable_fusion, fusion_type=cfg.fusion_type if cfg.enable_fusion else None,
        patch_embeds_hidden_size=audio.embed_dim, drop_path_rate=audio.drop_path_rate)
    text_config = {name: getattr(text, name) for name in _TEXT_FIELDS}
    return ClapConfig(text_config=text_config, audio_config=audio_config, projection_dim=cfg.joint_dim,
                      projection_hidden_act=cfg.mlp_act)


def feature_extractor(cfg: ModelConfig):
    """HF's feature extractor computing our front end's mel: the same filters, clip and fusion crops."""
    from transformers import ClapFeatureExtractor

    audio = cfg.audio
    return ClapFeatureExtractor(
        feature_size=audio.mel_bins, sampling_rate=audio.sample_rate, hop_length=audio.hop_size,
        max_length_s=audio.clip_samples // audio.sample_rate, fft_window_size=audio.window_size,
        frequency_min=audio.fmin, frequency_max=audio.fmax, top_db=None,
        truncation="fusion" if cfg.enable_fusion else "rand_trunc", padding="repeatpad")


def config_from_hf(config: Any, extractor: Any, name_or_path: str) -> ModelConfig:
    """Our ModelConfig of an HF ClapConfig and its feature extractor; refuses what ours cannot run."""
    audio, text = config.audio_config, config.text_config
    patch = audio.patch_size if isinstance(audio.patch_size, int) else audio.patch_size[0]
    stride = list(audio.patch_stride) if not isinstance(audio.patch_stride, int) else [audio.patch_stride] * 2
    unsupported = {"patch_stride": stride != [patch, patch], "qkv_bias": not audio.qkv_bias,
                   "mlp_ratio": audio.mlp_ratio != 4.0, "hidden_act": audio.hidden_act != "gelu",
                   "layer_norm_eps": audio.layer_norm_eps != 1e-5, "aff_block_r": audio.aff_block_r != 4,
                   "enable_patch_layer_norm": not audio.enable_patch_layer_norm,
                   "fusion_type": audio.enable_fusion and audio.fusion_type not in (None, "aff_2d")}
    odd = [name for name, bad in unsupported.items() if bad]
    if odd:
        raise UsageError(f"{name_or_path}: an HTSAT with this {odd[0]} is not one our model builds")
    embed = audio.patch_embeds_hidden_size
    audio_cfg = AudioConfig(
        model_type="HTSAT", model_name="base" if embed == 128 else "tiny",  # a label only
        sample_rate=extractor.sampling_rate, clip_samples=int(extractor.nb_max_samples),
        window_size=extractor.fft_window_size, hop_size=extractor.hop_length, mel_bins=audio.num_mel_bins,
        fmin=extractor.frequency_min, fmax=extractor.frequency_max, class_num=audio.num_classes,
        spec_size=audio.spec_size, patch_size=patch, embed_dim=embed, depths=tuple(audio.depths),
        num_heads=tuple(audio.num_attention_heads), window=audio.window_size,
        drop_path_rate=float(audio.drop_path_rate))
    # The text tower is built from this folder's config (text.build_text_model, model_type "clap");
    # captions as long as LAION-CLAP's, or as the tower's positions allow.
    text_cfg = TextConfig(name_or_path=name_or_path, model_type="clap",
                          max_length=min(LAION_CONTEXT, text.max_position_embeddings - 2),
                          hidden_size=text.hidden_size, layers=text.num_hidden_layers,
                          heads=text.num_attention_heads, intermediate_size=text.intermediate_size,
                          pooling="pooler")
    return ModelConfig(audio=audio_cfg, text=text_cfg, joint_dim=config.projection_dim,
                       mlp_act=config.projection_hidden_act, enable_fusion=bool(audio.enable_fusion),
                       fusion_type="aff_2d")


# ---- folders -----------------------------------------------------------------------------------

_MAX_CONFIG_BYTES = 16 << 20


def _check_folder(folder: Path) -> None:
    """A local model folder holds regular files and folders only: transformers would block on a
    FIFO (or read a device) planted among them."""
    for entry in folder.iterdir():
        if not (entry.is_file() or entry.is_dir()):
            raise UsageError(f"{folder}: {entry.name} is not a regular file (a FIFO, device or broken link); refused")


def is_hf_model(path_or_id: str) -> bool:
    """A folder whose config.json is a ClapModel's, or (no such path here) a hub id `owner/name`."""
    path = Path(path_or_id)
    if path.is_dir():
        config = path / "config.json"
        try:  # is_file first: a FIFO planted as config.json must not block the read
            if not config.is_file() or config.stat().st_size > _MAX_CONFIG_BYTES:
                return False
            return json.loads(config.read_text()).get("model_type") == "clap"
        except (OSError, ValueError, AttributeError):
            return False
    return not path.exists() and is_hub_id(path_or_id)


def load_hf(path_or_id: str) -> CLAP:
    """Our CLAP with the weights of an HF ClapModel folder or hub id; every weight placed (strict)."""
    from transformers import ClapFeatureExtractor, ClapModel

    from clap_model.text import from_pretrained

    local = Path(path_or_id)
    if local.is_dir():
        _check_folder(local)
    # Safetensors wherever the folder has it: pytorch_model.bin is a pickle.
    safe = True if (local / "model.safetensors").is_file() else None

    def load(name: str, **kwargs: Any) -> tuple[Any, Any]:
        return (ClapModel.from_pretrained(name, use_safetensors=safe, **kwargs),
                ClapFeatureExtractor.from_pretrained(name, **kwargs))

    source, extractor = from_pretrained(load, path_or_id, "Hugging Face CLAP model",
                                        "name a local ClapModel folder or fill the cache")
    cfg = config_from_hf(source.config, extractor, path_or_id)
    model = CLAP(cfg, pretrained_text=False)
    state = from_hf_state(source.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not OURS_ONLY.fullmatch(key)]
    if missing or unexpected:
        raise UsageError(f"{path_or_id} does not fit our model: {len(missing)} missing (e.g. {missing[:3]}), "
                         f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return model.eval()


def save_hf(model: CLAP, directory: str | Path) -> None:
    """A folder `ClapModel.from_pretrained` and `ClapProcessor.from_pretrained` load: config.json,
    model.safetensors, the feature extractor of our front end and the model's tokenizer."""
    from transformers import ClapModel, ClapProcessor

    from clap_model.text import build_tokenizer

    check_exportable(model)
    config = hf_config(model)
    with torch.device("meta"):
        target = ClapModel(config)
    state = to_hf_state(model.state_dict())
    for key, value in target.state_dict().items():  # HF's own buffers, rebuilt as HF builds them
        if HF_ONLY.fullmatch(key):
            state[key] = _hf_buffer(key, value)
    # strict: every HF weight gets ours and no weight of ours is left over.
    target.load_state_dict(state, strict=True, assign=True)
    tokenizer = roberta_tokenizer(build_tokenizer(model.cfg.text), model.cfg.text.max_length)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(out, safe_serialization=True)
    extractor = feature_extractor(model.cfg)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(out)
    extractor.save_pretrained(out)  # preprocessor_config.json too: transformers 4 reads the extractor there


def roberta_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """`tokenizer` as a RoBERTa tokenizer class, which ClapProcessor (transformers 4) insists on.
    Our byte-level tokenizer is a RoBERTa BPE with a 256-byte vocabulary and no merges: written as
    RoBERTa's vocab.json and merges.txt, RoBERTa's tokenizer reads it back giving the same ids."""
    from transformers import AutoTokenizer

    from clap_model.text import byte_tokenizer

    if "Roberta" not in type(tokenizer).__name__:
        if tokenizer.get_vocab() != byte_tokenizer().get_vocab():
            raise UsageError(f"Hugging Face's ClapProcessor takes a RoBERTa tokenizer, not this model's "
                             f"{type(tokenizer).__name__}: it cannot be exported to --format hf")
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "vocab.json").write_text(json.dumps(tokenizer.get_vocab()))
            (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
            (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
            tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = max_length
    return tokenizer


def _hf_buffer(key: str, like: torch.Tensor) -> torch.Tensor:
    if key.endswith("position_ids"):
        return torch.arange(like.shape[-1]).expand(like.shape).clone()
    return torch.zeros(like.shape, dtype=like.dtype)
