"""`audiodata caption`: listen, write, check on the one shard-to-shard runner (REWRITE mode).

Every sample keeps its audio bytes and order; its JSON gains
- `alm_answers`: the listening model's answers, one per (window, question), windows in time order;
- `text_llm`: the kept captions (a list, empty when none was kept);
- `caption_scores`: every candidate written, with its CLAP score (null without the check step),
  whether it was kept, the attempt that wrote it and its outcome (ok, empty, refused, ...).
caption_manifest.parquet names one outcome per sample (types.OUTCOMES).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import soundfile

from audio_dataset.caption import types as t
from audio_dataset.caption.check import CheckOptions, ClapChecker, check_settings
from audio_dataset.caption.listen import ListenOptions, listen_settings, make_listener, resolve_alm
from audio_dataset.caption.types import Candidate, Clip, WindowAnswer, WriteRequest
from audio_dataset.caption.write import sample_metadata
from audio_dataset.curate.common import audio_bytes
from audio_dataset.k2c.models import ResolvedModel
from audio_dataset.schema import JSON_EXT, MAX_CAPTION_CHARS, TEXT_FIELD
from audio_dataset.shards import Sample
from audio_dataset.source import UserError
from audio_dataset.stage_runner import RunOptions, RunSummary, ShardJob, Stage, check_run, run_stage

STAGE = "caption"
LISTEN, WRITE, CHECK = "listen", "write", "check"
STEPS = (LISTEN, WRITE, CHECK)
TEXT_LLM_FIELD = "text_llm"
ALM_ANSWERS_FIELD = "alm_answers"
CAPTION_SCORES_FIELD = "caption_scores"
# Fields this stage writes: never part of what the writer reads as the sample's metadata.
OWN_FIELDS = (TEXT_LLM_FIELD, ALM_ANSWERS_FIELD, CAPTION_SCORES_FIELD)

# Two scores of one text from two batches, each rounded to 6 places, can differ by 1e-6, and
# `a >= b - 1e-6` is float arithmetic at that very boundary (0.435832 vs 0.435833 failed it).
SCORE_TOLERANCE = 2e-6

_strings = pa.list_(pa.string())
CAPTION_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("windows", pa.int32()), ("candidates", _strings), ("candidate_outcomes", _strings),
    ("scores", pa.list_(pa.float64())), ("attempts", pa.list_(pa.int32())), ("captions", _strings),
    ("reference_score", pa.float64()),
])


@dataclass(frozen=True)
class WriteStep:
    """The writer as the stage needs it: built in each worker, its settings known in the driver."""
    factory: Callable[[str], t.Writer]  # device -> Writer
    settings: dict[str, Any]


@dataclass(frozen=True)
class CaptionOptions:
    steps: tuple[str, ...] = STEPS
    listen: ListenOptions = ListenOptions()
    write: WriteStep | None = None
    check: CheckOptions | None = None
    num_captions: int = 1

    def validate(self) -> None:
        if not self.steps or any(step not in STEPS for step in self.steps) or len(set(self.steps)) != len(self.steps):
            raise UserError(f"--steps: a comma-separated subset of {','.join(STEPS)}")
        if CHECK in self.steps and WRITE not in self.steps:
            raise UserError("--steps check needs write (it checks the captions written)")
        missing = [what for step, what, given in ((WRITE, "--llm or --llm-url (write)", self.write),
                                                  (CHECK, "--clap-checkpoint (check)", self.check))
                   if step in self.steps and given is None]
        if missing:
            raise UserError(f"--steps {','.join(self.steps)} needs {' and '.join(missing)}; give "
                            f"{'them' if len(missing) > 1 else 'it'} or choose fewer --steps "
                            "(e.g. --steps listen)")
        if self.num_captions < 1:
            raise UserError("--num-captions must be at least 1")
        if LISTEN in self.steps:
            self.listen.check()
        if self.check is not None and CHECK in self.steps:
            self.check.check()


def _answers_json(answers: list[WindowAnswer]) -> list[dict[str, Any]]:
    return [answer.as_json() for answer in answers]


def _metadata(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if k not in OWN_FIELDS}


def _reference_text(meta: dict[str, Any]) -> str | None:
    """The sample's own first caption: the label text AudioSetCaps compares against."""
    text = meta.get(TEXT_FIELD)
    first = text[0] if isinstance(text, list) and text else text
    return first[:MAX_CAPTION_CHARS] if isinstance(first, str) and first.strip() else None


@dataclass
class _Scored:
    candidate: Candidate
    attempt: int
    score: float | None = None
    kept: bool = False

    def as_json(self) -> dict[str, Any]:
        text = self.candidate.text if self.candidate.text is not None else self.candidate.raw[:MAX_CAPTION_CHARS]
        return {"text": text, "score": self.score, "kept": self.kept, "attempt": self.attempt,
                "outcome": self.candidate.outcome}


def decode_whole(data: bytes | None, rate: int) -> np.ndarray | None:
    """The whole clip as mono float32 at `rate` (listen cuts it into the model's windows); None when
    it does not decode, which is that sample's outcome alone."""
    from clap_model.data import decode_audio

    if data is None:
        return None
    try:
        wave = decode_audio(data, rate)
    except (RuntimeError, ValueError, soundfile.LibsndfileError):
        return None
    return wave if len(wave) else None


class CaptionProcessor:
    def __init__(self, options: CaptionOptions, alm: tuple[ResolvedModel, str] | None,
                 check_record: dict[str, Any] | None, device: str) -> None:
        self.options = options
        self.listener = make_listener(options.listen, alm[0], alm[1], device) if alm is not None else None
        self.writer = options.write.factory(device) if options.write is not None and WRITE in options.steps else None
        self.checker = ClapChecker(options.check, check_record, device) \
            if options.check is not None and CHECK in options.steps else None
        # Audio decodes at the listening model's rate; the checker resamples to its own.
        self.rate = self.listener.sample_rate if self.listener is not None else 48000

    def _clip(self, sample: Sample) -> Clip | None:
        wave = decode_whole(audio_bytes(sample), self.rate)
        return None if wave is None else Clip(sample["__key__"], wave, self.rate)

    def _listen(self, clips: dict[int, Clip]) -> tuple[dict[int, list[WindowAnswer]], set[int]]:
        """Answers per sample; a batch that fails is retried clip by clip, so one bad clip is its own
        alm_error and the others keep their answers."""
        questions = list(self.options.listen.questions)
        order = list(clips)
        # What a model (its folder is data) or its front end raises on one clip it cannot take.
        per_clip = (RuntimeError, ValueError, IndexError, TypeError)
        try:
            return dict(zip(order, self.listener.listen([clips[i] for i in order], questions))), set()
        except per_clip:
            found, failed = {}, set()
            for i in order:
                try:
                    found[i] = self.listener.listen([clips[i]], questions)[0]
                except per_clip:
                    failed.add(i)
            return found, failed

    def _write_and_check(self, requests: dict[int, WriteRequest], clips: dict[int, Clip],
                         metas: list[dict[str, Any]]) -> tuple[dict[int, list[_Scored]], dict[int, float | None]]:
        """Candidates per sample over every attempt; with the check step, regenerate the samples
        none of whose candidates passed, up to --retries times."""
        n = self.options.num_captions
        scored: dict[int, list[_Scored]] = {i: [] for i in requests}
        references: dict[int, float | None] = {}
        todo = list(requests)
        retries = self.options.check.retries if self.checker is not None else 0
        for attempt in range(retries + 1):
            written = self.writer.write([requests[i] for i in todo], n, attempt)
            for i, candidates in zip(todo, written):
                scored[i] += [_Scored(c, attempt) for c in candidates]
            if self.checker is None:
                for entries in scored.values():
                    for entry in entries:
                        entry.kept = entry.candidate.outcome == t.OK
                break
            todo = self._check(todo, clips, metas, scored, references)
            if not todo:
                break
        return scored, references

    def _check(self, todo: list[int], clips: dict[int, Clip], metas: list[dict[str, Any]],
               scored: dict[int, list[_Scored]], references: dict[int, float | None]) -> list[int]:
        """Score the new candidates of every sample in `todo` together (the checker batches audio and
        texts across samples); keep each sample's best --num-captions that pass. Returns the samples
        none of whose candidates passed."""
        plans, requests = [], []
        for i in todo:
            new = [e for e in scored[i] if e.score is None and e.candidate.outcome == t.OK]
            reference = _reference_text(metas[i]) \
                if i not in references and self.options.check.min_score is None else None
            plans.append((i, new, reference))
            requests.append((clips[i], [e.candidate.text for e in new] + ([reference] if reference else [])))
        failed = []
        for (i, new, reference), scores in zip(plans, self.checker.score_many(requests)):
            if i not in references:
                references[i] = scores.pop() if reference else None
            for entry, score in zip(new, scores):
                entry.score = score
            if not self._keep(scored[i], references[i]):
                failed.append(i)
        return failed

    def _keep(self, entries: list[_Scored], reference: float | None) -> bool:
        """Mark the best --num-captions passing candidates kept. True when any passed."""
        bar = self.options.check.min_score if self.options.check.min_score is not None else reference
        # Scores are rounded to 6 places: the text itself, scored in another batch, is "at least" itself.
        passing = [e for e in entries if e.score is not None and (bar is None or e.score >= bar - SCORE_TOLERANCE)]
        passing.sort(key=lambda e: -e.score)
        for entry in entries:
            entry.kept = False
        seen: set[str] = set()
        for entry in passing:
            if len(seen) < self.options.num_captions and entry.candidate.text not in seen:
                entry.kept = True
                seen.add(entry.candidate.text)
        return bool(passing)

    def prepare(self, job: ShardJob, samples: list[Sample]) -> list[Clip | None]:
        """Each sample's audio decoded whole at the listening model's rate (None: it does not decode),
        when a step listens to it; the worker runs this while its models work on the shard before."""
        del job
        if LISTEN not in self.options.steps and CHECK not in self.options.steps:
            return []
        return [self._clip(sample) for sample in samples]

    def process(self, job: ShardJob, samples: list[Sample],
                prepared: list[Clip | None] | None = None) -> tuple[list[Sample], list[dict[str, Any]]]:
        steps = self.options.steps
        metas = [json.loads(sample[JSON_EXT]) for sample in samples]
        status: dict[int, str] = {}
        clips: dict[int, Clip] = {}
        if LISTEN in steps or CHECK in steps:
            decoded = prepared if prepared is not None else self.prepare(job, samples)
            for i, clip in enumerate(decoded):
                if clip is None:
                    status[i] = t.NO_AUDIO
                else:
                    clips[i] = clip
        answers: dict[int, list[WindowAnswer]] = {}
        if LISTEN in steps:
            answers, failed = self._listen(clips)
            status.update({i: t.ALM_ERROR for i in failed})
        scored: dict[int, list[_Scored]] = {}
        references: dict[int, float | None] = {}
        if WRITE in steps:
            # Only the fields the prompt names (title, tags, description, text), each cut: a 16 MiB
            # JSON of other fields (uploader, URLs, padding) is neither a caption's business nor a prompt.
            requests = {i: WriteRequest(samples[i]["__key__"], sample_metadata(_metadata(metas[i])),
                                        tuple(answers.get(i, ())))
                        for i in range(len(samples)) if i not in status}
            if requests:
                scored, references = self._write_and_check(requests, clips, metas)
            if self.checker is not None:
                self.checker.forget()
        new_samples, rows = [], []
        for i, (sample, meta) in enumerate(zip(samples, metas)):
            entries = scored.get(i, [])
            outcome = status.get(i) or self._outcome(entries)
            kept = sorted((e for e in entries if e.kept), key=lambda e: -(e.score or 0.0)) \
                if self.checker is not None else [e for e in entries if e.kept]
            if LISTEN in steps:
                meta[ALM_ANSWERS_FIELD] = _answers_json(answers.get(i, []))
            if WRITE in steps:
                meta[TEXT_LLM_FIELD] = [e.candidate.text for e in kept]
                meta[CAPTION_SCORES_FIELD] = [e.as_json() for e in entries]
            new_samples.append({**sample, JSON_EXT: json.dumps(meta, ensure_ascii=False, sort_keys=True).encode()})
            rows.append({"split": job.split, "shard": job.name, "key": sample["__key__"], "status": outcome,
                         "windows": len({(a.start, a.end) for a in answers.get(i, [])}),
                         "candidates": [e.as_json()["text"] for e in entries],
                         "candidate_outcomes": [e.candidate.outcome for e in entries],
                         "scores": [e.score for e in entries], "attempts": [e.attempt for e in entries],
                         "captions": [e.candidate.text for e in kept], "reference_score": references.get(i)})
        return new_samples, rows

    def _outcome(self, entries: list[_Scored]) -> str:
        if WRITE not in self.options.steps:
            return t.LISTENED
        if any(e.kept for e in entries):
            return t.CAPTIONED
        if any(e.candidate.outcome == t.OK for e in entries):
            return t.REJECTED_BY_CLAP  # written and scored, none passed after every retry
        if entries and all(e.candidate.outcome == t.LLM_ERROR for e in entries):
            return t.LLM_ERROR
        return t.NO_CAPTION


def _make_processor(options: CaptionOptions, alm: tuple[ResolvedModel, str] | None,
                    check_record: dict[str, Any] | None, device: str) -> CaptionProcessor:
    return CaptionProcessor(options, alm, check_record, device)


def run_caption(options: CaptionOptions, run: RunOptions) -> RunSummary:
    options.validate()
    check_run(run)
    alm = resolve_alm(options.listen) if LISTEN in options.steps else None
    check_record = check_settings(options.check) if CHECK in options.steps else None
    settings: dict[str, Any] = {"steps": list(options.steps), "num_captions": options.num_captions}
    if alm is not None:
        settings[LISTEN] = listen_settings(options.listen, *alm)
        settings["batch_size"] = options.listen.batch_size
    if WRITE in options.steps:
        settings[WRITE] = options.write.settings
    if check_record is not None:
        settings[CHECK] = check_record
    stage = Stage(STAGE, settings, functools.partial(_make_processor, options, alm, check_record), CAPTION_SCHEMA)
    return run_stage(stage, run)


__all__ = ["ALM_ANSWERS_FIELD", "CAPTION_SCORES_FIELD", "CaptionOptions", "STEPS", "TEXT_LLM_FIELD", "WriteStep",
           "run_caption"]
