"""webdataset loading of audiodata shards for CLAP training and evaluation.

Shards are `<key>.flac` + `<key>.json` (audio_dataset.schema). The pipeline per DataLoader worker:
shard list (resampled with weights, or split over ranks and workers) -> tar members grouped into
samples -> shuffle buffer -> decode FLAC, pick a caption, crop or fill the waveform -> batch
(tokenised captions, padded int16 waveforms). Float conversion and mel features happen later, on
the model's device.

Every random choice comes from one `random.Random` seeded by (seed, epoch, rank, worker), so an
epoch's batches are a function of those four numbers: resume replays them exactly.
"""
from __future__ import annotations

import io
import logging
import math
import os
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import braceexpand
import numpy as np
import soundfile
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset import gopen

from clap_model.config import UsageError
from clap_model.tarstream import TarFormatError, tar_samples
from audio_dataset.schema import AUDIO_EXT, JSON_EXT, MAX_CAPTION_CHARS, REFUSED_KEY, SIZES_FILE, TEXT_FIELD, \
    bad_shard_name, check_sizes, load_json_object, read_json_record

log = logging.getLogger("clap_model.data")

DATASET_SEPARATOR = "::"


class DataError(UsageError):
    """A user-facing problem with the data arguments (bad pattern, no sizes, ...)."""


# ---- shard lists and sizes -------------------------------------------------------------------


def expand_pattern(pattern: str) -> list[str]:
    """One dataset's brace pattern -> shard URLs. Spaces are part of a URL (`pipe:aws s3 cp ...`)."""
    try:
        urls = list(braceexpand.braceexpand(pattern.strip()))
    except braceexpand.UnbalancedBracesError:
        raise DataError(f"pattern {pattern!r} has unbalanced braces") from None
    if not urls or urls == [""]:
        raise DataError(f"pattern {pattern!r} names no shards")
    for url in urls:
        if _is_local(url) and not Path(_local_path(url)).is_file():
            raise DataError(f"shard not found: {url}")
    return urls


TRAIN_SPLIT = "train"


def split_folders(part: str, train: bool) -> list[Path] | None:
    """The split folders one dataset argument names, or None when it is no local folder (a shard
    pattern or URL). A split folder (it holds sizes.json) names itself; a build's output folder
    (splits below it) names its `train` split for training and every split for evaluation."""
    part = part.strip()
    path = Path(_local_path(part))
    if not _is_local(part) or "{" in part or not path.is_dir():
        return None
    if (path / SIZES_FILE).is_file():
        return [path]
    # `_work/` and hidden folders hold a build's resume state, not splits.
    splits = sorted(sub.parent for sub in path.glob(f"*/{SIZES_FILE}") if not sub.parent.name.startswith(("_", ".")))
    if not splits:
        raise DataError(f"{part} is neither a split folder nor a build's output: no {SIZES_FILE} in it "
                        "or in its subfolders")
    if not train:
        return splits
    if path / TRAIN_SPLIT not in splits:
        raise DataError(f"{part} has no {TRAIN_SPLIT} split (it has {', '.join(s.name for s in splits)}): "
                        "name the split folder to train on")
    return [path / TRAIN_SPLIT]


def folder_shards(folder: Path) -> list[str]:
    """A split folder's shards: those its sizes.json lists (numbers can have gaps), in name order."""
    try:
        with open(folder / SIZES_FILE, "rb") as handle:
            sizes = check_sizes(read_json_record(handle))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {folder / SIZES_FILE}: {exc}") from None
    if not isinstance(sizes, dict) or not sizes:
        raise DataError(f"{folder / SIZES_FILE} lists no shards")
    for name in sizes:
        # A list read from data names files, never a command (`pipe:`), URL or path elsewhere.
        if problem := bad_shard_name(name):
            raise DataError(f"{folder / SIZES_FILE} lists {name!r}: {problem}; refusing to read it")
    # `./name`, not `name`, for the current folder: a path that can never read as `pipe:` or a URL.
    urls = [str(folder / name) if str(folder) != "." else f"./{name}" for name in sorted(sizes)]
    for url in urls:
        if not Path(url).is_file():
            raise DataError(f"shard not found: {url} (listed in {folder / SIZES_FILE})")
    return urls


def expand_datasets(spec: str, train: bool = False) -> list[list[str]]:
    """`A::B` (several datasets) -> one URL list per dataset; a build's folder is one per split."""
    parts = [part for part in spec.split(DATASET_SEPARATOR) if part.strip()]
    if not parts:
        raise DataError(f"data pattern {spec!r} names no shards")
    datasets = []
    for part in parts:
        folders = split_folders(part, train)
        datasets += [expand_pattern(part)] if folders is None else [folder_shards(f) for f in folders]
    return datasets


def parse_weights(spec: str, datasets: int) -> list[float]:
    """`1::3` -> [1.0, 3.0]: one finite, non-negative weight per dataset, not all zero."""
    message = f"--train-data-weights needs {datasets} non-negative numbers separated by '::', not {spec!r}"
    try:
        factors = [float(x) for x in spec.split(DATASET_SEPARATOR)]
    except ValueError:
        raise DataError(message) from None
    if len(factors) != datasets or not all(math.isfinite(f) and f >= 0 for f in factors) or not any(factors):
        raise DataError(message)
    return factors


def _is_local(url: str) -> bool:
    return url.startswith("file://") or "://" not in url and not url.startswith("pipe:")


def _local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def open_url(url: str):
    """A readable binary stream: local path, `pipe:COMMAND`, or any fsspec URL (s3://, gs://, http://)."""
    if url.startswith("pipe:"):
        return gopen(url, "rb")
    if _is_local(url):
        return open(_local_path(url), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


def _sizes_for_dir(directory: str, local: bool) -> dict[str, int] | None:
    try:
        if local:
            path = Path(directory) / SIZES_FILE
            if not path.is_file():
                return None
            with open(path, "rb") as handle:
                return check_sizes(read_json_record(handle))
        import fsspec

        with fsspec.open(f"{directory}/{SIZES_FILE}", "rb") as handle:
            return check_sizes(read_json_record(handle))
    except (OSError, ValueError, ImportError):  # unknown sizes: the caller asks for --train-num-samples
        return None


def shard_sizes(urls: list[str]) -> list[int | None]:
    """Samples per shard from the `sizes.json` beside each shard (None where unknown, e.g. pipe:)."""
    cache: dict[str, dict[str, int] | None] = {}
    sizes: list[int | None] = []
    for url in urls:
        if url.startswith("pipe:"):
            sizes.append(None)
            continue
        local = _is_local(url)
        directory, _, name = (_local_path(url) if local else url).rpartition("/")
        directory = directory or "."
        if directory not in cache:
            cache[directory] = _sizes_for_dir(directory, local)
        table = cache[directory]
        sizes.append(None if table is None else table.get(name))
    return sizes


@dataclass
class ShardSet:
    """Shards of one or more datasets with per-shard draw weights."""

    urls: list[str]
    weights: list[float]
    num_samples: int | None  # None when some shard's size is unknown

    @classmethod
    def from_spec(cls, spec: str, dataset_weights: str | None = None, train: bool = False) -> "ShardSet":
        datasets = expand_datasets(spec, train)
        factors = parse_weights(dataset_weights, len(datasets)) if dataset_weights else [1.0] * len(datasets)
        urls, weights, total, known = [], [], 0, True
        for factor, shard_urls in zip(factors, datasets):
            sizes = shard_sizes(shard_urls)
            for url, size in zip(shard_urls, sizes):
                urls.append(url)
                # A shard is drawn in proportion to its samples times its dataset's factor.
                weights.append(factor * (size if size else 1))
                known &= size is not None
                total += size or 0
        return cls(urls, weights, total if known else None)


# ---- per-sample processing --------------------------------------------------------------------


@dataclass(frozen=True)
class AudioSpec:
    sample_rate: int
    clip_samples: int
    truncating: str = "rand_trunc"  # rand_trunc | fusion
    filling: str = "repeatpad"  # repeatpad | pad | repeat
    # Fusion keeps long clips whole for the shrunk global view; beyond this they are cropped.
    max_fusion_samples: int = 48_000 * 60


def decode_audio(data: bytes, sample_rate: int) -> np.ndarray:
    """FLAC (or any libsndfile format) bytes -> mono float32 at `sample_rate`."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1)
    if rate != sample_rate:
        import soxr

        mono = soxr.resample(mono, rate, sample_rate, quality="HQ").astype(np.float32)
    return mono


def read_clip(data: bytes, spec: AudioSpec, rng: random.Random | None) -> np.ndarray:
    """Mono int16 PCM at the model's rate, at most as long as training keeps.

    int16 because the shards' FLAC is 16-bit: decoding to it loses nothing and halves what the
    loader copies and ships (LAION-CLAP's loader also rounds through int16). `to_device` turns it
    into float on the GPU. A clip longer than training keeps (and already at the model's rate, as
    audiodata writes it) is decoded from a random start only (the start under `rng=None`).
    """
    with soundfile.SoundFile(io.BytesIO(data)) as handle:
        rate, frames, channels = handle.samplerate, handle.frames, handle.channels
        limit = spec.clip_samples if spec.truncating == "rand_trunc" else spec.max_fusion_samples
        if rate == spec.sample_rate and frames > limit:
            start = rng.randint(0, frames - limit) if rng else 0
            handle.seek(start)
            samples = handle.read(limit, dtype="int16", always_2d=True)
        else:
            samples = handle.read(dtype="int16", always_2d=True)
    mono = samples[:, 0] if channels == 1 else samples.mean(axis=1).round().astype(np.int16)
    if rate != spec.sample_rate:
        import soxr

        mono = soxr.resample(mono.astype(np.float32) / 32768.0, rate, spec.sample_rate, quality="HQ")
        mono = np.clip(np.round(mono * 32768.0), -32768, 32767).astype(np.int16)
    return mono


def fill(audio: np.ndarray, length: int, mode: str) -> np.ndarray:
    """Extend a short clip to `length` samples as LAION-CLAP's data_filling does."""
    if len(audio) >= length:
        return audio[:length]
    if mode == "repeatpad":
        audio = np.tile(audio, length // len(audio))
        return np.pad(audio, (0, length - len(audio)))
    if mode == "repeat":
        return np.tile(audio, length // len(audio) + 1)[:length]
    if mode == "pad":
        return np.pad(audio, (0, length - len(audio)))
    raise ValueError(f"unknown data_filling {mode!r}")


def crop_or_fill(audio: np.ndarray, spec: AudioSpec, rng: random.Random | None) -> tuple[np.ndarray, bool, list[float]]:
    """(waveform, longer, crop_u). rng=None is evaluation: crops at the start, fusion crops centred."""
    crop_u = [rng.random() for _ in range(3)] if rng else [0.5, 0.5, 0.5]
    clip = spec.clip_samples
    if len(audio) <= clip:
        return fill(audio, clip, spec.filling), False, crop_u
    limit = spec.max_fusion_samples if spec.truncating == "fusion" else clip
    if len(audio) > limit:
        start = rng.randint(0, len(audio) - limit) if rng else 0
        audio = audio[start : start + limit]
    return audio, spec.truncating == "fusion", crop_u


def _as_list(value: Any) -> list[str]:
    """A caption field's strings, each cut to MAX_CAPTION_CHARS before a tokenizer sees it."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [v[:MAX_CAPTION_CHARS] for v in value if isinstance(v, str) and v.strip()]
    return []


def choose_captions(meta: dict[str, Any], fields: tuple[str, ...], rng: random.Random | None) -> list[str]:
    """Training: one caption, uniformly among those in `fields` (e.g. text + the k2c augmentations).
    Evaluation: every `text` caption (Clotho and AudioCaps clips have five; retrieval counts them all)."""
    if rng is None:
        candidates = _as_list(meta.get(TEXT_FIELD))
        fields = (TEXT_FIELD,)
    else:
        candidates = [c for name in fields for c in _as_list(meta.get(name))]
    if not candidates:
        raise ValueError(f"sample has no caption in {fields}")
    return [rng.choice(candidates)] if rng else candidates


def label_of(meta: dict[str, Any], field_name: str) -> str | None:
    values = _as_list(meta.get(field_name))
    return values[0] if values else None


# ---- the iterable dataset ---------------------------------------------------------------------


# Consecutive unusable samples after which a worker stops: every sample failing the same way (a
# caption field no sample has, FLAC nothing can decode) is a mistake to report, not to skip forever.
MAX_UNUSABLE_IN_A_ROW = 1000
_warned = 0


def _warn(exc: Exception) -> bool:
    """Log a skipped shard or sample: the first 20, then every 1000th (a bad dataset must not flood
    the log with one line per sample)."""
    global _warned
    _warned += 1
    if _warned <= 20 or _warned % 1000 == 0:
        log.warning("skipping unreadable data (%d so far): %s", _warned, str(exc)[:300])
    return True


@dataclass
class LoaderConfig:
    batch_size: int
    audio: AudioSpec
    caption_fields: tuple[str, ...] = (TEXT_FIELD,)
    label_field: str | None = None
    train: bool = True
    resampled: bool = True
    shuffle_buffer: int = 1000
    seed: int = 0
    # Training: batches each worker yields per epoch (None: one pass, evaluation).
    batches_per_worker: int | None = None
    # Evaluation: sample JSON fields handed on as the batch's `meta` (class labels, fold).
    meta_fields: tuple[str, ...] = ()
    # Evaluation with random crops (clap-eval --crop random): each clip's crop drawn from a generator
    # seeded by (this, its key), so it is the same whatever the workers, batch size or shard order.
    eval_crop_seed: int | None = None


@dataclass
class ShardDataset(IterableDataset):
    shards: ShardSet
    cfg: LoaderConfig
    tokenize: Callable[[list[str]], dict[str, torch.Tensor]]
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    # Set by make_loader when batches are pinned: lets workers reuse their batch buffers.
    recycling: "BufferRecycling | None" = None

    def _rng(self, worker: int) -> random.Random:
        return random.Random(f"{self.cfg.seed}/{self.epoch}/{self.rank}/{worker}")

    def _shard_stream(self, rng: random.Random, worker: int, workers: int) -> Iterator[str]:
        urls = self.shards.urls
        if not self.cfg.train:
            slot, slots = self.rank * workers + worker, self.world_size * workers
            yield from urls[slot::slots]
            return
        if self.cfg.resampled:
            while True:  # every rank and worker draws independently: none runs dry
                yield rng.choices(urls, weights=self.shards.weights)[0]
        order = list(urls)
        random.Random(f"{self.cfg.seed}/{self.epoch}").shuffle(order)  # the same on every rank
        slot, slots = self.rank * workers + worker, self.world_size * workers
        mine = order[slot::slots] or [order[slot % len(order)]]
        while True:  # cycle this worker's share until its quota of batches is met
            yield from mine
            rng.shuffle(mine)

    def _samples(self, rng: random.Random, worker: int, workers: int) -> Iterator[dict[str, Any]]:
        # Training cycles shards forever: give up once every shard has had its chances and failed.
        barren, limit = 0, 3 * len(self.shards.urls) + 10
        for url in self._shard_stream(rng, worker, workers):
            if barren > limit:
                raise DataError(f"no samples in {barren} shard reads in a row (last: {url}): are the shards readable?")
            barren += 1
            try:
                stream = open_url(url)
            except Exception as exc:  # noqa: BLE001 - one unreachable shard must not end the epoch
                _warn(ValueError(f"{url}: {exc}"))
                continue
            with stream:
                try:
                    for sample in tar_samples(stream, url):
                        if REFUSED_KEY in sample:  # over a cap, or sparse: named, not read
                            _warn(ValueError(f"{url}: {sample['__key__']}: {sample[REFUSED_KEY]}"))
                        elif AUDIO_EXT in sample and JSON_EXT in sample:
                            barren = 0
                            yield sample
                except (TarFormatError, OSError) as exc:  # a damaged shard: keep what it gave, go on
                    _warn(ValueError(f"{url}: {exc}"))

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if not self.cfg.train or self.cfg.shuffle_buffer <= 1:
            yield from samples
            return
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.cfg.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            yield buffer[index]
            buffer[index] = sample
        rng.shuffle(buffer)
        yield from buffer

    def _prepare(self, sample: dict[str, Any], rng: random.Random | None) -> dict[str, Any] | str:
        """The sample ready to batch, or why it cannot be used."""
        try:
            meta = load_json_object(sample[JSON_EXT])  # bounded: size, depth, an object
            captions = choose_captions(meta, self.cfg.caption_fields, rng)  # before the costly decode
            crop_rng = rng if rng is not None else self._eval_crop_rng(sample["__key__"])
            audio = read_clip(sample[AUDIO_EXT], self.cfg.audio, crop_rng)
            if audio.size == 0:
                raise ValueError("empty audio")
        except (ValueError, RuntimeError, soundfile.LibsndfileError) as exc:
            reason = f"{sample.get('__key__')}: {exc}"
            _warn(ValueError(reason))
            return reason
        waveform, longer, crop_u = crop_or_fill(audio, self.cfg.audio, crop_rng)
        label = label_of(meta, self.cfg.label_field) if self.cfg.label_field else None
        return {"key": sample["__key__"], "waveform": waveform, "longer": longer, "crop_u": crop_u,
                "captions": captions, "label": label, "meta": {k: meta.get(k) for k in self.cfg.meta_fields}}

    def _eval_crop_rng(self, key: str) -> random.Random | None:
        seed = self.cfg.eval_crop_seed
        return None if seed is None else random.Random(f"{seed}/{key}")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        lengths = [len(item["waveform"]) for item in items]
        waveform, slot = self._batch_buffer((len(items), max(lengths)))  # int16 PCM: float on the device
        rows = waveform.numpy()
        for row, item in enumerate(items):
            rows[row, : lengths[row]] = item["waveform"]
            rows[row, lengths[row]:] = 0
        # Tokens for every caption, row by row; `caption_owner` maps each back to its clip's row.
        batch = dict(self.tokenize([caption for item in items for caption in item["captions"]]))
        batch.update(
            waveform=waveform, length=torch.tensor(lengths),
            longer=torch.tensor([item["longer"] for item in items]),
            crop_u=torch.tensor([item["crop_u"] for item in items], dtype=torch.float32),
            caption_owner=torch.tensor([row for row, item in enumerate(items) for _ in item["captions"]]),
            key=[item["key"] for item in items], text=[item["captions"][0] for item in items],
            label=[item["label"] for item in items],
        )
        if self.cfg.meta_fields:
            batch["meta"] = [item["meta"] for item in items]
        if slot is not None:
            batch[BUFFER_SLOT] = slot
        return batch

    def _batch_buffer(self, shape: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int] | None]:
        """An uninitialised int16 batch and the recycling slot it occupies (None: not recycled).

        In a DataLoader worker it is made in shared memory at once, so handing it to the training
        process costs no copy (the DataLoader would otherwise copy every batch into shared memory:
        246 MB at batch 256 of 10 s clips). Fresh shared memory costs a page fault per 4 KB on first
        write (~0.6 ms per 10 s clip, measured), so a worker reuses a buffer the consumer released."""
        info = get_worker_info()
        if info is None:
            return torch.empty(shape, dtype=torch.int16), None
        if self.recycling is None:
            return _shared_int16(_new_shared(shape), shape), None
        return self.recycling.acquire(info.id, shape)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rng = self._rng(worker)
        sample_rng = rng if self.cfg.train else None
        quota = self.cfg.batches_per_worker if self.cfg.train else None
        batch: list[dict[str, Any]] = []
        produced = unusable = 0
        for sample in self._shuffled(self._samples(rng, worker, workers), rng):
            item = self._prepare(sample, sample_rng)
            if isinstance(item, str):
                unusable += 1
                if unusable >= MAX_UNUSABLE_IN_A_ROW:
                    raise DataError(f"{unusable} samples in a row could not be used; the last: {item}")
                continue
            unusable = 0
            batch.append(item)
            if len(batch) == self.cfg.batch_size:
                yield self.collate(batch)
                batch, produced = [], produced + 1
                if quota is not None and produced >= quota:
                    return
        if batch and not self.cfg.train:
            yield self.collate(batch)


BUFFER_SLOT = "buffer_slot"


def _new_shared(shape: tuple[int, int]) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared(shape[0] * shape[1] * 2)


def _shared_int16(storage: torch.UntypedStorage, shape: tuple[int, int]) -> torch.Tensor:
    return torch.empty(0, dtype=torch.int16).set_(storage, 0, shape)


class BufferRecycling:
    """Per-worker rings of shared-memory batch buffers, handed back by the consumer.

    A flag per (worker, slot) lives in shared memory: the worker sets it when it fills the slot,
    the consumer clears it once the batch is no longer read from shared memory (after pinning).
    A worker never waits: with every slot in flight it makes a fresh, unrecycled buffer.
    """

    def __init__(self, workers: int, slots: int) -> None:
        self.in_flight = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self._storages: dict[int, torch.UntypedStorage] = {}  # this worker's, filled lazily
        self._next = 0

    def acquire(self, worker: int, shape: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int] | None]:
        flags = self.in_flight[worker]
        slots = len(flags)
        for offset in range(slots):
            slot = (self._next + offset) % slots
            if flags[slot] == 0:
                break
        else:
            return _shared_int16(_new_shared(shape), shape), None
        self._next = slot + 1
        storage = self._storages.get(slot)
        if storage is None or storage.nbytes() < shape[0] * shape[1] * 2:
            storage = self._storages[slot] = _new_shared(shape)
        flags[slot] = 1
        return _shared_int16(storage, shape), (worker, slot)

    def release(self, batch: dict[str, Any]) -> None:
        slot = batch.pop(BUFFER_SLOT, None)
        if slot is not None:
            self.in_flight[slot[0], slot[1]] = 0


class Batches:
    """The DataLoader's batches. With recycling, each batch's shared buffer goes back to its worker
    as soon as the batch is handed out: pinned batches are already a copy; others are copied here."""

    def __init__(self, loader: DataLoader, recycling: BufferRecycling | None) -> None:
        self.loader, self.recycling = loader, recycling

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if self.recycling is not None:
                if not self.loader.pin_memory:
                    batch["waveform"] = batch["waveform"].clone()
                self.recycling.release(batch)
            yield batch


def _init_worker(_: int) -> None:
    # One core per worker: the fast tokenizer's own thread pool would oversubscribe the cores that
    # decode FLAC in the other workers.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def make_loader(dataset: ShardDataset, workers: int, prefetch_factor: int = 2,
                recycle: bool | None = None) -> Batches:
    """Batches from `workers` processes, pinned on CUDA (the training step copies them non-blocking).
    Not persistent: each epoch's dataset carries its epoch, and a new loader gets it.

    `recycle` (default: when pinned) reuses the workers' shared batch buffers; unpinned, that costs
    the consumer a copy of each batch, cheaper than the workers' page faults only when it has cores
    to spare (the loader benchmark uses it to measure the workers as clap-train on a GPU runs them)."""
    pin = torch.cuda.is_available()
    # Slots: the batches a worker can have in flight (prefetch_factor), the one being handed out,
    # and the next one it starts meanwhile.
    recycle = pin if recycle is None else recycle
    recycling = BufferRecycling(workers, prefetch_factor + 2) if recycle and workers else None
    # Its own generator: creating the loader's iterator must not consume the global torch RNG,
    # which drives dropout and SpecAugment and is saved in checkpoints for exact resume.
    loader = DataLoader(replace(dataset, recycling=recycling), batch_size=None, num_workers=workers,
                        pin_memory=pin, generator=torch.Generator().manual_seed(0), persistent_workers=False,
                        worker_init_fn=_init_worker if workers else None,
                        prefetch_factor=prefetch_factor if workers else None)
    return Batches(loader, recycling)


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    steps = num_samples // (batch_size * world_size)
    if steps == 0:
        raise DataError(f"{num_samples} samples make no full batch of {batch_size} x {world_size} ranks")
    return steps


def batches_per_worker(steps: int, workers: int) -> int:
    return math.ceil(steps / max(workers, 1))
