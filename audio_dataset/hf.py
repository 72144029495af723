"""Load a build output with Hugging Face `datasets` (its packaged "webdataset" builder).

Left to itself the builder types `.flac` as `datasets.Audio`, whose decoder (torchcodec) needs
system FFmpeg and CUDA libraries. We pass explicit features instead, derived from `SampleMeta`,
keep the FLAC as bytes and decode on access with soundfile into the usual
`{"array", "sampling_rate"}` dict under `audio`, so nothing beyond `datasets` and soundfile is needed.
"""
from __future__ import annotations

import dataclasses
import io
import types
import typing
from typing import Any

import numpy as np
import soundfile
from upath import UPath

from audio_dataset.schema import AUDIO_EXT, JSON_EXT, TEXT_AUGMENT_ALL_FIELD, TEXT_AUGMENT_T5_FIELD, SampleMeta
from audio_dataset.shards import shard_paths
from audio_dataset.source import UserError
from audio_dataset.storage import Location, is_local, location

if typing.TYPE_CHECKING:
    import datasets

AUDIO_COLUMN = "audio"
# Optional JSON fields we know the type of (k2c's captions, the build's licence fields); other extras are not kept.
_OPTIONAL_FIELDS = {TEXT_AUGMENT_T5_FIELD: list[str], TEXT_AUGMENT_ALL_FIELD: list[str],
                    "license_id": str, "license_class": str}  # licences: audio_dataset/licenses.py


def _feature(hint: Any) -> Any:
    """A `datasets` feature for one SampleMeta type hint (every Arrow column is nullable)."""
    from datasets import Json, List, Value

    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _feature(args[0])
    if typing.get_origin(hint) is list:
        return List(_feature(args[0]))
    if typing.get_origin(hint) is dict:
        return Json()  # free-form per source (original_data)
    scalar = {str: "string", int: "int64", float: "float64", bool: "bool"}
    if hint not in scalar:
        raise TypeError(f"no datasets feature for {hint!r}")
    return Value(scalar[hint])


def hf_features() -> "datasets.Features":
    """Features of one shard sample: key, URL, FLAC bytes and the JSON as a typed struct."""
    from datasets import Features, Value

    hints = typing.get_type_hints(SampleMeta)
    meta = {f.name: _feature(hints[f.name]) for f in dataclasses.fields(SampleMeta) if f.name != "extra"}
    meta.update({name: _feature(hint) for name, hint in _OPTIONAL_FIELDS.items()})
    return Features({"__key__": Value("string"), "__url__": Value("string"),
                     AUDIO_EXT: Value("binary"), JSON_EXT: meta})


def decode_flac(data: bytes) -> dict[str, Any]:
    """FLAC bytes -> {"array": float32 (frames,) mono or (channels, frames), "sampling_rate": Hz}."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    array = samples[:, 0] if samples.shape[1] == 1 else samples.T
    return {"array": np.ascontiguousarray(array), "sampling_rate": int(rate)}


def _decode_batch(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
    decoded = {name: values for name, values in batch.items() if name != AUDIO_EXT}
    decoded[AUDIO_COLUMN] = [decode_flac(data) for data in batch[AUDIO_EXT]]
    return decoded


def load_hf_dataset(out: Location, split: str = "train", *, streaming: bool = False,
                    cache_dir: str | None = None) -> "datasets.Dataset | datasets.IterableDataset":
    """One split of a build output as a `datasets.Dataset` (or `IterableDataset` when streaming).

    Rows hold `__key__`, `__url__`, `json` (the sample JSON) and `audio` (decoded on access); the raw
    FLAC bytes stay in the Arrow table (`ds.with_format(None)["flac"]`). A local output is read in
    place; an fsspec URL (s3://...) is downloaded into the datasets cache, which `datasets` refuses
    in offline mode, or read lazily with `streaming=True`, which works offline too.
    """
    import datasets

    root = location(out)
    files = shard_paths(root / split)
    if not files:
        raise UserError(f"{root / split} has no shards")
    data_files = [p.path if is_local(p) else str(p) for p in files]
    storage = {} if is_local(root) else {root.protocol: dict(root.storage_options)}
    ds = datasets.load_dataset("webdataset", data_files={split: data_files}, split=split,
                               features=hf_features(), streaming=streaming, cache_dir=cache_dir,
                               storage_options=storage)
    if streaming:  # an IterableDataset decodes lazily as it iterates
        return ds.map(_decode_batch, batched=True, remove_columns=[AUDIO_EXT])
    return ds.with_transform(_decode_batch)
