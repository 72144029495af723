"""Data is never code: a shard list read from a split folder's sizes.json never becomes a command, a
path outside the folder or a URL; a dataset's recorded checkpoint is never loaded on its own."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from audio_dataset.cli import main as audiodata
from audio_dataset.curate.common import file_digest
from audio_dataset.curate.embed import ROW_COLUMNS
from clap_model import evaluate as clap_eval
from clap_model import main as clap_main
from test_clap_data import build_clap_shards  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# sizes.json keys a hostile dataset could list: a command, a way out of the folder, an absolute
# path, URLs. Each is refused before anything is opened.
HOSTILE_NAMES = ["pipe:sh x", "../outside.tar", "/etc/passwd", "file:///etc/passwd", "http://127.0.0.1:9/x.tar",
                 "sub/000000.tar"]


def _tiny_checkpoint(path: Path, payload: object | None = None) -> Path:
    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    torch.manual_seed(0)
    model = CLAP(get_preset("tiny"), pretrained_text=False)
    state = {"config": model.cfg.to_dict(), "state_dict": model.state_dict()}
    torch.save(state if payload is None else {**state, "x": payload}, path)
    return path


class _Touch:
    """Unpickling this runs `touch MARKER`: a checkpoint that is code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile_shards")
    build_clap_shards(out, clips=4, seconds=2.0, per_shard=4, augment=False)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _hostile_split(tmp_path: Path, shards: Path, name: str) -> tuple[Path, Path]:
    """A split folder whose sizes.json lists `name` beside a real shard; `x` would make MARKER."""
    split = tmp_path / "data" / "split"
    split.mkdir(parents=True)
    marker = tmp_path / "MARKER"
    (split / "000000.tar").write_bytes((shards / "000000.tar").read_bytes())
    (split / "x").write_text(f"touch {marker}\n")
    (split / "pipe:sh x").write_bytes(b"")  # so an existence check alone would pass it
    (tmp_path / "data" / "outside.tar").write_bytes((shards / "000000.tar").read_bytes())
    (split / "sizes.json").write_text(json.dumps({"000000.tar": 4, name: 4}))
    return split, marker


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_clap_train_refuses_a_shard_list_that_is_not_plain_names(shards, tmp_path, capsys, monkeypatch, name):
    split, marker = _hostile_split(tmp_path, shards, name)
    for data in (str(split), "."):  # `.` once made `pipe:sh x` a bare pipe: URL
        monkeypatch.chdir(split)
        code = clap_main.main(["--train-data", data, "--model", "tiny", "--batch-size", "2", "--workers", "0",
                               "--epochs", "1", "--train-num-samples", "8", "--out", str(tmp_path / "run")])
        line = _one_line(capsys)
        assert code == 2 and repr(name) in line and "refusing to read it" in line, line
        assert not marker.exists() and not (tmp_path / "run" / "latest.pt").exists()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_clap_eval_refuses_a_shard_list_that_is_not_plain_names(shards, checkpoint, tmp_path, capsys, monkeypatch,
                                                                  name):
    split, marker = _hostile_split(tmp_path, shards, name)
    for data in (str(split), "."):
        monkeypatch.chdir(split)
        code = clap_eval.main(["--checkpoint", str(checkpoint), "--val-data", data, "--batch-size", "2",
                               "--workers", "0", "--device", "cpu"])
        line = _one_line(capsys)
        assert code == 2 and repr(name) in line and "refusing to read it" in line, line
        assert not marker.exists()


def test_a_plain_shard_list_still_evaluates(shards, checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(shards)
    assert clap_eval.main(["--checkpoint", str(checkpoint), "--val-data", ".", "--batch-size", "2",
                           "--workers", "0", "--device", "cpu"]) == 0
    assert "R@1" in capsys.readouterr().out


def _embedded(dataset: Path, recorded: Path) -> None:
    """An `embed` output whose run.json names `recorded` (with its real sha256) as the model."""
    from clap_model.config import get_preset

    import faiss

    embed = dataset / "embed"
    (embed / ".embed").mkdir(parents=True)
    dim = get_preset("tiny").joint_dim
    settings = {"model": {"checkpoint": str(recorded), "digest": file_digest(recorded), "preset": None}}
    (embed / ".embed" / "run.json").write_text(json.dumps({"settings": settings}))
    vectors = np.eye(2, dim, dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    (embed / "train.audio.faiss").write_bytes(faiss.serialize_index(index).tobytes())
    rows = {"split": ["train"] * 2, "shard": ["000000.tar"] * 2, "key": ["a", "b"], "member": ["a.flac", "b.flac"],
            "source": ["test"] * 2, "caption": ["a dog", "a cat"], "duration": [1.0, 1.0], "status": ["ok"] * 2,
            "similarity": [0.0, 0.0]}
    pq.write_table(pa.table({name: rows[name] for name in ROW_COLUMNS}), embed / "train.rows.parquet")


def test_search_never_loads_the_checkpoint_a_dataset_names(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    dataset = tmp_path / "shared-dataset"
    hostile = _tiny_checkpoint(tmp_path / "hostile.pt", _Touch(marker))
    _embedded(dataset, hostile)
    code = audiodata(["search", str(dataset), "dog"])
    line = _one_line(capsys)
    assert code == 2 and "needs --checkpoint" in line and str(hostile) in line, line
    assert not marker.exists()


def test_search_loads_the_checkpoint_the_user_names_when_its_sha256_matches(tmp_path, capsys):
    dataset = tmp_path / "dataset"
    recorded = _tiny_checkpoint(tmp_path / "recorded.pt")  # a well-formed model, still the dataset's
    _embedded(dataset, recorded)
    assert audiodata(["search", str(dataset), "dog"]) == 2  # never loaded without --checkpoint
    assert "needs --checkpoint" in _one_line(capsys)
    assert audiodata(["search", str(dataset), "dog", "--checkpoint", str(recorded), "--json"]) == 0
    assert {hit["key"] for hit in json.loads(capsys.readouterr().out)} == {"a", "b"}
    other = tmp_path / "other.pt"
    torch.save({"config": {}, "state_dict": {}}, other)
    assert audiodata(["search", str(dataset), "dog", "--checkpoint", str(other)]) == 2
    assert "is not the model the embeddings were made with" in _one_line(capsys)


def test_a_recipe_never_moves_a_file_its_sources_sizes_json_points_outside(tmp_path):
    """A recipe moves each source's shards by the names in its sizes.json: a name leading out of
    the split folder would move any file into the dataset."""
    from upath import UPath

    from audio_dataset.recipe import RecipeSource, publish, result_dir
    from audio_dataset.source import UserError

    out = UPath(tmp_path / "out")
    entry = RecipeSource(name="clips", source="local")
    split = Path(result_dir(out, entry).path) / "train"
    split.mkdir(parents=True)
    precious = tmp_path / "precious.txt"
    precious.write_text("not a shard")
    (split / "sizes.json").write_text(json.dumps({"../../../../precious.txt": 1}))
    with pytest.raises(UserError, match="refusing to move it"):
        publish(out, entry)
    assert precious.read_text() == "not a shard" and not list((tmp_path / "out").glob("train/*"))
