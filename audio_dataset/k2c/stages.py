"""The two stages: `k2c` (keyword-to-caption augmentation) and `keywords` (KeyBERT tags).

k2c adds to every sample JSON the two fields LAION-CLAP's loader selects from:
- `text_augment_t5`: the kept generated captions, or null when there are none. LAION-CLAP's loader
  falls back to `text` on null, so a sample that was skipped (shorter than --min-seconds, as in
  LAION's recipe, or without keywords) or whose captions were all dropped trains on its own text.
- `text_augment_all`: `text` followed by the kept generated captions.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow as pa
import soundfile

from audio_dataset.k2c.generate import DEFAULT_MODEL, DTYPES, TEMPLATE, Captioner, Decoding, make_captioner, \
    resolve_caption_model
from audio_dataset.k2c.keywords import SYNONYM_MODES, KeyBertSettings, Keyword, KeyphraseExtractor, \
    as_strings, description_text, load_ontology, resolve_keybert_model, tag_keywords
from audio_dataset.k2c.models import ResolvedModel
from audio_dataset.k2c.postprocess import postprocess
from audio_dataset.stage_runner import RunOptions, RunSummary, ShardJob, Stage, check_run, options_dict, run_stage
from audio_dataset.schema import AUDIO_EXT, JSON_EXT, MAX_CAPTION_CHARS, TEXT_AUGMENT_ALL_FIELD, TEXT_AUGMENT_T5_FIELD
from audio_dataset.shards import Sample
from audio_dataset.source import UserError

KEYWORD_MODES = ("tags", "keybert")
# LAION's recipe skipped clips under 2 s: too short to carry what a sentence describes.
MIN_SECONDS = 2.0

# Per-sample status in k2c_manifest.parquet.
GENERATED = "generated"
ALL_DROPPED = "all_dropped"
SKIPPED_SHORT = "skipped_short"
NO_KEYWORDS = "no_keywords"

_strings = pa.list_(pa.string())
K2C_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("keywords", _strings), ("generated", _strings), ("outcomes", _strings), ("captions", _strings),
])
KEYWORDS_SCHEMA = pa.schema([
    ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("keyphrases", _strings),
])


@dataclass(frozen=True)
class K2COptions:
    model: str = DEFAULT_MODEL
    revision: str | None = None
    keywords: str = "tags"
    ontology: Path | None = None
    synonyms: str = "first"
    keybert: KeyBertSettings = field(default_factory=KeyBertSettings)
    decoding: Decoding = field(default_factory=Decoding)
    batch_size: int = 32
    dtype: str = "float32"
    min_seconds: float = MIN_SECONDS
    seed: int = 0

    def check(self) -> None:
        if self.keywords not in KEYWORD_MODES:
            raise UserError(f"--keywords must be one of {', '.join(KEYWORD_MODES)}")
        if self.synonyms not in SYNONYM_MODES:
            raise UserError(f"--synonyms must be one of {', '.join(SYNONYM_MODES)}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}")
        if self.batch_size < 1 or self.min_seconds < 0:
            raise UserError("--batch-size must be at least 1 and --min-seconds not negative")
        if self.model == TEMPLATE and self.decoding.num_captions > 1:
            raise UserError("--caption-model template makes one caption per sample; --num-captions needs a model")
        self.decoding.check()
        _check_keybert(self.keybert)


def _check_keybert(settings: KeyBertSettings) -> None:
    if settings.top_n < 1 or settings.ngram_max < 1 or not 0 <= settings.diversity <= 1:
        raise UserError("--top-n and --ngram-max must be at least 1, --diversity in [0, 1]")


def _shard_seed(seed: int, job: ShardJob) -> int:
    return (seed + zlib.crc32(f"{job.split}/{job.name}".encode())) % 2**32


def _with_json(sample: Sample, meta: dict[str, Any]) -> Sample:
    return {**sample, JSON_EXT: json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")}


# Audio members LAION-style shards use: ours are FLAC; other writers use wav or mp3... as libsndfile reads.
AUDIO_EXTS = (AUDIO_EXT, "wav", "ogg", "mp3")


def sample_seconds(sample: Sample, meta: dict[str, Any]) -> float:
    """The JSON's `duration`; shards from other writers may lack it, so then the audio's own header."""
    if isinstance(meta.get("duration"), (int, float)):
        return float(meta["duration"])
    audio = next((sample[ext] for ext in AUDIO_EXTS if ext in sample), None)
    if audio is None:
        return 0.0
    try:
        info = soundfile.info(io.BytesIO(audio))
    except (RuntimeError, soundfile.LibsndfileError):  # unreadable audio is no reason to caption it
        return 0.0
    return info.frames / info.samplerate if info.samplerate else 0.0


class K2CProcessor:
    def __init__(self, options: K2COptions, model: ResolvedModel, keybert: ResolvedModel | None,
                 ontology: dict[str, str], device: str) -> None:
        self.options = options
        self.ontology = ontology
        self.captioner: Captioner = make_captioner(model, options.decoding, options.batch_size, device,
                                                    options.dtype)
        self.extractor = KeyphraseExtractor(options.keybert, keybert, device) if keybert else None

    def _keywords(self, metas: list[dict[str, Any]], wanted: list[int]) -> dict[int, list[Keyword]]:
        if self.extractor is None:
            return {i: tag_keywords(as_strings(metas[i].get("tag")), self.ontology, self.options.synonyms)
                    for i in wanted}
        docs = [description_text(metas[i], self.options.keybert.field) for i in wanted]
        phrases = self.extractor.extract(docs)
        return {i: [Keyword(p) for p in found] for i, found in zip(wanted, phrases)}

    def process(self, job: ShardJob, samples: list[Sample]) -> tuple[list[Sample], list[dict[str, Any]]]:
        metas = [json.loads(sample[JSON_EXT]) for sample in samples]
        long_enough = [i for i, (sample, m) in enumerate(zip(samples, metas))
                       if sample_seconds(sample, m) >= self.options.min_seconds]
        keywords = self._keywords(metas, long_enough)
        todo = [i for i in long_enough if keywords[i]]
        seed = _shard_seed(self.options.seed, job)
        generated = dict(zip(todo, self.captioner.caption([keywords[i] for i in todo], seed)))
        new_samples, rows = [], []
        for i, (sample, meta) in enumerate(zip(samples, metas)):
            # Cut as build cuts captions: text_augment_all must not copy a 16 MiB one into the new shard.
            originals = [text[:MAX_CAPTION_CHARS] for text in as_strings(meta.get("text"))]
            raw = generated.get(i, [])
            result = postprocess(raw, keywords.get(i, []), originals)
            if i in generated:
                status = GENERATED if result.captions else ALL_DROPPED
            else:
                status = NO_KEYWORDS if i in keywords else SKIPPED_SHORT
            meta[TEXT_AUGMENT_T5_FIELD] = result.captions or None
            meta[TEXT_AUGMENT_ALL_FIELD] = originals + result.captions
            new_samples.append(_with_json(sample, meta))
            rows.append({"split": job.split, "shard": job.name, "key": sample["__key__"], "status": status,
                         "keywords": [k.text for k in keywords.get(i, [])], "generated": raw,
                         "outcomes": result.outcomes, "captions": result.captions})
        return new_samples, rows


def _make_k2c(options: K2COptions, model: ResolvedModel, keybert: ResolvedModel | None,
              ontology: dict[str, str], device: str) -> K2CProcessor:
    return K2CProcessor(options, model, keybert, ontology, device)


def _ontology_digest(path: Path | None) -> str:
    if path is None:
        raw = (resources.files("audio_dataset.k2c") / "ontology.json").read_bytes()
    else:
        raw = Path(path).read_bytes()
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def _keybert_settings(settings: KeyBertSettings, model: ResolvedModel) -> dict[str, Any]:
    return {**options_dict(settings), "revision": model.revision}


def k2c_settings(options: K2COptions, model: ResolvedModel, keybert: ResolvedModel | None) -> dict[str, Any]:
    """What reproduces the captions: model and revision, decoding, seed, keyword settings."""
    settings = {
        "model": model.spec, "revision": model.revision, "decoding": options.decoding.to_dict(),
        "seed": options.seed, "batch_size": options.batch_size, "dtype": options.dtype,
        "min_seconds": options.min_seconds,
        "keywords": options.keywords,
    }
    if keybert is None:
        settings.update(synonyms=options.synonyms, ontology=_ontology_digest(options.ontology))
    else:
        settings["keybert"] = _keybert_settings(options.keybert, keybert)
    return settings


def run_k2c(options: K2COptions, run: RunOptions) -> RunSummary:
    options.check()
    check_run(run)
    ontology = load_ontology(options.ontology) if options.keywords == "tags" else {}
    keybert = resolve_keybert_model(options.keybert, "--keybert-model") if options.keywords == "keybert" else None
    model = resolve_caption_model(options.model, options.revision)
    stage = Stage("k2c", k2c_settings(options, model, keybert),
                  functools.partial(_make_k2c, options, model, keybert, ontology), K2C_SCHEMA)
    return run_stage(stage, run)


@dataclass(frozen=True)
class KeywordsOptions:
    keybert: KeyBertSettings = field(default_factory=KeyBertSettings)
    # Replace existing tags too (default: fill only samples whose `tag` is empty).
    replace: bool = False


class KeywordsProcessor:
    def __init__(self, options: KeywordsOptions, model: ResolvedModel, device: str) -> None:
        self.options = options
        self.extractor = KeyphraseExtractor(options.keybert, model, device)

    def process(self, job: ShardJob, samples: list[Sample]) -> tuple[list[Sample], list[dict[str, Any]]]:
        metas = [json.loads(sample[JSON_EXT]) for sample in samples]
        # Blank strings are no tags: "fill empty tag lists" covers [""] too.
        todo = [i for i, m in enumerate(metas)
                if self.options.replace or not any(t.strip() for t in as_strings(m.get("tag")))]
        found = dict(zip(todo, self.extractor.extract(
            [description_text(metas[i], self.options.keybert.field) for i in todo])))
        new_samples, rows = [], []
        for i, (sample, meta) in enumerate(zip(samples, metas)):
            phrases = found.get(i, [])
            if i not in found:
                status, new = "kept", sample  # untouched: the JSON bytes stay as they were
            else:
                status = "filled" if phrases else "no_keyphrases"
                new = _with_json(sample, {**meta, "tag": phrases})
            new_samples.append(new)
            rows.append({"split": job.split, "shard": job.name, "key": sample["__key__"], "status": status,
                         "keyphrases": phrases})
        return new_samples, rows


def _make_keywords(options: KeywordsOptions, model: ResolvedModel, device: str) -> KeywordsProcessor:
    return KeywordsProcessor(options, model, device)


def run_keywords(options: KeywordsOptions, run: RunOptions) -> RunSummary:
    _check_keybert(options.keybert)
    check_run(run)
    model = resolve_keybert_model(options.keybert, "--keybert-model")
    stage = Stage("keywords", {"keybert": _keybert_settings(options.keybert, model), "replace": options.replace},
                  functools.partial(_make_keywords, options, model), KEYWORDS_SCHEMA)
    return run_stage(stage, run)


__all__ = ["K2COptions", "KeywordsOptions", "run_k2c", "run_keywords"]
