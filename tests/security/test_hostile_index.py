"""An index file in an embed output is data: `audiodata search` refuses a foreign, mismatched,
oversized, truncated or corrupted one with one line and exit 2, before faiss's reader allocates what
the file declares or a search follows an id or a graph link out of range."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from upath import UPath

from audio_dataset.cli import main as audiodata
from audio_dataset.curate.common import file_digest
from audio_dataset.curate.embed import ROW_COLUMNS
from audio_dataset.curate.index import load_index
from audio_dataset.source import UserError

COUNT, DIM = 40, 128  # the tiny preset's joint_dim


def _vectors(count: int = COUNT) -> np.ndarray:
    vectors = np.random.default_rng(0).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _flat(count: int = COUNT):
    import faiss

    index = faiss.IndexFlatIP(DIM)
    index.add(_vectors(count))
    return index


def _ivf(pq: bool = False, sq: str | None = None):
    """IVF-flat, IVF-PQ, or with `sq` (a faiss QT_ name) dedup's scalar-quantised kind."""
    import faiss

    quantizer = faiss.IndexFlatIP(DIM)
    if sq:
        index = faiss.IndexIVFScalarQuantizer(quantizer, DIM, 2, getattr(faiss.ScalarQuantizer, sq),
                                              faiss.METRIC_INNER_PRODUCT)
    else:
        index = (faiss.IndexIVFPQ(quantizer, DIM, 2, 16, 8, faiss.METRIC_INNER_PRODUCT) if pq else
                 faiss.IndexIVFFlat(quantizer, DIM, 2, faiss.METRIC_INNER_PRODUCT))
    index.train(_vectors(300))  # 256 codewords per sub-quantizer need as many vectors
    index.add(_vectors())
    return index, quantizer


def _hnsw():
    import faiss

    index = faiss.IndexHNSWFlat(DIM, 4, faiss.METRIC_INNER_PRODUCT)
    index.add(_vectors())
    return index


def _bytes(index) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def _hnsw_with(change) -> bytes:
    import faiss

    index = _hnsw()
    change(index, faiss)
    return _bytes(index)


def _link_out_of_range(index, faiss) -> None:
    links = faiss.vector_to_array(index.hnsw.neighbors)
    links[np.flatnonzero(links >= 0)[3]] = COUNT + 7
    faiss.copy_array_to_vector(links, index.hnsw.neighbors)


def _level_out_of_range(index, faiss) -> None:
    levels = faiss.vector_to_array(index.hnsw.levels)
    levels[5] = 60
    faiss.copy_array_to_vector(levels, index.hnsw.levels)


def _entry_out_of_range(index, faiss) -> None:
    index.hnsw.entry_point = COUNT + 1


def _ivf_id_out_of_range() -> bytes:
    import faiss

    index, _quantizer = _ivf()
    lists = faiss.downcast_InvertedLists(index.invlists)
    number = next(n for n in range(index.nlist) if lists.list_size(n))
    codes = faiss.rev_swig_ptr(lists.get_codes(number), lists.code_size).copy()
    lists.update_entry(number, 0, COUNT + 3, faiss.swig_ptr(codes))
    return _bytes(index)


def _vector_bomb() -> bytes:
    """A flat index whose vector declares 2**36 bytes: faiss would allocate them before reading."""
    data = bytearray(_bytes(_flat()))
    struct.pack_into("<Q", data, 37, 1 << 34)  # the codes' length, in floats, after the 37-byte header
    return bytes(data)


def _foreign() -> bytes:
    import faiss

    index = faiss.IndexFlatL2(DIM)  # another metric: scores are not cosines
    index.add(_vectors())
    return _bytes(index)


HOSTILE = {
    "a file of text": (lambda: b"not an index at all, just text", "type"),
    "an empty file": (lambda: b"", "truncated"),
    "an L2 index": (_foreign, "type b'IxF2'"),
    "more vectors than rows": (lambda: _bytes(_flat(COUNT + 1)), "41 vectors of 128 dimensions where the split has 40"),
    "a truncated index": (lambda: _bytes(_hnsw())[:-500], "unreadable"),
    "a vector declaring 64 GiB": (_vector_bomb, "unreadable"),
    "an oversized file": (lambda: _bytes(_flat()) + bytes(8 << 20), "bytes for 40 vectors"),
    "a graph link out of range": (lambda: _hnsw_with(_link_out_of_range), "out of range"),
    "a node level out of range": (lambda: _hnsw_with(_level_out_of_range), "level"),
    "an entry point out of range": (lambda: _hnsw_with(_entry_out_of_range), "entry"),
    "an inverted-list id out of range": (_ivf_id_out_of_range, "an id out of range"),
    "a scalar quantizer of 4 bits": (lambda: _bytes(_ivf(sq="QT_4bit")[0]), "scalar quantizer"),
    "a scalar quantizer of fp16": (lambda: _bytes(_ivf(sq="QT_fp16")[0]), "scalar quantizer"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_the_loader_refuses_a_hostile_index(tmp_path, name):
    make, why = HOSTILE[name]
    path = tmp_path / "train.audio.faiss"
    path.write_bytes(make())
    with pytest.raises(UserError, match="not an index `audiodata embed` writes") as caught:
        load_index(UPath(path), COUNT, DIM)
    assert why in str(caught.value)


class _GrowsOnceMeasured:
    """An index path whose file grows as soon as it is measured: a writer appending between the
    loader's size check and its read."""

    def __init__(self, path: Path, more: bytes) -> None:
        self.path, self.more = UPath(path), more

    def stat(self):
        measured = self.path.stat()
        with open(self.path.path, "ab") as handle:
            handle.write(self.more)
        return measured

    def open(self, mode: str):
        return self.path.open(mode)

    def __fspath__(self) -> str:  # opened by name, as the loader opens every data file
        return self.path.path

    def __str__(self) -> str:
        return str(self.path)


def test_the_loader_reads_no_more_than_it_measured(tmp_path):
    """The size bound (and faiss's limits, set from it) hold for the bytes measured: what a file
    gains after is not read, so half an index completed since is refused as truncated."""
    good = _bytes(_ivf()[0])
    path = tmp_path / "train.audio.faiss"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="unreadable"):
        load_index(_GrowsOnceMeasured(path, good[len(good) // 2 :]), COUNT, DIM)
    assert path.read_bytes() == good and load_index(UPath(path), COUNT, DIM).ntotal == COUNT


@pytest.mark.parametrize("make", [_flat, lambda: _ivf()[0], lambda: _ivf(pq=True)[0], _hnsw,
                                  lambda: _ivf(sq="QT_8bit")[0]])
def test_corrupted_bytes_are_refused_or_load_whole(tmp_path, make):
    """Random bytes overwritten anywhere in a good index: refused, or an index whose every search
    stays in range (a flipped vector value is still a valid file)."""
    good = _bytes(make())
    path = tmp_path / "train.audio.faiss"
    path.write_bytes(good)
    assert load_index(UPath(path), COUNT, DIM).ntotal == COUNT
    rng = np.random.default_rng(1)
    for _ in range(25):
        data = bytearray(good)
        for at in rng.integers(16, len(data), 4):
            data[at] = int(rng.integers(0, 256))
        path.write_bytes(bytes(data))
        try:
            index = load_index(UPath(path), COUNT, DIM)
        except UserError:
            continue
        _, ids = index.search(_vectors(5), 10)
        assert ((ids >= -1) & (ids < COUNT)).all()


def _embed_output(dataset: Path, index_bytes: bytes) -> Path:
    """An `embed` output of two rows made by a tiny model, with the given index file."""
    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    torch.manual_seed(0)
    model = CLAP(get_preset("tiny"), pretrained_text=False)
    checkpoint = dataset.parent / "tiny.pt"
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, checkpoint)
    embed = dataset / "embed"
    (embed / ".embed").mkdir(parents=True)
    settings = {"model": {"checkpoint": str(checkpoint), "digest": file_digest(checkpoint), "preset": None}}
    (embed / ".embed" / "run.json").write_text(json.dumps({"settings": settings}))
    (embed / "train.audio.faiss").write_bytes(index_bytes)
    rows = {"split": ["train"] * COUNT, "shard": ["000000.tar"] * COUNT, "key": [f"k{i}" for i in range(COUNT)],
            "member": [f"k{i}.flac" for i in range(COUNT)], "source": ["test"] * COUNT,
            "caption": ["a dog"] * COUNT, "duration": [1.0] * COUNT, "status": ["ok"] * COUNT,
            "similarity": [0.0] * COUNT}
    pq.write_table(pa.table({name: rows[name] for name in ROW_COLUMNS}), embed / "train.rows.parquet")
    return checkpoint


@pytest.mark.parametrize("name", ["a graph link out of range", "a vector declaring 64 GiB", "an L2 index"])
def test_search_refuses_a_hostile_index_in_one_line(tmp_path, capsys, name):
    dataset = tmp_path / "dataset"
    checkpoint = _embed_output(dataset, HOSTILE[name][0]())
    capsys.readouterr()
    code = audiodata(["search", str(dataset), "dog", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not an index `audiodata embed` writes" in err[0], err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["train.audio.faiss", "train.rows.parquet", ".embed/run.json"])
def test_a_fifo_in_place_of_a_file_is_one_line_not_a_hang(tmp_path, capsys, name):
    """A FIFO has no end: opened and read as a file, search waited on it forever."""
    import os

    dataset = tmp_path / "dataset"
    checkpoint = _embed_output(dataset, _bytes(_flat()))
    (dataset / "embed" / name).unlink()
    os.mkfifo(dataset / "embed" / name)
    capsys.readouterr()
    code = audiodata(["search", str(dataset), "dog", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code in (1, 2) and len(err) == 1 and "not a regular file" in err[0], err


def test_search_reads_a_good_hnsw_index(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    checkpoint = _embed_output(dataset, _bytes(_hnsw()))
    capsys.readouterr()
    assert audiodata(["search", str(dataset), "dog", "--checkpoint", str(checkpoint), "--json", "-k", "3"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and all(hit["key"].startswith("k") for hit in hits)


def test_search_reranks_an_ivfpq_index_from_the_vectors_and_refuses_a_foreign_npy(tmp_path, capsys):
    from clap_model.inference import CLAPInference

    dataset = tmp_path / "dataset"
    checkpoint = _embed_output(dataset, _bytes(_ivf(pq=True)[0]))
    np.save(dataset / "embed" / "train.audio.npy", _vectors())
    query = CLAPInference.from_checkpoint(checkpoint, device="cpu").embed_text(["dog"]).numpy()[0]
    exact = [f"k{i}" for i in np.argsort(-(_vectors() @ query))[:3]]
    capsys.readouterr()
    assert audiodata(["search", str(dataset), "dog", "--checkpoint", str(checkpoint), "--json", "-k", "3"]) == 0
    assert [hit["key"] for hit in json.loads(capsys.readouterr().out)] == exact  # the exact order, re-ranked
    np.save(dataset / "embed" / "train.audio.npy", _vectors()[:, :64])  # another shape: not this split's
    assert audiodata(["search", str(dataset), "dog", "--checkpoint", str(checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "where the split has (40, 128) float32" in err[0], err
