"""What the curation stages share: a sample's audio and captions, a model's identity, small tables."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from audio_dataset.k2c.keywords import as_strings
from audio_dataset.k2c.stages import AUDIO_EXTS
from audio_dataset.schema import JSON_EXT, MAX_CAPTION_CHARS, load_json_object
from audio_dataset.shards import Sample
from audio_dataset.source import UserError
from audio_dataset.storage import open_data, read_json
from clap_model.files import tree_sha256

OK = "ok"
NO_AUDIO = "no_audio"  # no audio member, or one that does not decode


def sample_meta(sample: Sample) -> dict[str, Any]:
    return load_json_object(sample[JSON_EXT])


def audio_ext(sample: Sample) -> str | None:
    """The extension of the sample's audio member (flac in our shards; wav, ogg, mp3 in others')."""
    return next((ext for ext in AUDIO_EXTS if ext in sample), None)


def audio_bytes(sample: Sample) -> bytes | None:
    ext = audio_ext(sample)
    return sample[ext] if ext else None  # type: ignore[return-value]


def captions(meta: dict[str, Any]) -> list[str]:
    """The sample's captions as a text encoder reads them: each cut to MAX_CAPTION_CHARS (a JSON
    member holds up to 16 MiB; a text model's memory grows with what it is given)."""
    return [text[:MAX_CAPTION_CHARS] for text in as_strings(meta.get("text")) if text.strip()]


def file_digest(path: Path) -> str:
    """sha256 of a checkpoint file, or of a checkpoint folder's files (names and bytes) in order."""
    if not (path.is_dir() or path.is_file()):  # a FIFO or device would block or never end
        raise UserError(f"{path}: not a regular file or folder")
    return "sha256:" + tree_sha256(path)


def model_identity(checkpoint: Path, preset: str | None, max_checkpoint_bytes: int | None = None,
                   text_model: str | None = None) -> dict[str, Any]:
    """What names the embedding space: the checkpoint's digest and the model it builds. Loads the
    model once in the driver, so a checkpoint that does not load fails before any worker starts."""
    from clap_model.checkpoint import load_model
    from clap_model.config import RunFailure, UsageError

    if not checkpoint.exists():
        raise UserError(f"--checkpoint {checkpoint}: not found")
    try:
        cfg = load_model(checkpoint, preset, text_model, max_bytes=max_checkpoint_bytes).cfg
    except (UsageError, RunFailure) as exc:  # RunFailure: its text tower's config is on an unreachable hub
        raise UserError(f"--checkpoint {checkpoint}: {exc}") from None
    return {"checkpoint": str(checkpoint.resolve()), "digest": file_digest(checkpoint), "preset": preset,
            "audio": f"{cfg.audio.model_type}-{cfg.audio.model_name}", "text": cfg.text.name_or_path,
            "joint_dim": cfg.joint_dim, "sample_rate": cfg.audio.sample_rate, "fusion": cfg.enable_fusion,
            "window_seconds": cfg.audio.clip_samples / cfg.audio.sample_rate}


def read_run_settings(folder: UPath, stage_name: str) -> dict[str, Any]:
    """The settings a finished stage recorded in FOLDER/.NAME/run.json."""
    path = folder / f".{stage_name}" / "run.json"
    if not path.exists():
        raise UserError(f"{folder}: no finished `{stage_name}` run (run `audiodata {stage_name}` first)")
    settings = read_json(path).get("settings")
    if not isinstance(settings, dict):
        raise UserError(f"{path}: unreadable (no settings record); rerun `audiodata {stage_name}`")
    return settings


def read_columns(path: UPath, columns: list[str]) -> pa.Table:
    """Some columns of a parquet file, only their bytes read (a part's embeddings or hashes are not
    read when only keys are wanted)."""
    with open_data(path) as handle:
        return pq.ParquetFile(handle).read(columns=columns)


def as_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> np.ndarray:
    """A fixed-size-list column as an (N, dim) float32 array, without a Python loop."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return array.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def npy_bytes_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """An .npy header, so a split's matrix can be streamed to disk shard by shard."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return buffer.getvalue()


__all__ = ["NO_AUDIO", "OK", "audio_bytes", "audio_ext", "as_matrix", "captions", "file_digest", "model_identity",
           "npy_bytes_header", "read_columns", "read_run_settings", "sample_meta"]
