"""Our outputs in other tools: shards in Hugging Face `datasets`, the manifest in pandas, polars, DuckDB."""
from __future__ import annotations

import io
import json
import shutil
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.build import BuildOptions, build
from audio_dataset.shards import iter_shard, read_sizes, shard_paths
from audio_dataset.source import SourceConfig
from conftest import REAL_AUDIO_DIR


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> Path:
    """The real clips in several shards, plus one unreadable and one too-short item."""
    folder = tmp_path_factory.mktemp("input")
    for path in REAL_AUDIO_DIR.iterdir():
        shutil.copy(path, folder / path.name)
    (folder / "notes.wav").write_bytes(b"<html>this is not audio</html>")
    soundfile.write(folder / "blip.wav", np.full(4_800, 0.1, np.float32), 48_000)
    out = tmp_path_factory.mktemp("built") / "out"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(folder)),
                       samples_per_shard=4, workers=2, progress=False))
    return out


@pytest.fixture
def hf_offline(monkeypatch) -> None:
    """HF offline by its own switches, and any connection off this machine fails loudly."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"network access to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)


def _shard_samples(out: Path, split: str) -> dict[str, dict]:
    return {s["__key__"]: s for path in shard_paths(out / split) for s in iter_shard(path)}


def _check_rows(rows, expected: dict[str, dict]) -> None:
    seen = set()
    for row in rows:
        sample = expected[row["__key__"]]
        meta = json.loads(sample["json"])
        assert row["json"]["text"] == meta["text"] and row["json"]["tag"] == meta["tag"]
        assert row["json"]["original_data"] == meta["original_data"]
        assert row["json"]["license"] == meta["license"] and row["json"]["segment"] is None
        reference, rate = soundfile.read(io.BytesIO(sample["flac"]), dtype="float32")
        assert row["audio"]["sampling_rate"] == rate == meta["sample_rate"]
        assert row["audio"]["array"].dtype == np.float32
        np.testing.assert_array_equal(row["audio"]["array"], reference)
        seen.add(row["__key__"])
    assert seen == set(expected)


def test_shards_load_in_hugging_face_datasets(built: Path, tmp_path: Path, hf_offline) -> None:
    from audio_dataset.hf import load_hf_dataset

    for split in ("train", "valid"):
        expected = _shard_samples(built, split)
        ds = load_hf_dataset(built, split, cache_dir=str(tmp_path / "hf-cache"))
        assert len(ds) == sum(read_sizes(built / split).values()) == len(expected)
        assert set(ds.column_names) == {"__key__", "__url__", "flac", "json"}  # stored columns
        assert set(ds[0]) == {"__key__", "__url__", "json", "audio"}  # what a row gives
        assert ds.features["json"]["sample_rate"].dtype == "int64"
        _check_rows(ds, expected)
    assert len(shard_paths(built / "train")) > 1  # several shards, one dataset


def test_hugging_face_streams_from_an_fsspec_url(built: Path, hf_offline) -> None:
    import fsspec

    from audio_dataset.hf import load_hf_dataset

    fsspec.filesystem("memory").put(str(built / "train"), "memory://hf-bucket/out/train", recursive=True)
    ds = load_hf_dataset("memory://hf-bucket/out", "train", streaming=True)
    _check_rows(list(ds), _shard_samples(built, "train"))


def test_missing_split_is_a_user_error(built: Path) -> None:
    from audio_dataset.hf import load_hf_dataset
    from audio_dataset.source import UserError

    with pytest.raises(UserError, match="has no shards"):
        load_hf_dataset(built, "test")


def test_manifest_reads_the_same_in_pandas_polars_and_duckdb(built: Path) -> None:
    import duckdb
    import pandas as pd
    import polars as pl

    path = built / manifest.MANIFEST_FILE
    ours = manifest.read_table(path).to_pylist()
    statuses = dict(Counter(r["status"] for r in ours))
    assert statuses == {"ok": 10, "dropped": 1, "failed": 1}
    keys = {r["source_id"]: r["sample_keys"] for r in ours}

    frame = pd.read_parquet(path)
    assert len(frame) == len(ours)
    assert frame["status"].value_counts().to_dict() == statuses
    assert {sid: list(k) for sid, k in zip(frame["source_id"], frame["sample_keys"])} == keys

    polars = pl.read_parquet(path)
    assert polars.height == len(ours)
    assert dict(polars["status"].value_counts().iter_rows()) == statuses
    assert polars.schema["sample_keys"] == pl.List(pl.String)
    assert dict(zip(polars["source_id"].to_list(), polars["sample_keys"].to_list())) == keys

    con = duckdb.connect()
    rows = con.execute("SELECT status, count(*) FROM read_parquet(?) GROUP BY status", [str(path)]).fetchall()
    assert dict(rows) == statuses
    listed = con.execute("SELECT source_id, sample_keys FROM read_parquet(?)", [str(path)]).fetchall()
    assert dict(listed) == keys
    # A list column works in SQL: one row per sample, matching sizes.json.
    (samples,) = con.execute("SELECT count(*) FROM (SELECT unnest(sample_keys) FROM read_parquet(?))",
                             [str(path)]).fetchone()
    assert samples == sum(sum(read_sizes(built / s).values()) for s in ("train", "valid") if (built / s).exists())
