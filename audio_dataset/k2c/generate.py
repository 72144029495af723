"""Caption generation from keywords: a seq2seq model (hub id or local folder) or the paper's template.

The model recipe is keytotext's as LAION-CLAP used it: keywords joined by "| " and closed with
" </s>", beam search 4, length penalty 1.5, no repeated 3-grams. Unlike keytotext, the keyword
string is never split at dots, so "p.a. system" reaches the model whole.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from typing import Protocol

from audio_dataset.k2c.keywords import Keyword
from audio_dataset.k2c.models import ResolvedModel, resolve_model
from audio_dataset.source import UserError

# keytotext's `k2t-base`, the T5 keyword-to-text checkpoint LAION-CLAP's augmentation used.
DEFAULT_MODEL = "gagan3012/k2t-base"
TEMPLATE = "template"
# bfloat16 roughly doubles GPU throughput; T5 was trained in it (float16 overflows in T5).
DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Decoding:
    num_captions: int = 1
    num_beams: int = 4
    length_penalty: float = 1.5
    no_repeat_ngram_size: int = 3
    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 1.0
    top_k: int = 50
    temperature: float = 1.0

    def check(self) -> None:
        if self.num_captions < 1 or self.num_beams < 1 or self.max_new_tokens < 1:
            raise UserError("--num-captions, --num-beams and --max-new-tokens must be at least 1")
        if (self.num_beams > 1 or not self.do_sample) and self.num_captions > self.num_beams:
            raise UserError(f"beam search returns at most --num-beams ({self.num_beams}) captions; raise it, "
                            f"or use --do-sample --num-beams 1 for --num-captions {self.num_captions}")
        if not 0 < self.top_p <= 1 or self.temperature <= 0:
            raise UserError("--top-p must be in (0, 1] and --temperature positive")

    def generate_kwargs(self) -> dict:
        kwargs = {"num_beams": self.num_beams, "length_penalty": self.length_penalty,
                  "no_repeat_ngram_size": self.no_repeat_ngram_size, "max_new_tokens": self.max_new_tokens,
                  "num_return_sequences": self.num_captions, "do_sample": self.do_sample,
                  "early_stopping": self.num_beams > 1}
        if self.do_sample:
            kwargs.update(top_p=self.top_p, top_k=self.top_k, temperature=self.temperature)
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)


def model_input(keywords: list[Keyword]) -> str:
    return "| ".join(k.text for k in keywords) + " </s>"


def template_caption(keywords: list[Keyword]) -> str:
    """The paper's template baseline: "The sound of A, B and C"."""
    names = [k.text for k in keywords]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"The sound of {listed}"


def resolve_caption_model(spec: str, revision: str | None = None) -> ResolvedModel:
    if spec == TEMPLATE:
        return ResolvedModel(TEMPLATE, "", "")
    return resolve_model(spec, "--caption-model", revision)


class Captioner(Protocol):
    def caption(self, keyword_lists: list[list[Keyword]], seed: int) -> list[list[str]]:
        """Generated captions (before post-processing) for each keyword list."""


class TemplateCaptioner:
    def caption(self, keyword_lists: list[list[Keyword]], seed: int) -> list[list[str]]:
        return [[template_caption(keywords)] for keywords in keyword_lists]


class Seq2SeqCaptioner:
    """Batched generation with a seq2seq model; batches are formed by input length so padding is small."""

    def __init__(self, model: ResolvedModel, decoding: Decoding, batch_size: int, device: str,
                 dtype: str = "float32") -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        self.decoding = decoding
        self.batch_size = batch_size
        self.device = device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model.path)
            self.model = AutoModelForSeq2SeqLM.from_pretrained(model.path, dtype=getattr(torch, dtype))
            self.model = self.model.to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            reason = str(exc).strip().splitlines()[0][:200]
            raise UserError(f"cannot load --caption-model {model.spec}: {reason}") from None

    def caption(self, keyword_lists: list[list[Keyword]], seed: int) -> list[list[str]]:
        import torch

        texts = [model_input(keywords) for keywords in keyword_lists]
        order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
        results: list[list[str]] = [[] for _ in texts]
        k = self.decoding.num_captions
        # Seeded per call (one call per shard): sampled captions reproduce, whatever ran before.
        torch.manual_seed(seed)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            decoded = self._generate([texts[i] for i in chunk])
            for n, index in enumerate(chunk):
                results[index] = decoded[n * k : (n + 1) * k]
        return results

    def _generate(self, texts: list[str]) -> list[str]:
        import torch

        with warnings.catch_warnings():
            # Our inputs end in "</s>" on purpose (keytotext's format); the tokenizer warns about it.
            warnings.filterwarnings("ignore", message=".*already has </s>.*")
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        batch = {name: tensor.to(self.device) for name, tensor in batch.items()}
        with torch.inference_mode():
            output = self.model.generate(**batch, **self.decoding.generate_kwargs())
        return self.tokenizer.batch_decode(output, skip_special_tokens=True)


def make_captioner(model: ResolvedModel, decoding: Decoding, batch_size: int, device: str,
                   dtype: str = "float32") -> Captioner:
    if model.spec == TEMPLATE:
        return TemplateCaptioner()
    return Seq2SeqCaptioner(model, decoding, batch_size, device, dtype)
