"""Text encoders through transformers: RoBERTa (default), BERT or any encoder by hub id or path.

`TextConfig.name_or_path=None` builds a randomly initialised RoBERTa of the configured size with a
byte-level tokenizer made in code (every byte is a token), or with a tokenizer shipped in
clap_model/vocab/ (`TextConfig.vocabulary`), so small presets and tests need no download. The
presets' hub towers (roberta-base, bert-base-uncased, gpt2) are built from their known configs
when a checkpoint supplies the weights, so embedding audio from a release file needs no network; their tokenizers, and pretrained weights, come through `from_pretrained`: the local cache
first, the hub only when it can be reached.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2Model,
                          PretrainedConfig, PreTrainedTokenizerFast, RobertaConfig, RobertaModel)

from clap_model.config import RunFailure, TextConfig, UsageError, last_line

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
GPT2_EOS = "<|endoftext|>"
# Tokenizer folders shipped as package data, by the name a TextConfig's `vocabulary` gives (a name
# read from a checkpoint only ever selects one of these). Origin: clap_model/vocab/README.md.
VOCAB_DIR = Path(__file__).parent / "vocab"
SHIPPED_VOCABULARIES = {"audioset-bpe": VOCAB_DIR / "audioset-bpe"}
AUDIOSET_BPE_SIZE = 2000
CAPTION_TEMPLATES = ("{}", "The sound of {}", "This is a sound of {}.")


def audioset_bpe_corpus(class_names: list[str]) -> list[str]:
    """The text `audioset-bpe` is trained on: each AudioSet class name alone and in the caption
    templates (k2c's template baseline, the zero-shot prompt)."""
    return [template.format(name) for name in class_names for template in CAPTION_TEMPLATES]


def train_audioset_bpe(class_names: list[str], out: Path) -> None:
    """Write `audioset-bpe` (RoBERTa's vocab.json + merges.txt, byte-level BPE) into `out`; see
    clap_model/vocab/README.md for the command that made the shipped copy."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(audioset_bpe_corpus(class_names), vocab_size=AUDIOSET_BPE_SIZE, min_frequency=2,
                            special_tokens=SPECIALS, show_progress=False)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out))
    (out / "tokenizer_config.json").write_text('{"tokenizer_class": "RobertaTokenizer", "model_max_length": 512}\n')


def shipped_tokenizer(name: str):
    """A RoBERTa tokenizer from a folder shipped in the package."""
    from transformers import RobertaTokenizerFast

    if name not in SHIPPED_VOCABULARIES:
        raise UsageError(f"unknown text vocabulary {name!r}; this version ships: {', '.join(SHIPPED_VOCABULARIES)}")
    return RobertaTokenizerFast.from_pretrained(str(SHIPPED_VOCABULARIES[name]))


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


# The hub's config.json of each text tower a preset names (architecture fields only): the tower is
# built from it when a checkpoint supplies its weights, with no download.
_ROBERTA_BASE = {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                 "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                 "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
                 "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
_BERT_BASE_UNCASED = {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
                      "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
                      "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
                      "pad_token_id": 0}
_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
         "n_head": 12, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
         "bos_token_id": 50256, "eos_token_id": 50256}
KNOWN_TEXT_CONFIGS: dict[str, dict[str, Any]] = {
    "roberta-base": _ROBERTA_BASE, "FacebookAI/roberta-base": _ROBERTA_BASE,
    "bert-base-uncased": _BERT_BASE_UNCASED, "google-bert/bert-base-uncased": _BERT_BASE_UNCASED,
    "gpt2": _GPT2, "openai-community/gpt2": _GPT2,
}


def known_text_config(name: str | None) -> PretrainedConfig | None:
    """The architecture of a known hub text tower, made offline; None for any other name."""
    if name not in KNOWN_TEXT_CONFIGS:
        return None
    fields = dict(KNOWN_TEXT_CONFIGS[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def hub_unreachable() -> str | None:
    """Why the hub cannot be asked (offline mode, or its endpoint refuses a connection within
    seconds); None when it may be. Found before transformers, which retries for most of a minute."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return "the hub is offline (HF_HUB_OFFLINE)"
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows the way
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=5).close()
    except OSError as exc:
        return f"{constants.ENDPOINT} cannot be reached ({exc.strerror or exc})"
    return None


def gpt2_byte_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's byte-level BPE with no merges: the 256 byte tokens in GPT-2's own order (so a byte's id
    is GPT-2's id for it, "!" is 0) and <|endoftext|> as 256."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    vocab[GPT2_EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS,
                                   model_input_names=["input_ids", "attention_mask"])


TEXT_MODEL_HINT = "pass --text-model PATH (a folder with its tokenizer and config) or fill the cache"


def from_pretrained(load: Callable[..., Any], name: str, what: str = "text model",
                    hint: str = TEXT_MODEL_HINT) -> Any:
    """`load(name)` from local files (a folder, or the hub cache), else from the hub; a mistake (a
    missing folder, an unknown id) is one UsageError line naming the model (transformers' own
    message speaks of repo ids even for a mistyped local path), a hub that cannot be reached one
    RunFailure line, found in seconds rather than after transformers' minute of retries."""
    if name.startswith((".", "/")) and not Path(name).exists():
        raise UsageError(f"{what} folder not found: {name}")
    try:
        return load(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        if Path(name).exists():  # a local folder without what is asked for: the hub has no say
            raise UsageError(f"cannot load {what} {name!r}: {last_line(exc)}") from None
    reason = hub_unreachable()
    if reason:
        raise RunFailure(f"{what} {name!r} is not in the Hugging Face cache and {reason}: {hint} "
                         f"(hf download {name})")
    try:
        return load(name)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load {what} {name!r}: {last_line(exc)}") from None


def build_tokenizer(cfg: TextConfig):
    if cfg.name_or_path is None and cfg.vocabulary:
        tokenizer = shipped_tokenizer(cfg.vocabulary)
    elif cfg.name_or_path is None:
        tokenizer = gpt2_byte_tokenizer() if cfg.model_type == "gpt2" else byte_tokenizer()
    else:
        tokenizer = from_pretrained(AutoTokenizer.from_pretrained, cfg.name_or_path)
    if cfg.pad_token:  # as msclap's CLAPWrapper does for GPT-2
        tokenizer.add_special_tokens({"pad_token": cfg.pad_token})
    return tokenizer


def _random_model(cfg: TextConfig) -> nn.Module:
    """A randomly initialised encoder of the configured size, for the byte-level tokenizers or a shipped one."""
    vocab_size = len(shipped_tokenizer(cfg.vocabulary)) if cfg.vocabulary else len(SPECIALS) + 256
    dims = {"hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
            "intermediate_size": cfg.intermediate_size}
    if cfg.model_type == "gpt2":
        return GPT2Model(GPT2Config(vocab_size=257, n_positions=cfg.max_length, n_embd=cfg.hidden_size,
                                    n_layer=cfg.layers, n_head=cfg.heads, n_inner=cfg.intermediate_size,
                                    bos_token_id=256, eos_token_id=256))
    if cfg.model_type == "bert":
        return BertModel(BertConfig(vocab_size=vocab_size, max_position_embeddings=cfg.max_length,
                                    pad_token_id=1, **dims), add_pooling_layer=cfg.pooling == "pooler")
    config = RobertaConfig(vocab_size=vocab_size, max_position_embeddings=cfg.max_length + 2,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, **dims)
    return RobertaModel(config, add_pooling_layer=cfg.pooling == "pooler")


def build_text_model(cfg: TextConfig, pretrained: bool = True) -> nn.Module:
    """The encoder; `pretrained=False` builds the architecture only (weights come from a checkpoint)."""
    if cfg.name_or_path is None:
        return _random_model(cfg)
    if cfg.model_type == "clap":  # a Hugging Face ClapModel's RoBERTa tower (its weights: hf_format)
        fields = from_pretrained(AutoConfig.from_pretrained, cfg.name_or_path).text_config.to_dict()
        fields.pop("model_type")  # "clap_text_model": the tower is a RoBERTa
        return RobertaModel(RobertaConfig(**fields), add_pooling_layer=True)
    if pretrained:
        return from_pretrained(AutoModel.from_pretrained, cfg.name_or_path)
    config = known_text_config(cfg.name_or_path) or from_pretrained(AutoConfig.from_pretrained, cfg.name_or_path)
    return AutoModel.from_config(config)


def text_width(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def encode(model: nn.Module, tokens: dict[str, torch.Tensor], pooling: str = "pooler") -> torch.Tensor:
    """Pooled text features: the pooler output (LAION-CLAP's choice for BERT and RoBERTa) when
    asked for and the model has one, msclap's "cls" or "eos" token, else the attention-masked mean
    of the last hidden states."""
    inputs = {k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out = model(**inputs)
    if pooling == "cls":
        return out.last_hidden_state[:, 0]
    if pooling == "eos":  # msclap counts id 0 ("!", its GPT-2 pad) as padding, in the caption too
        last = torch.ne(tokens["input_ids"], 0).sum(-1) - 1
        return out.last_hidden_state[torch.arange(last.shape[0], device=last.device), last]
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
        texts = [text + self.cfg.suffix for text in texts] if self.cfg.suffix else texts
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.cfg.max_length,
                             return_tensors="pt")
        return dict(out)
