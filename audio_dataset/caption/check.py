"""The CHECK step: a CLAP model scores every candidate caption against the clip's audio.

The model loads exactly as `audiodata embed` loads it (our clap-train checkpoints, LAION-CLAP
releases with --clap-preset, msclap, HF ClapModel exports): the checker is built on embed's own
processor. The rule is AudioSetCaps': keep a candidate whose score is at least the score of the
sample's own `text` (its label or original caption), else regenerate; or a fixed --min-score.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from audio_dataset.caption.types import Clip
from audio_dataset.curate.common import model_identity
from audio_dataset.source import UserError


@dataclass(frozen=True)
class CheckOptions:
    checkpoint: Path
    preset: str | None = None  # a LAION-CLAP release carries no config: the preset it was trained as
    retries: int = 2  # AudioSetCaps' mistral_try_num
    min_score: float | None = None  # None: the AudioSetCaps rule (at least the score of `text`)
    batch_size: int = 32
    max_checkpoint_bytes: int | None = None

    def check(self) -> None:
        if self.retries < 0 or self.batch_size < 1:
            raise UserError("--retries must not be negative and --batch-size at least 1")
        if self.min_score is not None and not -1.0 <= self.min_score <= 1.0:
            raise UserError("--min-score is a cosine similarity, in [-1, 1]")


def check_settings(options: CheckOptions) -> dict[str, Any]:
    """The model's identity as embed records it (loads it once in the driver: a bad checkpoint
    fails before any worker starts), and the rule."""
    return {"model": model_identity(options.checkpoint, options.preset, options.max_checkpoint_bytes),
            "rule": "min_score" if options.min_score is not None else "at_least_text",
            "min_score": options.min_score, "retries": options.retries}


class ClapChecker:
    def __init__(self, options: CheckOptions, settings: dict[str, Any], device: str) -> None:
        from audio_dataset.curate.embed import EmbedOptions, EmbedProcessor

        self.embed = EmbedProcessor(EmbedOptions(options.checkpoint, options.preset, options.batch_size,
                                                 max_checkpoint_bytes=options.max_checkpoint_bytes), device)
        self.settings = settings  # check_settings', computed once in the driver
        self.batch_size = options.batch_size
        # Audio embeddings of the clips being checked: a retry scores the same clip again. Held with
        # the waveform itself (identity, not the key: keys may repeat across shards), a shard's worth.
        self._audio: dict[int, tuple[Any, Any]] = {}

    def _embed_audio(self, clips: list[Clip]) -> list[Any]:
        """Each clip's audio embedding (1, dim); the clips not held yet are embedded together, in
        batches of --batch-size."""
        new: dict[int, Clip] = {}
        for clip in clips:
            held = self._audio.get(id(clip.audio))
            if (held is None or held[0] is not clip.audio) and id(clip.audio) not in new:
                new[id(clip.audio)] = clip
        if len(self._audio) + len(new) > 1024:  # a shard of long clips: bounded memory over speed
            wanted = {id(clip.audio) for clip in clips}
            self._audio = {key: held for key, held in self._audio.items() if key in wanted}
        for rate in {clip.sample_rate for clip in new.values()}:
            group = [clip for clip in new.values() if clip.sample_rate == rate]
            embedded = self.embed.clap.embed_audio([clip.audio for clip in group], sample_rate=rate,
                                                   batch_size=self.batch_size)
            for clip, row in zip(group, embedded):
                self._audio[id(clip.audio)] = (clip.audio, row[None])
        return [self._audio[id(clip.audio)][1] for clip in clips]

    def forget(self) -> None:
        """Drop the held clips (the stage calls it after each shard)."""
        self._audio.clear()

    def score(self, clip: Clip, texts: list[str]) -> list[float]:
        """Cosine similarity of each text to the clip (both embeddings L2-normalised, as embed's)."""
        return self.score_many([(clip, texts)])[0]

    def score_many(self, requests: list[tuple[Clip, list[str]]]) -> list[list[float]]:
        """`score` for several clips at once: their audio and all their texts are embedded in
        batches of --batch-size, the same scores as one clip at a time (to float rounding)."""
        clap = self.embed.clap
        flat = [text for _, texts in requests for text in texts]
        if not flat:
            return [[] for _ in requests]
        text = clap.embed_text(flat, batch_size=self.batch_size)
        audio = self._embed_audio([clip for clip, texts in requests if texts])
        scores, start, row = [], 0, 0
        for _, texts in requests:
            if not texts:
                scores.append([])
                continue
            own = text[start:start + len(texts)]
            scores.append([round(float(s), 6) for s in clap.similarity(audio[row], own)[0].tolist()])
            start, row = start + len(texts), row + 1
        return scores


__all__ = ["CheckOptions", "ClapChecker", "check_settings"]
