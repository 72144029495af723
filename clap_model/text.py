"""Text encoders through transformers: RoBERTa (default), BERT or any encoder by hub id or path.

`TextConfig.name_or_path=None` builds a randomly initialised RoBERTa of the configured size with a
byte-level tokenizer made in code (every byte is a token), so small presets and tests need no
download. A real checkpoint always comes through `from_pretrained`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast, RobertaConfig, RobertaModel

from clap_model.config import TextConfig, UsageError

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A RoBERTa-style byte-level BPE tokenizer with no merges: 256 byte tokens + specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for char in alphabet:
        vocab[char] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(("</s>", vocab["</s>"]), ("<s>", vocab["<s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")


def from_pretrained(load: Callable[[str], Any], name: str) -> Any:
    """`load(name)`, its failure (a missing folder, an unknown id, no network) as one UsageError line
    naming the model: transformers' own message speaks of repo ids even for a mistyped local path."""
    if name.startswith((".", "/")) and not Path(name).exists():
        raise UsageError(f"text model folder not found: {name}")
    try:
        return load(name)
    except (OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load text model {name!r}: {detail}") from None


def build_tokenizer(cfg: TextConfig):
    if cfg.name_or_path is None:
        return byte_tokenizer()
    return from_pretrained(AutoTokenizer.from_pretrained, cfg.name_or_path)


def build_text_model(cfg: TextConfig, pretrained: bool = True) -> nn.Module:
    """The encoder; `pretrained=False` builds the architecture only (weights come from a checkpoint)."""
    if cfg.name_or_path is None:
        config = RobertaConfig(vocab_size=len(SPECIALS) + 256, hidden_size=cfg.hidden_size,
                               num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                               intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_length + 2,
                               pad_token_id=1, bos_token_id=0, eos_token_id=2)
        return RobertaModel(config, add_pooling_layer=cfg.pooling == "pooler")
    if cfg.model_type == "clap":  # a Hugging Face ClapModel's RoBERTa tower (its weights: hf_format)
        fields = from_pretrained(AutoConfig.from_pretrained, cfg.name_or_path).text_config.to_dict()
        fields.pop("model_type")  # "clap_text_model": the tower is a RoBERTa
        return RobertaModel(RobertaConfig(**fields), add_pooling_layer=True)
    if pretrained:
        return from_pretrained(AutoModel.from_pretrained, cfg.name_or_path)
    return AutoModel.from_config(from_pretrained(AutoConfig.from_pretrained, cfg.name_or_path))


def text_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def encode(model: nn.Module, tokens: dict[str, torch.Tensor], pooling: str = "pooler") -> torch.Tensor:
    """Pooled text features: the pooler output (LAION-CLAP's choice for BERT and RoBERTa) when
    asked for and the model has one, else the attention-masked mean of the last hidden states."""
    inputs = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = model(**inputs)
    pooled = getattr(out, "pooler_output", None)
    if pooling == "pooler" and pooled is not None:
        return pooled
    mask = tokens["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)


class Tokenize:
    """Captions -> fixed-length token tensors (padding to max_length as LAION-CLAP does)."""

    def __init__(self, cfg: TextConfig) -> None:
        self.cfg = cfg
        self.tokenizer = build_tokenizer(cfg)

    def __call__(self, texts: list[str]) -> dict[str, Any]:
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return dict(out)
