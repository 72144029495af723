"""clap_model's webdataset loader over real shards built from tests/data/real-audio."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from dataclasses import replace
from torch.utils.data import DataLoader

from audio_dataset import audio as audio_lib
from audio_dataset.schema import SIZES_FILE, SampleMeta, safe_key, shard_name
from audio_dataset.shards import ShardWriter, write_sizes
from audio_dataset.shards import iter_shard
from clap_model.data import (BUFFER_SLOT, AudioSpec, BufferRecycling, DataError, LoaderConfig, ShardDataset, ShardSet, crop_or_fill,
                             decode_audio, expand_datasets, fill, make_loader, read_clip)
from clap_model.config import get_preset
from clap_model.text import Tokenize
from clap_model.train import to_device

REAL_AUDIO = Path(__file__).parent / "data" / "real-audio"
RATE = 48_000


def build_clap_shards(out: Path, clips: int = 8, seconds: float = 3.0, per_shard: int = 4,
                      augment: bool = True) -> list[Path]:
    """Real recordings cut to `seconds` at 48 kHz mono, written as audiodata shards + sizes.json."""
    paths = sorted(REAL_AUDIO.glob("*.ogg"))[:clips]
    counts: dict[str, int] = {}
    writer = None
    shards = []
    for i, path in enumerate(paths):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            shards.append(out / shard_name(len(shards)))
            writer = ShardWriter(shards[-1])
            counts[shards[-1].name] = 0
        side = json.loads(path.with_suffix(".json").read_text())
        decoded = audio_lib.decode(path.read_bytes())
        samples = audio_lib.resample(audio_lib.set_channels(decoded.samples, 1), decoded.sample_rate, RATE)
        samples = samples[:, : int(seconds * RATE)]
        extra = {"text_augment_t5": [f"{side['text'][0]} (t5 {i})"]} if augment else {}
        meta = SampleMeta(text=side["text"], tag=side["tag"], original_data={"file": path.name},
                          source="test", source_id=path.stem, license=side["license"], author=side["author"],
                          url=side["url"], duration=samples.shape[1] / RATE, sample_rate=RATE, channels=1,
                          extra=extra)
        writer.write({"__key__": safe_key("test", path.stem), "flac": audio_lib.encode_flac(samples, RATE),
                      "json": meta.to_json_bytes()})
        counts[shards[-1].name] += 1
    writer.close()
    write_sizes(out, counts)
    return shards


@pytest.fixture(scope="session")
def clap_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clap_shards")
    build_clap_shards(out)
    return out


def _spec(**kw) -> AudioSpec:
    return AudioSpec(sample_rate=RATE, clip_samples=RATE * 2, **kw)


def _dataset(shards: ShardSet, train: bool = True, **kw) -> ShardDataset:
    cfg = LoaderConfig(batch_size=kw.pop("batch_size", 2), audio=kw.pop("audio", _spec()), train=train, **kw)
    return ShardDataset(shards, cfg, Tokenize(get_preset("tiny").text))


def test_brace_pattern_and_sizes(clap_shards):
    shards = ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar")
    assert [Path(u).name for u in shards.urls] == ["000000.tar", "000001.tar"]
    assert shards.num_samples == 8
    with pytest.raises(DataError, match="shard not found"):
        ShardSet.from_spec(f"{clap_shards}/{{000000..000005}}.tar")


def test_weighted_datasets_draw_in_proportion(clap_shards):
    pattern = f"{clap_shards}/000000.tar::{clap_shards}/000001.tar"
    assert len(expand_datasets(pattern)) == 2
    shards = ShardSet.from_spec(pattern, "1::3")
    assert shards.weights == [4.0, 12.0]  # factor x samples per shard
    draws = Counter(random.Random(0).choices(shards.urls, weights=shards.weights, k=4000))
    assert 0.2 < draws[shards.urls[0]] / 4000 < 0.3
    with pytest.raises(DataError):
        ShardSet.from_spec(pattern, "1")


def test_one_epoch_pass_reads_every_sample_once(clap_shards):
    dataset = _dataset(ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar"), train=False, batch_size=3)
    batches = list(dataset)
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 8 and len(set(keys)) == 8
    first = batches[0]
    assert first["waveform"].shape == (3, RATE * 2) and first["waveform"].dtype == torch.int16  # 16-bit PCM
    wave = to_device(first, torch.device("cpu"))["waveform"]
    assert wave.dtype == torch.float32 and 0 < wave.abs().max() <= 1.0
    assert first["input_ids"].shape == (3, 48) and first["attention_mask"].shape == (3, 48)
    # Evaluation captions are the first `text` caption, deterministically.
    assert all("(t5" not in t for b in batches for t in b["text"])


def test_resampled_every_worker_and_rank_gets_data_and_epochs_differ(clap_shards):
    shards = ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar")
    seen = {}
    for rank in range(3):  # more ranks x workers than shards: resampling keeps each one fed
        dataset = _dataset(shards, batches_per_worker=3, seed=1)
        dataset.rank, dataset.world_size = rank, 3
        batches = list(make_loader(dataset, 2))
        assert len(batches) == 6
        seen[rank] = [k for b in batches for k in b["key"]]
    assert seen[0] != seen[1]
    again = _dataset(shards, batches_per_worker=3, seed=1)
    again.rank, again.world_size = 0, 3
    assert [k for b in make_loader(again, 2) for k in b["key"]] == seen[0]  # seeded: replayable
    again.epoch = 1
    assert [k for b in make_loader(again, 2) for k in b["key"]] != seen[0]


def test_no_resample_splits_shards_across_ranks(clap_shards):
    shards = ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar")
    keys = []
    for rank in range(2):
        dataset = _dataset(shards, resampled=False, batches_per_worker=2, shuffle_buffer=1)
        dataset.rank, dataset.world_size = rank, 2
        keys.append({k for b in dataset for k in b["key"]})
    assert len(keys[0]) == 4 and len(keys[1]) == 4 and not keys[0] & keys[1]


def test_caption_selection_uses_k2c_fields(clap_shards):
    shards = ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar")
    dataset = _dataset(shards, caption_fields=("text", "text_augment_t5"), batches_per_worker=20, batch_size=4)
    texts = [t for b in dataset for t in b["text"]]
    augmented = sum("(t5" in t for t in texts)
    assert 0.3 < augmented / len(texts) < 0.7
    only = _dataset(shards, caption_fields=("text_augment_t5",), batches_per_worker=2)
    assert all("(t5" in t for b in only for t in b["text"])


def test_pipe_and_fsspec_urls(clap_shards):
    shard = clap_shards / "000000.tar"
    for url in (f"pipe:cat -- {shard}", f"file://{shard}"):  # a command's spaces belong to it
        shards = ShardSet.from_spec(url)
        assert shards.urls == [url]
        dataset = _dataset(shards, train=False, batch_size=4)
        assert len(next(iter(dataset))["key"]) == 4


@pytest.mark.parametrize("spec, weights, message", [
    ("{dir}/{{000000..00000", None, "unbalanced braces"),
    ("  ", None, "names no shards"),
    ("{dir}/000000.tar::{dir}/000001.tar", "1::x", "non-negative numbers"),
    ("{dir}/000000.tar::{dir}/000001.tar", "1::nan", "non-negative numbers"),
    ("{dir}/000000.tar::{dir}/000001.tar", "inf::1", "non-negative numbers"),
])
def test_data_argument_mistakes_are_data_errors(clap_shards, spec, weights, message):
    with pytest.raises(DataError, match=message):
        ShardSet.from_spec(spec.format(dir=clap_shards), weights)


def test_a_caption_field_no_sample_has_stops_the_loader(clap_shards, monkeypatch):
    """Every sample unusable is a mistake to report, not to skip forever."""
    monkeypatch.setattr("clap_model.data.MAX_UNUSABLE_IN_A_ROW", 50)
    shards = ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar")
    dataset = _dataset(shards, caption_fields=("nosuch",), batches_per_worker=2)
    with pytest.raises(DataError, match=r"50 samples in a row could not be used; the last: .*no caption in \('nosuch',\)"):
        next(iter(dataset))


def test_read_clip_decodes_only_the_crop(clap_shards):
    sample = next(iter_shard(clap_shards / "000000.tar"))
    full = decode_audio(sample["flac"], RATE)
    spec = _spec()  # 2 s clips from 3 s recordings
    clip = read_clip(sample["flac"], spec, random.Random(5))
    start = random.Random(5).randint(0, len(full) - spec.clip_samples)
    assert len(clip) == spec.clip_samples and clip.dtype == np.int16
    assert np.array_equal(clip / 32768.0, full[start : start + spec.clip_samples])  # lossless for 16-bit FLAC
    assert np.array_equal(read_clip(sample["flac"], spec, None) / 32768.0, full[: spec.clip_samples])


def test_fill_and_crop_modes():
    short = np.arange(1, 4, dtype=np.float32)
    assert fill(short, 8, "repeatpad").tolist() == [1, 2, 3, 1, 2, 3, 0, 0]
    assert fill(short, 8, "repeat").tolist() == [1, 2, 3, 1, 2, 3, 1, 2]
    assert fill(short, 8, "pad").tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    spec = AudioSpec(sample_rate=10, clip_samples=8, truncating="rand_trunc")
    long = np.arange(20, dtype=np.float32)
    wave, longer, _ = crop_or_fill(long, spec, random.Random(0))
    assert len(wave) == 8 and not longer and wave[0] >= 0 and np.all(np.diff(wave) == 1)
    fusion = AudioSpec(sample_rate=10, clip_samples=8, truncating="fusion", max_fusion_samples=15)
    wave, longer, crop_u = crop_or_fill(long, fusion, None)
    assert len(wave) == 15 and longer and crop_u == [0.5, 0.5, 0.5]
    wave, longer, _ = crop_or_fill(np.ones(8, np.float32), fusion, None)
    assert len(wave) == 8 and not longer  # exactly 10 s is not "longer"


def test_loader_throughput_script_runs(clap_shards, tmp_path):
    """bench/clap_loader.py measures samples/s per worker on real shards."""
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, str(root / "bench" / "clap_loader.py"), "--train-data",
                             f"{clap_shards}/{{000000..000001}}.tar", "--workers", "1", "--batches", "4",
                             "--batch-size", "4", "--json", str(tmp_path / "loader.json")],
                            capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "loader.json").read_text())
    assert report["samples_per_s_per_worker"] > 0 and report["samples"] == 16


def test_http_shards_through_fsspec_with_a_broken_shard(clap_shards, loopback):
    """Remote shards: sizes.json read over HTTP; a shard whose connection resets is skipped."""
    for name in ("000000.tar", "000001.tar", "sizes.json"):
        loopback.add(f"/train/{name}", (clap_shards / name).read_bytes())
    shards = ShardSet.from_spec(f"{loopback.url}/train/{{000000..000001}}.tar")
    assert shards.num_samples == 8
    loopback.fault("/train/000001.tar", "reset", times=None)
    dataset = _dataset(shards, train=False, batch_size=4)
    keys = [k for b in dataset for k in b["key"]]
    assert len(keys) == 4  # the readable shard, whole


def test_recycled_batch_buffers_hold_the_same_batches(clap_shards):
    """Workers reuse the shared buffers the consumer hands back (as clap-train does after pinning)
    and the batches are what fresh buffers give; a consumer that never hands back does not stall them."""
    shards = ShardSet.from_spec(f"{clap_shards}/{{000000..000001}}.tar")
    dataset = _dataset(shards, batches_per_worker=6, seed=3, audio=_spec(filling="pad"))
    fresh = list(make_loader(dataset, 2, recycle=False))
    recycled = list(make_loader(dataset, 2, recycle=True))  # copied out as a pinned loader would
    assert len(fresh) == len(recycled) == 12
    assert all(torch.equal(a["waveform"], b["waveform"]) for a, b in zip(fresh, recycled))
    assert all(BUFFER_SLOT not in b for b in recycled)

    slots = BufferRecycling(workers=2, slots=4)
    loader = DataLoader(replace(dataset, recycling=slots), batch_size=None, num_workers=2)
    taken = [b.get(BUFFER_SLOT) for b in loader]  # a consumer that never hands buffers back
    assert len(taken) == 12 and len({tuple(t) for t in taken if t is not None}) == 8
    assert taken.count(None) == 4  # past each worker's 4 slots: fresh buffers, no stall


def test_evaluation_batches_carry_every_caption_training_batches_one(clap_shards, tmp_path):
    """Clotho/AudioCaps clips have five captions: evaluation tokenises them all, mapped to their clip."""
    sample = next(iter_shard(clap_shards / "000000.tar"))
    meta = json.loads(sample["json"])
    counts = [3, 1, 5]
    with ShardWriter(tmp_path / "000000.tar") as writer:
        for i, count in enumerate(counts):
            meta["text"] = [f"clip {i} caption {c}" for c in range(count)]
            writer.write({"__key__": f"k{i}", "flac": sample["flac"], "json": json.dumps(meta).encode()})
    shards = ShardSet([str(tmp_path / "000000.tar")], [1.0], None)
    batch = next(iter(_dataset(shards, train=False, batch_size=3)))
    assert batch["caption_owner"].tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert batch["input_ids"].shape[0] == 9 and batch["waveform"].shape[0] == 3
    assert batch["text"] == ["clip 0 caption 0", "clip 1 caption 0", "clip 2 caption 0"]
    train = next(iter(_dataset(shards, batch_size=3, batches_per_worker=1)))
    assert train["input_ids"].shape[0] == 3 and sorted(train["caption_owner"].tolist()) == [0, 1, 2]


def _build_output(out: Path, clap_shards: Path, splits: tuple[str, ...] = ("train", "valid")) -> Path:
    """A build's output folder: each split a folder of shards with sizes.json, plus resume state."""
    for split in splits:
        (out / split).mkdir(parents=True)
        for name in ("000000.tar", "000001.tar", "sizes.json"):
            (out / split / name).write_bytes((clap_shards / name).read_bytes())
    (out / "_work" / "parts").mkdir(parents=True)
    (out / "_work" / "parts" / SIZES_FILE).write_text('{"000000.tar": 1}')  # resume state, not a split
    return out


def test_datasets_by_folder(clap_shards, tmp_path):
    """A split folder is its shards per sizes.json; a build's output is its train split for training
    and every split for evaluation."""
    out = _build_output(tmp_path / "out", clap_shards)
    split = ShardSet.from_spec(str(out / "valid"))
    assert split.urls == [str(out / "valid" / "000000.tar"), str(out / "valid" / "000001.tar")]
    assert split.num_samples == 8
    train = ShardSet.from_spec(str(out), train=True)
    assert [Path(u).parent.name for u in train.urls] == ["train", "train"] and train.num_samples == 8
    assert [[Path(u).parent.name for u in urls] for urls in expand_datasets(str(out))] == [["train"] * 2,
                                                                                           ["valid"] * 2]
    assert ShardSet.from_spec(str(out)).num_samples == 16
    # Folders mix with patterns and weights, one dataset each for training.
    mixed = ShardSet.from_spec(f"{out}::{clap_shards}/000000.tar", "1::2", train=True)
    assert len(mixed.urls) == 3 and mixed.weights == [4.0, 4.0, 8.0]


def test_folder_shards_follow_sizes_json_and_its_mistakes_are_one_line(clap_shards, tmp_path):
    split = tmp_path / "out" / "test"
    split.mkdir(parents=True)
    (split / "000002.tar").write_bytes((clap_shards / "000001.tar").read_bytes())
    (split / "000000.tar").write_bytes((clap_shards / "000000.tar").read_bytes())
    write_sizes(split, {"000002.tar": 4, "000000.tar": 4})  # numbers can have gaps
    assert [Path(u).name for u in ShardSet.from_spec(str(split)).urls] == ["000000.tar", "000002.tar"]
    with pytest.raises(DataError, match=r"has no train split \(it has test\)"):
        ShardSet.from_spec(str(tmp_path / "out"), train=True)
    (split / "000002.tar").unlink()
    with pytest.raises(DataError, match=r"shard not found: .*000002.tar \(listed in .*sizes.json\)"):
        ShardSet.from_spec(str(split))
    (split / SIZES_FILE).write_text("{}")
    with pytest.raises(DataError, match="lists no shards"):
        ShardSet.from_spec(str(split))
    (split / SIZES_FILE).unlink()
    os.mkfifo(split / SIZES_FILE)  # read as a file, it had no end: clap-train waited forever
    with pytest.raises(DataError, match="sizes.json"):  # one line, at once
        ShardSet.from_spec(str(split))
    with pytest.raises(DataError, match="neither a split folder nor a build's output"):
        ShardSet.from_spec(str(tmp_path))
