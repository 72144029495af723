"""Model configurations: the paper's presets and a CPU-sized `tiny` one.

Field names follow LAION-CLAP's `audio_cfg` / `text_cfg` so a config reads the same as theirs.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

FUSION_TYPES = ("aff_2d", "iaff_2d", "daf_2d")


class UsageError(ValueError):
    """A user mistake (arguments, data, checkpoint): reported in one line, exit status 2."""


class RunFailure(RuntimeError):
    """The command line is fine but the run cannot go on (the hub cannot be reached): one line, exit 1."""


def error_line(exc: BaseException) -> str:
    """The one line to show for `exc`. A DataLoader worker's error arrives as its whole traceback
    ending in `module.Class: message`: keep the message."""
    lines = str(exc).strip().splitlines()
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception): ", "", last) if len(lines) > 1 else last

def last_line(exc: BaseException) -> str:
    """The last line of `exc`'s message (a library's multi-line error ends with its cause)."""
    return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__


TRUNCATING = ("rand_trunc", "fusion")
FILLING = ("repeatpad", "pad", "repeat")


@dataclass(frozen=True)
class AudioConfig:
    model_type: str = "HTSAT"  # HTSAT | PANN
    model_name: str = "tiny"  # HTSAT: tiny | base; PANN: Cnn14
    sample_rate: int = 48_000
    clip_samples: int = 480_000  # 10 s
    window_size: int = 1024
    hop_size: int = 480
    mel_bins: int = 64
    fmin: int = 50
    fmax: int = 14_000
    class_num: int = 527
    # HTSAT geometry (LAION-CLAP's create_htsat_model values for tiny).
    spec_size: int = 256
    patch_size: int = 4
    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window: int = 8
    # SpecAugment stripes (torchlibrosa's widths in LAION-CLAP).
    time_drop_width: int = 64
    freq_drop_width: int = 8
    drop_path_rate: float = 0.1  # HTSAT stochastic depth
    # The rate the mel filterbank is built for, when not `sample_rate`: msclap's HTSAT builds it for
    # 32 kHz while it is fed 44.1 kHz audio.
    mel_sample_rate: int | None = None

    @property
    def width(self) -> int:
        """Width of the audio embedding the projection MLP takes."""
        if self.model_type == "PANN":
            return 2048
        return self.embed_dim * 2 ** (len(self.depths) - 1)


@dataclass(frozen=True)
class TextConfig:
    # A Hugging Face hub id or local path; None builds a random model from the dims below
    # with a byte-level tokenizer, so the tiny preset needs no download.
    name_or_path: str | None = "roberta-base"
    model_type: str = "roberta"  # roberta | bert | any transformers encoder type
    max_length: int = 77
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    # "pooler": the model's pooler output (LAION-CLAP, for BERT and RoBERTa); "mean": the masked
    # mean of the last hidden states (randomly initialised models: their untrained pooler sees
    # nearly the same [CLS] state for every caption).
    pooling: str = "pooler"
    # msclap: "cls" pools BERT's last hidden state at [CLS]; "eos" pools GPT-2 where msclap does, at
    # index (number of ids other than 0) - 1, 0 being "!", its pad token. The caption gets `suffix`
    # appended (GPT-2: " <|endoftext|>") and `pad_token` (GPT-2: "!") is added as the pad token.
    suffix: str = ""
    pad_token: str | None = None
    # With name_or_path None: a tokenizer shipped in clap_model/vocab/ (text.SHIPPED_VOCABULARIES)
    # instead of the byte-level one; the random tower's embeddings are sized to it.
    vocabulary: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    joint_dim: int = 512
    mlp_act: str = "relu"
    # "mlp": LAION-CLAP's Linear-act-Linear; "msclap": Microsoft CLAP's (Linear, GELU, Linear, both
    # without bias, dropout 0.5, LayerNorm of the sum of the two Linear outputs).
    projection: str = "mlp"
    # 2: LAION-CLAP's two temperatures (the second for the MLP loss); 1: msclap's one `logit_scale`.
    logit_scales: int = 2
    enable_fusion: bool = False
    fusion_type: str = "aff_2d"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        audio = dict(data["audio"])
        for key in ("depths", "num_heads"):
            audio[key] = tuple(audio[key])
        return cls(audio=AudioConfig(**audio), text=TextConfig(**data["text"]),
                   **{k: v for k, v in data.items() if k not in ("audio", "text")})


_HTSAT_TINY = AudioConfig()
_HTSAT_BASE = replace(_HTSAT_TINY, model_name="base", embed_dim=128, depths=(2, 2, 12, 2))
_PANN14 = replace(_HTSAT_TINY, model_type="PANN", model_name="Cnn14")
_ROBERTA = TextConfig()
_BERT = TextConfig(name_or_path="bert-base-uncased", model_type="bert")

# `tiny`: HTSAT's architecture at toy size (2 s clips, 32 mel bins, two Swin stages) with a
# 2-layer RoBERTa: trains on a CPU in minutes. 96000 // 768 + 1 = 126 frames fit the 128 the
# 64-wide spectrogram image holds (spec_size * freq_ratio).
_TINY_AUDIO = AudioConfig(
    clip_samples=96_000, hop_size=768, mel_bins=32, class_num=32, spec_size=64, embed_dim=16,
    depths=(2, 2), num_heads=(2, 4), window=4, time_drop_width=4, freq_drop_width=2, drop_path_rate=0.0,
)
_TINY_TEXT = TextConfig(name_or_path=None, max_length=48, hidden_size=32, layers=2, heads=2,
                        intermediate_size=64, pooling="mean")

# `tiny-roberta`: `tiny` with what Hugging Face's ClapModel holds: a RoBERTa read through its pooler
# and a RoBERTa BPE tokenizer shipped in the package (clap_model/vocab/audioset-bpe): it trains,
# exports to --format hf and loads in transformers with no download.
_TINY_ROBERTA_TEXT = replace(_TINY_TEXT, pooling="pooler", vocabulary="audioset-bpe")

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(audio=_TINY_AUDIO, text=_TINY_TEXT, joint_dim=128),
    "tiny-roberta": ModelConfig(audio=_TINY_AUDIO, text=_TINY_ROBERTA_TEXT, joint_dim=128),
    "tiny-fusion": ModelConfig(audio=_TINY_AUDIO, text=_TINY_TEXT, joint_dim=128, enable_fusion=True),
    "htsat-tiny-roberta": ModelConfig(audio=_HTSAT_TINY, text=_ROBERTA),
    "htsat-tiny-roberta-fusion": ModelConfig(audio=_HTSAT_TINY, text=_ROBERTA, enable_fusion=True),
    "htsat-tiny-bert": ModelConfig(audio=_HTSAT_TINY, text=_BERT),
    "htsat-base-roberta": ModelConfig(audio=_HTSAT_BASE, text=_ROBERTA),
    "htsat-base-roberta-fusion": ModelConfig(audio=_HTSAT_BASE, text=_ROBERTA, enable_fusion=True),
    "pann14-roberta": ModelConfig(audio=_PANN14, text=_ROBERTA),
    "pann14-roberta-fusion": ModelConfig(audio=_PANN14, text=_ROBERTA, enable_fusion=True),
}

# Microsoft CLAP (arXiv 2206.04769, 2309.05767), as msclap 1.3.4's configs and code build them.
_MS_PROJECTION = {"joint_dim": 1024, "projection": "msclap", "logit_scales": 1}
_MSCLAP_2022_AUDIO = replace(_PANN14, sample_rate=44_100, clip_samples=5 * 44_100, hop_size=320)
# msclap's HTSAT takes its settings from its own config.py: the filterbank for 32 kHz, 50-14000 Hz.
_MSCLAP_2023_AUDIO = replace(_HTSAT_TINY, sample_rate=44_100, clip_samples=7 * 44_100, hop_size=320,
                             mel_sample_rate=32_000)
_MSCLAP_BERT = TextConfig(name_or_path="bert-base-uncased", model_type="bert", max_length=100, pooling="cls")
_MSCLAP_GPT2 = TextConfig(name_or_path="gpt2", model_type="gpt2", max_length=77, pooling="eos",
                          suffix=" <|endoftext|>", pad_token="!")
PRESETS["msclap-2022"] = ModelConfig(audio=_MSCLAP_2022_AUDIO, text=_MSCLAP_BERT, **_MS_PROJECTION)
PRESETS["msclap-2023"] = ModelConfig(audio=_MSCLAP_2023_AUDIO, text=_MSCLAP_GPT2, **_MS_PROJECTION)
# msclap-2023's design at `tiny` size with a 2-layer GPT-2 and a byte-level tokenizer: trains on a CPU.
PRESETS["msclap-tiny"] = ModelConfig(
    audio=replace(_TINY_AUDIO, sample_rate=44_100, clip_samples=88_200, hop_size=700, mel_sample_rate=32_000),
    text=replace(_TINY_TEXT, model_type="gpt2", pooling="eos", suffix=" <|endoftext|>", pad_token="!"),
    joint_dim=128, projection="msclap", logit_scales=1)


def get_preset(name: str, text_model: str | None = None) -> ModelConfig:
    """A preset by name; `text_model` swaps the text encoder for any hub id or local path."""
    if name not in PRESETS:
        raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    config = PRESETS[name]
    if text_model:
        config = replace(config, text=replace(config.text, name_or_path=text_model, model_type="auto",
                                              pooling="pooler", suffix="", pad_token=None, vocabulary=None))
    return config


def preset_text_models() -> frozenset[str]:
    """The hub ids the presets' text towers name: the only text models a checkpoint's config may
    choose (a checkpoint is data; any other path or id must come from the user's --text-model)."""
    return frozenset(cfg.text.name_or_path for cfg in PRESETS.values() if cfg.text.name_or_path is not None)


def hub_presets() -> list[str]:
    """The presets whose text tower (tokenizer, and weights when training) comes from the Hugging Face hub."""
    return [name for name, cfg in PRESETS.items() if cfg.text.name_or_path is not None]
