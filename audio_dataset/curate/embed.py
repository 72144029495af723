"""`audiodata embed`: CLAP audio and text embeddings of every sample, a shard-to-table stage.

OUT/embed/ (or --out) gets, per input shard, SPLIT/NNNNNN.parquet (key, source, first caption,
duration, status, audio-text `similarity`, `audio` and `text` embeddings as fixed-size lists); per
split, SPLIT.audio.npy and SPLIT.text.npy (rows in shard order) with SPLIT.rows.parquet naming each
row, and SPLIT.audio.faiss, the index `audiodata search` reads. A sample's text embedding is the
L2-normalised mean of its captions' embeddings. The model's identity (checkpoint digest, config)
is recorded in .embed/run.json and checked by every stage that reads the embeddings.

Audio is read as `clap-train`'s loader reads it (`read_clip`: int16 at the model's rate, only the
model's window decoded when the clip is at that rate). `--windows first` (the default) embeds a
clip's first window, as evaluation does; `--windows all` (curation) embeds every window covering the
clip (the last one ends at the clip's end) and keeps their normalised mean, so a 30 s clip is not
judged by its first 10 s. A fusion model sees the whole clip either way.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import soundfile
from upath import UPath

from audio_dataset.curate.common import NO_AUDIO, OK, as_matrix, audio_bytes, audio_ext, captions, \
    model_identity, npy_bytes_header, read_columns, read_run_settings, sample_meta
from audio_dataset.curate.index import INDEX_KINDS, IndexBuilder, index_settings, save_index
from audio_dataset.manifest import read_parquet, write_parquet
from audio_dataset.shards import Sample
from audio_dataset.source import UserError
from audio_dataset.stage_runner import READ, RunOptions, RunSummary, ShardJob, Stage, check_run, run_stage
from audio_dataset.storage import StagedFile, location

EMBED_STAGE = "embed"
NO_TEXT = "no_text"
WINDOWS = ("first", "all")
PRECISIONS = ("bf16", "fp32")
ROW_COLUMNS = ["split", "shard", "key", "member", "source", "caption", "duration", "status", "similarity"]


def embed_schema(dim: int) -> pa.Schema:
    vector = pa.list_(pa.float32(), dim)
    return pa.schema([
        ("split", pa.string()), ("shard", pa.string()), ("key", pa.string()), ("member", pa.string()),
        ("source", pa.string()), ("caption", pa.string()), ("duration", pa.float64()), ("status", pa.string()),
        ("similarity", pa.float32()), ("audio", vector), ("text", vector),
    ])


@dataclass(frozen=True)
class EmbedOptions:
    checkpoint: Path
    # A LAION-CLAP release carries no config: the preset it was trained as (htsat-tiny-roberta, ...).
    preset: str | None = None
    batch_size: int = 32
    index: str = "auto"
    windows: str = "first"  # first | all: the clip's first model window, or the mean over all windows
    max_checkpoint_bytes: int | None = None  # what loading the checkpoint may allocate (default: by its size)
    text_model: str | None = None  # the user's text model for a checkpoint whose own is no preset's
    precision: str | None = None  # bf16 | fp32; None: bf16 on CUDA, fp32 on CPU (as clap-train), recorded resolved

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError("--batch-size must be at least 1")
        if self.index not in INDEX_KINDS:
            raise UserError(f"--index must be one of {', '.join(INDEX_KINDS)}")
        if self.windows not in WINDOWS:
            raise UserError(f"--windows must be one of {', '.join(WINDOWS)}")
        if self.precision not in (None, *PRECISIONS):
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}")


def _decode(data: bytes | None, spec) -> np.ndarray | None:
    """int16 mono PCM at the model's rate, as `clap-train` reads it; None if it does not decode."""
    from clap_model.data import read_clip

    if data is None:
        return None
    try:
        wave = read_clip(data, spec, None)
    except (RuntimeError, ValueError, soundfile.LibsndfileError):  # one bad member is that sample's status only
        return None
    return wave if len(wave) else None


def window_starts(length: int, window: int) -> list[int]:
    """Starts of the windows covering `length` samples: every `window`, the last ending at the end."""
    if length <= window:
        return [0]
    count = -(-length // window)
    return [*range(0, (count - 1) * window, window), length - window]


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class EmbedProcessor:
    def __init__(self, options: EmbedOptions, device: str) -> None:
        from clap_model.inference import CLAPInference

        self.clap = CLAPInference.from_checkpoint(options.checkpoint, model=options.preset, device=device,
                                                  text_model=options.text_model, precision=options.precision,
                                                  max_checkpoint_bytes=options.max_checkpoint_bytes)
        self.batch_size = options.batch_size
        self.dim = self.clap.model.cfg.joint_dim
        spec = self.clap.spec
        # --windows all reads the whole clip (up to the fusion limit, 600 s) to cut it into windows.
        self.windowed = options.windows == "all" and spec.truncating != "fusion"
        self.read_spec = replace(spec, clip_samples=spec.max_fusion_samples) if self.windowed else spec

    def embed_texts(self, texts_per_sample: list[list[str]]) -> np.ndarray:
        """(N, dim): each sample's normalised mean caption embedding (zeros without captions)."""
        flat = [text for texts in texts_per_sample for text in texts]
        owners = np.repeat(np.arange(len(texts_per_sample)), [len(texts) for texts in texts_per_sample])
        emb = self.clap.embed_text(flat, batch_size=self.batch_size).numpy()
        sums = np.zeros((len(texts_per_sample), self.dim), np.float32)
        np.add.at(sums, owners, emb)
        return np.where(np.linalg.norm(sums, axis=1, keepdims=True) > 0, _unit(sums), 0).astype(np.float32)

    def embed_waves(self, waves: list[np.ndarray | None]) -> np.ndarray:
        """(N, dim): each clip's embedding (its windows' normalised mean when windowed); zeros for None."""
        pieces, owners = [], []
        window = self.clap.spec.clip_samples
        for i, wave in enumerate(waves):
            if wave is None:
                continue
            starts = window_starts(len(wave), window) if self.windowed else [0]
            pieces += [wave[start : start + window] for start in starts] if self.windowed else [wave]
            owners += [i] * len(starts)
        audio = np.zeros((len(waves), self.dim), np.float32)
        if pieces:
            emb = self.clap.embed_audio(pieces, sample_rate=self.clap.spec.sample_rate,
                                        batch_size=self.batch_size).numpy()
            np.add.at(audio, np.array(owners), emb)
            if self.windowed:
                found = sorted(set(owners))
                audio[found] = _unit(audio[found])
        return audio

    def prepare(self, job: ShardJob, samples: list[Sample]) -> list[np.ndarray | None]:
        """Each sample's audio at the model's rate (None: none usable); the worker runs this while
        the model embeds the shard before."""
        del job
        return [_decode(audio_bytes(sample), self.read_spec) for sample in samples]

    def process(self, job: ShardJob, samples: list[Sample],
                prepared: list[np.ndarray | None] | None = None) -> tuple[list[Sample], list[dict[str, Any]]]:
        metas = [sample_meta(sample) for sample in samples]
        waves = prepared if prepared is not None else self.prepare(job, samples)
        texts = [captions(meta) for meta in metas]
        audio, text = self.embed_waves(waves), self.embed_texts(texts)
        rows = []
        for sample, meta, wave, caps, a, t in zip(samples, metas, waves, texts, audio, text):
            status = NO_AUDIO if wave is None else NO_TEXT if not caps else OK
            ext = audio_ext(sample)
            member = f"{sample['__key__']}.{ext}" if ext else None
            rows.append({"split": job.split, "shard": job.name, "key": sample["__key__"], "member": member,
                         "source": meta.get("source"), "caption": caps[0] if caps else None,
                         "duration": meta.get("duration"), "status": status,
                         "similarity": float(a @ t) if status == OK else None, "audio": a, "text": t})
        return [], rows


def effective_precision(precision: str | None, device: str) -> str:
    """--precision, or clap_model's default for the device (as CLAPInference): bf16 on CUDA, else fp32."""
    return precision or ("bf16" if device == "cuda" else "fp32")


def _make_embed(options: EmbedOptions, device: str) -> EmbedProcessor:
    return EmbedProcessor(replace(options, precision=effective_precision(options.precision, device)), device)


def _precision_setting(options: EmbedOptions, device: str | None, recorded: dict[str, Any]) -> dict[str, Any]:
    """The precision the workers on `device` run in, recorded: a GPU run (bf16) resumed on a CPU
    (fp32) without --precision is refused by the settings check, not mixed into one output. Refused
    rather than carried on in the recorded precision, as every other setting is: the user picks with
    --precision (bf16 on a CPU without bf16 instructions is many times slower than fp32). With no
    shard left to embed (`device` None) the precision the shards were made in stands."""
    kept = recorded.get("precision", "")
    if options.precision is None and kept in (None, *PRECISIONS) and (device is None or kept is None):
        # Nothing left to run, or an earlier version's run.json (the device's default, unresolved):
        # it resumes as it was. Any other recorded value (run.json is anyone's) is compared, and refused.
        return {"precision": kept}
    return {"precision": effective_precision(options.precision, device or "cpu")}


def split_files(out: UPath, split: str) -> dict[str, UPath]:
    return {"audio": out / f"{split}.audio.npy", "text": out / f"{split}.text.npy",
            "rows": out / f"{split}.rows.parquet", "index": out / f"{split}.audio.faiss"}


def _finish_split(out: UPath, split: str, parts: list[UPath], dim: int, index_kind: str) -> None:
    """Stream the split's parts into its .npy files (memory: one shard at a time) and its index."""
    files = split_files(out, split)
    count = sum(read_parquet(part).num_rows for part in parts)
    staged = {name: StagedFile(files[name]) for name in ("audio", "text")}
    builder = IndexBuilder(index_kind, dim, count) if index_kind != "none" else None
    if builder is not None and builder.train_size:
        builder.train(_rows_of(parts, builder.train_rows(), dim))
    rows = []
    try:
        for handle in staged.values():
            handle.handle.write(npy_bytes_header((count, dim), np.float32))
        for part in parts:
            table = read_parquet(part)
            for name, handle in staged.items():
                matrix = as_matrix(table.column(name), dim)
                handle.handle.write(np.ascontiguousarray(matrix).tobytes())
                if name == "audio" and builder is not None:
                    builder.add(matrix)
            rows.append(table.select(ROW_COLUMNS))
    except BaseException:
        for handle in staged.values():
            handle.abort()
        raise
    for handle in staged.values():
        handle.commit()
    write_parquet(pa.concat_tables(rows), files["rows"])
    if builder is not None:
        save_index(builder.finish(), files["index"])


def _rows_of(parts: list[UPath], wanted: np.ndarray, dim: int) -> np.ndarray:
    """The audio embeddings at rows `wanted` (sorted) of the split the parts make, a part at a time."""
    found, start = [], 0
    for part in parts:
        matrix = as_matrix(read_columns(part, ["audio"]).column("audio"), dim)
        local = wanted[(wanted >= start) & (wanted < start + len(matrix))] - start
        found.append(matrix[local])
        start += len(matrix)
    return np.concatenate(found)


def _finish(dim: int, index_kind: str, out: UPath, jobs: list[ShardJob]) -> None:
    by_split: dict[str, list[UPath]] = {}
    for job in jobs:
        by_split.setdefault(job.split, []).append(location(job.part))
    for split, parts in by_split.items():
        _finish_split(out, split, parts, dim, index_kind)


def default_out(dataset: UPath) -> UPath:
    return dataset / EMBED_STAGE


def run_embed(options: EmbedOptions, run: RunOptions) -> RunSummary:
    options.check()
    check_run(run)
    identity = model_identity(options.checkpoint, options.preset, options.max_checkpoint_bytes, options.text_model)
    settings = {"model": identity, "batch_size": options.batch_size, "index": options.index,
                "index_parameters": index_settings(options.index), "windows": options.windows,
                "window_seconds": None if identity["fusion"] else identity["window_seconds"]}
    stage = Stage(EMBED_STAGE, settings, functools.partial(_make_embed, options), embed_schema(identity["joint_dim"]),
                  mode=READ, finish=functools.partial(_finish, identity["joint_dim"], options.index),
                  device_settings=functools.partial(_precision_setting, options))
    return run_stage(stage, run)


def embedding_model(embed_dir: UPath) -> dict[str, Any]:
    """The model identity a finished embed run recorded."""
    model = read_run_settings(embed_dir, EMBED_STAGE).get("model")
    if not (isinstance(model, dict) and type(model.get("digest")) is str):  # compared with a checkpoint's sha256
        raise UserError(f"{embed_dir}: its run.json records no model digest; rerun `audiodata {EMBED_STAGE}`")
    return model


__all__ = ["EmbedOptions", "embed_schema", "embedding_model", "run_embed", "split_files"]
