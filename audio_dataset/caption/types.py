"""The contract between the caption steps (listen, write, check) and the stage that runs them.

Each step is a small object built once per worker and called on a batch; every object says what
decides its output in `settings` (model id and revision, prompt sha256, decoding), which the stage
records in run.json and provenance.json and checks on resume.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

# Per-sample outcomes in caption_manifest.parquet (one per sample, exactly).
CAPTIONED = "captioned"  # at least one candidate kept
REJECTED_BY_CLAP = "rejected_by_clap"  # candidates written, none passed the check after every retry
LLM_ERROR = "llm_error"  # the writer failed for this sample (endpoint error, deadline) after retries
NO_CAPTION = "no_caption"  # the writer answered, but every answer was empty, refused or the wrong language
NO_AUDIO = "no_audio"  # the sample has no decodable audio member
ALM_ERROR = "alm_error"  # the listening model failed on this sample
LISTENED = "listened"  # `--steps listen` alone: answers kept, no caption asked for
OUTCOMES = (CAPTIONED, REJECTED_BY_CLAP, LLM_ERROR, NO_CAPTION, NO_AUDIO, ALM_ERROR, LISTENED)

# Per-candidate outcomes (why a generated text is not a caption).
OK = "ok"
EMPTY = "empty"
REFUSED = "refused"  # "I cannot ...", "As an AI ..."
WRONG_LANGUAGE = "wrong_language"
CANDIDATE_OUTCOMES = (OK, EMPTY, REFUSED, WRONG_LANGUAGE, LLM_ERROR)


@dataclass(frozen=True)
class Clip:
    """One sample's audio as the stage decoded it: mono float32 at `sample_rate`."""
    key: str
    audio: np.ndarray
    sample_rate: int


@dataclass(frozen=True)
class WindowAnswer:
    """The listening model's answer to one question about one window of a clip (seconds)."""
    start: float
    end: float
    question: str
    answer: str

    def as_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "question": self.question, "answer": self.answer}


@dataclass(frozen=True)
class WriteRequest:
    """What the writer sees of one sample. `metadata` is data (title, tags, labels, description,
    text), quoted into the prompt, never instructions."""
    key: str
    metadata: dict[str, Any]
    answers: tuple[WindowAnswer, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One generated caption after cleaning: `text` is None unless `outcome` is OK."""
    text: str | None
    outcome: str
    raw: str = ""  # what the model returned, for the manifest's record of rejects


@dataclass
class StepSettings:
    """What decides a step's output; recorded and compared on resume."""
    values: dict[str, Any] = field(default_factory=dict)


class Listener(Protocol):
    settings: dict[str, Any]
    # The model's own front end: clips are resampled to this rate and cut into windows this long.
    sample_rate: int
    window_seconds: float

    def listen(self, clips: list[Clip], questions: list[str]) -> list[list[WindowAnswer]]:
        """Per clip, one answer per (window, question), windows in time order."""


class Writer(Protocol):
    settings: dict[str, Any]

    def write(self, requests: list[WriteRequest], num_captions: int, attempt: int) -> list[list[Candidate]]:
        """Per request, `num_captions` cleaned candidates (fewer only on error: an LLM_ERROR
        candidate). `attempt` (0, 1, ...) varies sampling on a retry after the check rejected all."""


class Checker(Protocol):
    settings: dict[str, Any]

    def score(self, clip: Clip, texts: list[str]) -> list[float]:
        """CLAP similarity of each text to the clip's audio (cosine, as `embed` computes it)."""
