"""Fingerprint dedup at corpus size: recall of planted near-duplicates, false matches, memory of every
process, wall time, from real audio up to stand-in corpora of 100k+ clips, with an --against set.

1. real: distinct clips cut from the bundled recordings (tests/data/real-audio, ten clips, 285 s; their
   licences are in tests/data/attribution/: CC BY, BY-SA, BY-NC, CC0; used here for non-commercial
   benchmarking, nothing derived is kept). Each recording is played at 24 speeds (resampled: pitch
   and tempo change together) 6% apart, the ten joined into one "tape" per speed, and every tape cut
   at random points into consecutive pieces of 3-9 s. Every piece is used exactly once: as a clip, or
   mixed at -10 dB into another clip (a clip of two recordings), and every clip gets its own noise at
   20-35 dB SNR; four tapes give 3-minute clips. Distinct by construction: no two clips hold the same
   (recording, speed, time) - the bench checks that the pieces it cut are disjoint and each used once
   - and any two share at most material 6% apart in speed (every frequency and every time interval
   moved, which a landmark hash does not survive). Planted near-duplicates of some clips: MP3 at
   128 kb/s (pip ffmpeg), resampled to 16 kHz, -9 dB gain, 0.5 s and 3 s trims, stereo at 48 kHz, and
   30 s excerpts of the 3-minute clips. Every clip is encoded (FLAC, or the MP3) and fingerprinted by
   `dedup.analyse`, the code the fingerprint stage runs per sample; matching is `curate/match.py` on Ray.
2. stand-in: above what 2 shared cores decode in the time, fingerprints are synthetic hash streams
   with the real ones' statistics, measured in step 1 (`Model`): hashes per second; each hash a real
   one from the real clips' pool or its fields (band, each partner) from their real marginals, mixed
   so that two clips' hashes collide as often as real unrelated ones do (both rates are printed); and for each planted
   transform the share of a clip's hashes its copy keeps at the right offset and the copy's own
   hash count. Clips of 4-10 s, 1 in 1000 of 3 minutes; 0.5% of the dataset's items are planted
   copies, and as many again are planted leaks of a 5k-clip eval set (--eval) into the dataset.

The bench asserts that it did the work: every clip fingerprinted (hashes > 0), matching read every
hash (the report's count equals what was written), and planted pairs exist to find.

    python bench/dedup_scale.py --real --standin 10000,100000 --out /tmp/dedup-bench
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT))

from audio_dataset.audio import decode, encode_flac, resample  # noqa: E402
from audio_dataset.curate import dedup, embed_match  # noqa: E402
from audio_dataset.curate import fingerprint as fp  # noqa: E402
from audio_dataset.curate import match as matching  # noqa: E402

SOURCE_RATE = 22_050
SPEEDS = 0.6 * 1.06 ** np.arange(24)
TRANSFORMS = ("mp3_128k", "resample_16k", "gain_-9dB", "trim_0.5s", "trim_3s", "stereo_48k", "excerpt_30s")
PART_ROWS = 2_000  # stand-in items per fingerprint part (a shard's worth)
# A key's fields, (name, shift, mask): the anchor's band, then each partner's (df, dt).
FIELDS = (("band", fp.PARTNERS * fp.PART_BITS, 0xFF),
          *((f"partner{n}", (fp.PARTNERS - 1 - n) * fp.PART_BITS, (1 << fp.PART_BITS) - 1)
            for n in range(fp.PARTNERS)))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return round(int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class RssPeak:
    """The highest resident memory of this process while the block runs (sampled every 5 ms): the
    peak of one step, which the process's lifetime peak (ru_maxrss) hides once an earlier step
    went higher."""

    def __enter__(self) -> "RssPeak":
        import threading

        self.before = self.peak = current_rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, current_rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_mb())


# ------------------------------------------------------------------------------------------ real audio
@dataclass
class Clip:
    name: str
    wave: np.ndarray  # mono float32 at SOURCE_RATE
    pieces: list[tuple[int, int, int]] = field(default_factory=list)  # (tape, start, end) samples
    recordings: set[int] = field(default_factory=set)  # which of the ten recordings it holds


def _tapes() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per speed, the ten recordings joined, and where each recording starts in it."""
    recordings = []
    for path in sorted((ROOT / "tests" / "data" / "real-audio").glob("*.ogg")):
        decoded = decode(path.read_bytes())
        recordings.append(resample(decoded.samples.mean(axis=0, keepdims=True), decoded.sample_rate, SOURCE_RATE)[0])
    tapes, starts = [], []
    for speed in SPEEDS:  # played `speed` times faster: resampled to rate/speed, read at rate
        played = [resample(r[None, :], SOURCE_RATE, int(round(SOURCE_RATE / speed)))[0] for r in recordings]
        tapes.append(np.concatenate(played))
        starts.append(np.cumsum([0] + [len(p) for p in played[:-1]]))
    return tapes, starts


def distinct_clips(rng: np.random.Generator, long_tapes: int = 4) -> list[Clip]:
    tapes, starts = _tapes()
    clips: list[Clip] = []
    used: list[tuple[int, int, int]] = []
    for t in range(long_tapes):  # 3-minute clips, one per tape (a tape is 2.5-8 minutes)
        start = int(rng.integers(0, max(1, len(tapes[t]) - 180 * SOURCE_RATE)))
        end = start + 180 * SOURCE_RATE
        clips.append(Clip(f"long{t}", tapes[t][start:end], [(t, start, end)]))
    pieces = []
    for t in range(long_tapes, len(tapes)):
        at = int(rng.integers(0, 3 * SOURCE_RATE))  # random first cut
        while at + 9 * SOURCE_RATE < len(tapes[t]):
            length = int(rng.uniform(3, 9) * SOURCE_RATE)
            pieces.append((t, at, at + length))
            at += length
    order = rng.permutation(len(pieces))
    mixes = set(order[: len(order) // 5].tolist())  # a fifth of the pieces are mixed into others
    primaries = [i for i in order if i not in mixes]
    mix_pool = [i for i in order if i in mixes]
    for n, i in enumerate(primaries):
        t, a, b = pieces[i]
        wave = tapes[t][a:b].copy()
        clip = Clip(f"d{n:05d}", wave, [pieces[i]])
        if mix_pool and n % 4 == 0:
            j = mix_pool.pop()
            t2, a2, b2 = pieces[j]
            other = tapes[t2][a2:b2][: len(wave)]
            wave[: len(other)] += 0.316 * other * (np.std(wave) / max(1e-9, np.std(other)))
            clip.pieces.append(pieces[j])
        clips.append(clip)
    for clip in clips:  # independent noise, 20-35 dB below the clip
        snr = rng.uniform(20, 35)
        clip.wave = (clip.wave + rng.standard_normal(len(clip.wave)).astype(np.float32)
                     * np.std(clip.wave) * 10 ** (-snr / 20)).astype(np.float32)
        used += clip.pieces
        clip.recordings = {int(np.searchsorted(starts[t], x, side="right")) - 1 for t, a, b in clip.pieces
                           for x in range(a, b, SOURCE_RATE)}
    _check_disjoint(used)
    return clips


def _check_disjoint(used: list[tuple[int, int, int]]) -> None:
    """No (tape, sample) is in two clips: the distinct set has no true duplicates by construction."""
    by_tape: dict[int, list[tuple[int, int]]] = {}
    for t, a, b in used:
        by_tape.setdefault(t, []).append((a, b))
    for spans in by_tape.values():
        spans.sort()
        for (a1, b1), (a2, b2) in zip(spans, spans[1:]):
            assert b1 <= a2, "two clips share material: the distinct set is not distinct"


def _ffmpeg(wave: np.ndarray, rate: int, args: list[str], ext: str) -> bytes:
    import imageio_ffmpeg
    import soundfile

    with tempfile.TemporaryDirectory() as folder:
        src, dst = Path(folder) / "in.wav", Path(folder) / f"out.{ext}"
        soundfile.write(src, wave, rate, subtype="PCM_16")
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), *args, str(dst)],
                       check=True)
        return dst.read_bytes()


def planted(clip: Clip, transform: str, rng: np.random.Generator) -> tuple[bytes, float]:
    """(encoded copy, where the copy starts in the clip, seconds)."""
    wave, rate = clip.wave, SOURCE_RATE
    if transform == "mp3_128k":
        return _ffmpeg(wave, rate, ["-b:a", "128k"], "mp3"), 0.0
    if transform == "resample_16k":
        return encode_flac(resample(wave[None, :], rate, 16_000), 16_000), 0.0
    if transform == "gain_-9dB":
        return encode_flac(wave[None, :] * 10 ** (-9 / 20), rate), 0.0
    if transform.startswith("trim_"):
        cut = float(transform[5:-1])
        return encode_flac(wave[None, int(cut * rate):], rate), cut
    if transform == "stereo_48k":
        up = resample(wave[None, :], rate, 48_000)
        return encode_flac(np.concatenate([up, up * 0.9]), 48_000), 0.0
    start = float(rng.uniform(10, 140))  # excerpt_30s of a 3-minute clip
    return encode_flac(wave[None, int(start * rate): int((start + 30) * rate)], rate), start


def _write_parts(folder: Path, prints: list[fp.Fingerprint], first: int = 0,
                 digests: list[str] | None = None) -> list[matching.PrintPart]:
    """Fingerprint parts as the fingerprint stage writes them (its schema, every column), so the
    dedup driver's own code reads them; item i is key {i:09d}, its PCM digest `digests[i - first]`
    (default: its own)."""
    from audio_dataset.curate.dedup import FINGERPRINT_SCHEMA

    folder.mkdir(parents=True, exist_ok=True)
    parts = []
    for at in range(0, len(prints), PART_ROWS):
        chunk = prints[at: at + PART_ROWS]
        ids = range(first + at, first + at + len(chunk))
        seconds = [float(p.times.max() + 1) * fp.HOP / fp.RATE if len(p.times) else 0.0 for p in chunk]
        path = folder / f"{first + at:09d}.parquet"
        pq.write_table(pa.table({
            "split": ["train"] * len(chunk), "shard": [f"{i // PART_ROWS:06d}.tar" for i in ids],
            "key": [f"{i:09d}" for i in ids], "source": ["standin"] * len(chunk), "license": ["CC0"] * len(chunk),
            "duration": seconds, "status": ["ok"] * len(chunk), "bytes_sha256": [f"{i:064x}" for i in ids],
            "pcm_sha256": digests[at: at + len(chunk)] if digests else [f"{i:064x}" for i in ids],
            "hashes": pa.array([p.hashes for p in chunk], pa.list_(pa.uint64())),
            "times": pa.array([p.times for p in chunk], pa.list_(pa.int32()))}, schema=FINGERPRINT_SCHEMA), path)
        parts.append(matching.part_of(matching.UPath(path), first + at))
    return parts


def run_real(out: Path, per_transform: int, seed: int) -> dict:
    from audio_dataset.curate.dedup import analyse

    rng = np.random.default_rng(seed)
    started = time.monotonic()
    clips = distinct_clips(rng)
    made = time.monotonic()
    prints, durations = [], []
    for clip in clips:
        found = analyse(encode_flac(clip.wave[None, :], SOURCE_RATE))
        prints.append(found.landmarks), durations.append(found.duration)
    plants = []  # (original index, copy index, transform, start)
    longs = [i for i, c in enumerate(clips) if c.name.startswith("long")]
    shorts = [i for i, c in enumerate(clips) if not c.name.startswith("long")]
    for transform in TRANSFORMS:
        pool = longs if transform == "excerpt_30s" else shorts
        if transform == "trim_3s":  # what is left must be a clip: 3 s or more
            pool = [i for i in shorts if len(clips[i].wave) >= 6 * SOURCE_RATE]
        for original in rng.choice(pool, size=per_transform, replace=transform == "excerpt_30s"):
            data, start = planted(clips[original], transform, rng)
            found = analyse(data)
            plants.append((int(original), len(prints), transform, start))
            prints.append(found.landmarks), durations.append(found.duration)
    fingerprinted = time.monotonic()
    assert all(len(p.hashes) for p in prints), "a clip without landmarks: nothing was fingerprinted"
    work = out / "real"
    shutil.rmtree(work, ignore_errors=True)
    parts = _write_parts(work / "prints", prints)
    plan = matching.plan_matching(matching.UPath(work / "match"), parts, None, partition_hashes=2_000_000)
    result = matching.run_matching(plan, matching.run_on_ray)
    assert result.report["hashes"] == sum(len(p.hashes) for p in prints), "matching did not read every hash"
    found = {(m.a, m.b): m for m in result.matches}
    planted_pairs = {(min(o, c), max(o, c)) for o, c, _, _ in plants}
    by_transform = {t: float(np.mean([(min(o, c), max(o, c)) in found for o, c, tt, _ in plants if tt == t]))
                    for t in TRANSFORMS}
    span_errors = []
    from audio_dataset.curate.dedup import matched_span
    for o, c, t, start in plants:
        m = found.get((min(o, c), max(o, c)))
        if m is not None:
            span = matched_span(m.offset, durations[m.a], durations[m.b])
            span_errors.append(abs(span[0] - start))
    n = len(prints)
    family = list(range(n))  # a copy is of its original's family: two copies of one clip match too
    for o, c, _, _ in plants:
        family[c] = o
    false = [p for p in found if family[p[0]] != family[p[1]]]
    collision = _collision_by_relation(prints, clips)
    for a, b in false:
        m = found[(a, b)]
        print(f"false match: {clips[family[a]].name} {clips[family[a]].pieces} ~ {clips[family[b]].name} "
              f"{clips[family[b]].pieces}: {m.count} hashes, score {m.score:.3f}", file=sys.stderr)
    return {"clips": n, "distinct": len(clips), "planted": len(plants), "seconds_of_audio": round(sum(durations)),
            "recall": float(np.mean([p in found for p in planted_pairs])), "recall_by_transform": by_transform,
            "false_matches": len(false), "false_match_rate": len(false) / (n * (n - 1) / 2),
            "span_offset_error_s_max": round(max(span_errors), 4) if span_errors else None,
            "seconds": {"make": round(made - started, 1), "fingerprint": round(fingerprinted - made, 1),
                        "match": result.report["seconds"]},
            "collision": collision, "match": result.report,
            "model": _model(prints, plants, found, durations, collision["unrelated"])}


def _collision_by_relation(prints: list[fp.Fingerprint], clips: list[Clip]) -> dict:
    """P(a key of one distinct clip equals a key of another), over all pairs, over pairs holding no
    recording in common, and over pairs from one recording (music repeats itself)."""
    per = [np.unique(prints[i].hashes) for i in range(len(clips))]
    owner = np.repeat(np.arange(len(per)), [len(p) for p in per])
    values = np.concatenate(per)
    order = np.argsort(values, kind="stable")
    values, owner = values[order], owner[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    sizes = np.array([len(p) for p in per], np.float64)
    shared = {"all": 0.0, "unrelated": 0.0}
    for lo, hi in zip(starts, np.r_[starts[1:], len(values)]):
        if hi - lo < 2:
            continue
        members = owner[lo:hi]
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                shared["all"] += 1
                shared["unrelated"] += not (clips[members[x]].recordings & clips[members[y]].recordings)
    related_pairs = np.zeros((2,))
    for x in range(len(clips)):  # key pairs of clip pairs sharing a recording, and of all clip pairs
        for y in range(x + 1, len(clips)):
            related_pairs[bool(clips[x].recordings & clips[y].recordings)] += sizes[x] * sizes[y]
    return {"all": shared["all"] / related_pairs.sum(), "unrelated": shared["unrelated"] / related_pairs[0],
            "same_recording": (shared["all"] - shared["unrelated"]) / related_pairs[1]}


def _model(prints: list[fp.Fingerprint], plants: list, found: dict, durations: list[float],
           collision_unrelated: float) -> dict:
    """The stand-in's statistics, from the real fingerprints. Its collision rate is that of real clips
    holding no recording in common: a large corpus's pairs are nearly all such."""
    distinct = set(range(len(prints))) - {c for _, c, _, _ in plants}
    hashes = np.concatenate([prints[i].hashes for i in sorted(distinct)])
    rate = float(len(hashes) / sum(durations[i] for i in distinct))
    fields = {name: np.bincount(((hashes >> np.uint64(shift)) & np.uint64(mask)).astype(np.int64), minlength=mask + 1)
              for name, shift, mask in FIELDS}
    survival = {}
    for t in TRANSFORMS:
        kept, density, votes = [], [], []
        for o, c, tt, _ in plants:
            if tt != t:
                continue
            m = found.get((min(o, c), max(o, c)))
            copy = len(prints[c].hashes)
            overlap = min(durations[c], durations[o]) / durations[o]
            kept.append(m.count / len(prints[o].hashes) / overlap if m else 0.0)
            density.append(copy / (len(prints[o].hashes) * overlap))
            votes.append(m.count if m else 0)
        survival[t] = {"kept": float(np.median(kept)), "density": float(np.median(density)),
                       "votes_min": int(min(votes)), "votes_median": float(np.median(votes))}
    return {"hashes_per_second": rate, **{name: f.tolist() for name, f in fields.items()},
            "collision_real": collision_unrelated, "survival": survival,
            "pool": hashes.tolist()}


def _collision(prints: list[fp.Fingerprint], members: list[int]) -> float:
    """P(a hash of one clip equals a hash of another clip), over the given clips."""
    per = [np.unique(prints[i].hashes) for i in members]
    values, counts = np.unique(np.concatenate(per), return_counts=True)
    same = float((counts * (counts - 1)).sum())  # ordered pairs of clips sharing a value
    sizes = np.array([len(p) for p in per], np.float64)
    return same / float(sizes.sum() ** 2 - (sizes ** 2).sum())


# ------------------------------------------------------------------------------------------- stand-in
@dataclass(frozen=True)
class Model:
    """Keys: with odds `pooled` a real key drawn from the real clips' pool (their joint statistics,
    the common keys among them), else its FIELDS drawn from their marginals (values the pool
    never saw); `pooled` is set so that two clips' keys collide as often as real ones do."""

    rate: float
    fields: tuple  # per field of FIELDS, its values' cumulative probabilities
    survival: dict
    pool: np.ndarray
    pooled: float
    collision_real: float

    @staticmethod
    def of(stats: dict) -> "Model":
        fields = tuple(np.array(stats[name], np.float64) / np.sum(stats[name]) for name, _, _ in FIELDS)
        cumulative = tuple(np.cumsum(f) for f in fields)
        pool = np.array(stats["pool"], np.uint64)
        marginal = float(np.prod([(f ** 2).sum() for f in fields]))
        _, counts = np.unique(pool, return_counts=True)
        pooled_c = float(((counts / len(pool)) ** 2).sum())
        # the share a with a^2 pooled_c + (1 - a)^2 marginal = the real collision rate (it grows with a
        # from the marginal's rate where a > marginal / (pooled_c + marginal): bisect there)
        target, lo, hi = stats["collision_real"], marginal / (pooled_c + marginal), 1.0
        if target <= lo * lo * pooled_c + (1 - lo) ** 2 * marginal:
            hi = lo
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if mid * mid * pooled_c + (1 - mid) ** 2 * marginal < target else (lo, mid)
        return Model(stats["hashes_per_second"], cumulative, stats["survival"], pool, float(hi), target)


def _stream(model: Model, rng: np.random.Generator, seconds: float) -> fp.Fingerprint:
    n = rng.poisson(model.rate * seconds)
    hashes = np.zeros(n, np.uint64)
    for (_, shift, mask), cdf in zip(FIELDS, model.fields):
        value = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), mask)
        hashes |= value.astype(np.uint64) << np.uint64(shift)
    real = rng.random(n) < model.pooled
    hashes[real] = model.pool[rng.integers(0, len(model.pool), int(real.sum()))]
    times = np.sort(rng.integers(0, max(1, int(seconds * fp.RATE / fp.HOP)), n)).astype(np.int32)
    return fp.Fingerprint(hashes, times)


def _copy(model: Model, rng: np.random.Generator, original: fp.Fingerprint,
          transform: str) -> tuple[fp.Fingerprint, float]:
    """A planted copy's stream: the original's hashes each kept with the transform's measured odds,
    shifted by its trim or cut to its excerpt, plus the new hashes its measured density adds."""
    frames = int(original.times.max()) + 1 if len(original.times) else 1
    lo, hi, start = 0, frames, 0.0
    if transform.startswith("trim_"):
        start = float(transform[5:-1])
        lo = int(start * fp.RATE / fp.HOP)
    elif transform == "excerpt_30s":
        start = float(rng.uniform(10, 140))
        lo, hi = int(start * fp.RATE / fp.HOP), int((start + 30) * fp.RATE / fp.HOP)
    s = model.survival[transform]
    inside = (original.times >= lo) & (original.times < hi)
    keep = inside & (rng.random(len(original.times)) < s["kept"])
    extra = _stream(model, rng, (hi - lo) * fp.HOP / fp.RATE)
    extra_n = max(0, int(inside.sum() * (s["density"] - s["kept"])))
    hashes = np.concatenate([original.hashes[keep], extra.hashes[:extra_n]])
    times = np.concatenate([original.times[keep] - lo, extra.times[:extra_n]])
    order = np.argsort(times, kind="stable")
    return fp.Fingerprint(hashes[order], times[order].astype(np.int32)), start


def _item_rng(seed: int, kind: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, kind, index])


def _eval_item(model: Model, seed: int, index: int) -> fp.Fingerprint:
    rng = _item_rng(seed, 1, index)
    return _stream(model, rng, float(rng.uniform(4, 10)))


def standin_part(model: Model, seed: int, first: int, rows: int, dataset: int, evals: int, leaks: int,
                 folder: str) -> dict:
    """Items [first, first + rows) of a stand-in corpus: dataset items, then (ids >= dataset) the eval
    set. Within the dataset every 200th item is a planted copy of the item before it (0.5%), and
    `leaks` evenly spaced items are copies of eval items; every 1000th is a 3-minute clip, the next a
    30 s excerpt of it, and the next an exact copy of that (the same PCM digest: an `exact` link)."""
    prints, plants, digests = [], [], []
    leak_every = dataset // leaks if leaks else 0
    for i in range(first, first + rows):
        rng = _item_rng(seed, 0, i)
        digests.append(f"{i:064x}")
        if i >= dataset:
            prints.append(_eval_item(model, seed, i - dataset))
            continue
        if i % 1000 == 1:
            prints.append(_stream(model, rng, 180.0))
        elif i % 1000 == 3:  # the same decoded PCM as the item before (its fingerprint too)
            prints.append(prints[-1])  # never a part's first item: parts start at multiples of 2,000
            digests[-1] = f"{i - 1:064x}"
            plants.append((i - 1, i, "exact", "exact"))
        elif leak_every and i % leak_every == leak_every // 2 and i // leak_every < leaks:
            target = int(rng.integers(0, evals))
            transform = TRANSFORMS[int(rng.integers(0, len(TRANSFORMS) - 1))]
            copy, _ = _copy(model, rng, _eval_item(model, seed, target), transform)
            prints.append(copy)
            plants.append((i, dataset + target, transform, "leak"))
        elif i % 200 == 199 or (i % 1000 == 2):  # a copy of the item before (the 3-minute one: an excerpt)
            transform = "excerpt_30s" if i % 1000 == 2 else TRANSFORMS[(i // 200) % (len(TRANSFORMS) - 1)]
            copy, _ = _copy(model, rng, prints[-1] if i > first else _regen(model, seed, i - 1), transform)
            prints.append(copy)
            plants.append((i - 1, i, transform, "dup"))
        else:
            prints.append(_stream(model, rng, float(rng.uniform(4, 10))))
    _write_parts(Path(folder), prints, first, digests)
    return {"plants": plants, "hashes": int(sum(len(p.hashes) for p in prints)), "peak_rss_mb": peak_mb()}


def _regen(model: Model, seed: int, i: int) -> fp.Fingerprint:
    """Item i of the dataset as its part made it (a copy's original in the part before)."""
    rng = _item_rng(seed, 0, i)
    return _stream(model, rng, 180.0 if i % 1000 == 1 else float(rng.uniform(4, 10)))


def run_standin(out: Path, model: Model, size: int, evals: int, seed: int) -> dict:
    import ray

    work = out / f"standin-{size}"
    shutil.rmtree(work, ignore_errors=True)
    leaks = max(1, size // 200)
    total = size + evals
    started = time.monotonic()
    task = ray.remote(num_cpus=1)(standin_part)
    model_ref = ray.put(model)
    made = ray.get([task.remote(model_ref, seed, first, min(PART_ROWS, total - first), size, evals, leaks,
                                str(work / "prints")) for first in range(0, total, PART_ROWS)])
    generated = time.monotonic()
    parts = sorted((matching.part_of(matching.UPath(p), int(p.stem)) for p in (work / "prints").glob("*.parquet")),
                   key=lambda p: p.first)
    # The dedup driver's own steps (what `audiodata dedup` runs once the fingerprints are made):
    # exact links by PCM digest, the matching on Ray, the clusters from the linked rows alone.
    items = dedup.Items(parts, [int(p.first >= size) for p in parts], ["dataset", "eval"])
    with RssPeak() as rss:
        exact = dedup.exact_links(items, matching.UPath(work / "work"))
        links, report = dedup.fingerprint_links(items, matching.UPath(work / "match"), matching.run_on_ray)
        rows = dedup.cluster_rows(items, exact + links, "longest")
    driver = {"rss_before_mb": rss.before, "rss_peak_mb": rss.peak, "rise_mb": round(rss.peak - rss.before, 1),
              "process_peak_mb": round(peak_mb(), 1)}
    matched = time.monotonic()
    hashes = sum(m["hashes"] for m in made)
    assert report["hashes"] == hashes > 0, "matching did not read every hash written"
    plants = [tuple(p) for m in made for p in m["plants"]]
    dups = {(min(a, b), max(a, b)): t for a, b, t, kind in plants if kind == "dup"}
    leak_pairs = {(min(a, b), max(a, b)) for a, b, _, kind in plants if kind == "leak"}
    exact_pairs = {(a, b) for a, b, _, kind in plants if kind == "exact"}
    assert dups and leak_pairs and exact_pairs, "no planted pairs: nothing to find"
    assert {(link.a, link.b) for link in exact} == exact_pairs, "exact links differ from the planted exact copies"
    overlap = {int(r["key"]) for r in rows if r["kind"] == dedup.EVAL_OVERLAP}
    dropped = sum(not r["keep"] for r in rows)
    sample = [_eval_item(model, seed, i) for i in range(2000)]  # ~200 collisions: the rate to +-7%
    collision = _collision(sample, list(range(len(sample))))
    found = {(link.a, link.b) for link in links}
    root = {}  # planted families: two copies of one clip (two leaks of one eval item) match too

    def family(x: int) -> int:
        while root.get(x, x) != x:
            x = root[x]
        return x
    for a, b, _, _ in plants:
        root[family(max(a, b))] = family(min(a, b))
    false = {p for p in found if family(p[0]) != family(p[1])}
    for a, b in sorted(false)[:10]:
        print(f"false match: items {a} and {b}", file=sys.stderr)
    leaked = {min(p) for p in leak_pairs if p in found}
    assert leaked <= overlap, "a leak found by the matching is not eval_overlap in the clusters"
    by_transform = {t: float(np.mean([p in found for p, tt in dups.items() if tt == t]))
                    for t in sorted(set(dups.values()))}
    shutil.rmtree(work / "prints", ignore_errors=True)
    return {"clips": size, "eval_clips": evals, "hashes": hashes, "planted": len(dups), "leaks": len(leak_pairs),
            "stop_floor": fp.STOP_FLOOR, "collision": {"real": model.collision_real, "standin": collision,
                                                       "pooled_share": model.pooled},
            "recall": float(np.mean([p in found for p in dups])), "recall_by_transform": by_transform,
            "leaks_found": sum(p in found for p in leak_pairs), "false_matches": len(false),
            "exact_copies": len(exact_pairs), "clustered_rows": len(rows), "eval_overlap_rows": len(overlap),
            "not_kept": dropped, "driver": driver,
            "family_matches": len(found - set(dups) - leak_pairs - false),
            "false_match_rate": len(false) / (total * (total - 1) / 2),
            "seconds": {"generate": round(generated - started, 1), "match": report["seconds"],
                        "exact_match_cluster": round(matched - generated, 1)},
            "generate_peak_rss_mb": max(m["peak_rss_mb"] for m in made), "driver_peak_rss_mb": round(peak_mb(), 1),
            "match": {k: v for k, v in report.items() if k != "partition_hashes"},
            "partition_hashes_max": max(report["partition_hashes"])}



# ------------------------------------------------------------------------------ embedding matching
EMBED_DIM, EMBED_FAMILIES = 512, 2_000


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _embedding_set(folder: Path, vectors_of, count: int, first: int, group: int) -> list[tuple]:
    """A dataset folder as `dedup.embedding_links` reads it: key-only fingerprint parts of PART_ROWS
    rows and an embed output (rows, the .npy streamed a chunk at a time, run.json)."""
    from audio_dataset.curate.common import OK, npy_bytes_header

    embed = folder / "embed"
    (embed / ".embed").mkdir(parents=True)
    (embed / ".embed" / "run.json").write_text(json.dumps({"settings": {"model": {"digest": "b" * 64,
                                                                                  "joint_dim": EMBED_DIM}}}))
    parts, keys, shards = [], [], []
    with open(embed / "train.audio.npy", "wb") as handle:
        handle.write(npy_bytes_header((count, EMBED_DIM), np.float32))
        for start in range(0, count, PART_ROWS):
            rows = min(PART_ROWS, count - start)
            chunk_keys = [str(first + start + i) for i in range(rows)]
            shard = f"{start // PART_ROWS:06d}.tar"
            path = folder / f"{start // PART_ROWS:06d}.parquet"
            pq.write_table(pa.table({"key": chunk_keys, "split": ["train"] * rows, "shard": [shard] * rows}), path)
            parts.append((matching.PrintPart(str(path), first + start, rows, 0), group, ("train", shard)))
            keys += chunk_keys
            shards += [shard] * rows
            handle.write(vectors_of(first + start, rows).tobytes())
    pq.write_table(pa.table({"split": ["train"] * count, "shard": shards, "key": keys, "status": [OK] * count}),
                   embed / "train.rows.parquet")
    return parts


def run_embeddings(out: Path, size: int, evals: int, seed: int, threshold: float) -> dict:
    """Embedding dedup of `size` synthetic 512-d unit vectors and an `evals` eval set, through
    `dedup.embedding_links` on Ray. Distinct vectors: one of EMBED_FAMILIES centres plus noise of
    norm 0.6 (two of one family at cosine ~0.74, of two families ~0: far below any dedup
    threshold). Planted: 0.5% of the dataset near-copies of another dataset vector (noise of norm
    0.1: cosine ~0.995), 0.5% leaks (near-copies of eval vectors)."""
    work = out / f"embeddings-{size}"
    shutil.rmtree(work, ignore_errors=True)
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((EMBED_FAMILIES, EMBED_DIM)))
    planted = max(1, size // 200)
    dup_items = rng.choice(np.arange(1, size), planted, replace=False)
    dup_of = {int(d): int(rng.integers(0, d)) for d in dup_items}  # each copy after its original
    leak_items = rng.choice(np.setdiff1d(np.arange(size), dup_items), planted, replace=False)
    leak_of = {int(d): size + int(rng.integers(0, evals)) for d in leak_items}  # eval items follow

    def distinct(item: int) -> np.ndarray:
        r = np.random.default_rng([seed, item])
        return _unit(centres[r.integers(0, EMBED_FAMILIES)][None] + r.standard_normal((1, EMBED_DIM)) * 0.6 / np.sqrt(EMBED_DIM))[0]

    def vector(item: int) -> np.ndarray:
        original = dup_of.get(item, leak_of.get(item))
        if original is None:
            return distinct(item)
        noise = np.random.default_rng([seed, item, 1]).standard_normal(EMBED_DIM) * 0.1 / np.sqrt(EMBED_DIM)
        return _unit(vector(original)[None] + noise)[0]

    def vectors_of(first: int, rows: int) -> np.ndarray:
        return np.stack([vector(i) for i in range(first, first + rows)])

    started = time.monotonic()
    entries = _embedding_set(work / "dataset", vectors_of, size, 0, 0) + \
        _embedding_set(work / "eval", vectors_of, evals, size, 1)
    items = dedup.Items([e[0] for e in entries], [e[1] for e in entries], ["dataset", "eval"], [e[2] for e in entries])
    generated = time.monotonic()
    with RssPeak() as rss:
        links, missing, report = dedup.embedding_links(items, [matching.UPath(work / "dataset"),
                                                               matching.UPath(work / "eval")],
                                                       threshold, matching.UPath(work / "work"))
    matched = time.monotonic()
    assert not missing and report["indexed"] == size, f"indexed {report.get('indexed')} of {size} vectors"
    component = dedup._components(links)
    same = lambda a, b: a in component and component.get(a) == component.get(b)  # noqa: E731
    found_dups = sum(same(o, d) for d, o in dup_of.items())
    found_leaks = sum(same(o, d) for d, o in leak_of.items())
    origin = {**dup_of, **leak_of}

    def family(item: int) -> int:  # planted copies of one original match each other too
        while item in origin:
            item = origin[item]
        return item
    false = [link for link in links if family(link.a) != family(link.b)]
    for link in false[:10]:
        print(f"false embedding match: items {link.a} and {link.b} ({link.score:.4f})", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    total = size + evals
    return {"clips": size, "eval_clips": evals, "threshold": threshold, "planted": planted, "leaks": planted,
            "recall": found_dups / planted, "leaks_found": found_leaks, "false_matches": len(false),
            "false_match_rate": len(false) / (total * (total - 1) / 2), "links": len(links),
            "driver": {"rss_before_mb": rss.before, "rss_peak_mb": rss.peak, "rise_mb": round(rss.peak - rss.before, 1)},
            "train_task_peak_rss_mb": report["train_task_peak_rss_mb"],
            "index_task_peak_rss_mb": report["index_task_peak_rss_mb"],
            "query_task_peak_rss_mb": report["query_task_peak_rss_mb"], "query_tasks": report["query_tasks"],
            "index_parts": report["index_parts"], "part_vectors": embed_match.PART_VECTORS,
            "seconds": {"generate": round(generated - started, 1), "match": round(matched - generated, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--real", action="store_true", help="the real-audio corpus (and the stand-in's model)")
    parser.add_argument("--per-transform", type=int, default=12, help="planted copies per transform (real)")
    parser.add_argument("--standin", default="", help="stand-in corpus sizes, comma separated")
    parser.add_argument("--eval", type=int, default=5000, help="eval-set clips (stand-in)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dedup-bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-floor", type=int, default=fp.STOP_FLOOR, help="the stop-list's floor (its effect)")
    parser.add_argument("--embeddings", default="", help="embedding dedup corpus sizes, comma separated")
    parser.add_argument("--threshold", type=float, default=0.98, help="embedding dedup's cosine threshold")
    parser.add_argument("--part-vectors", type=int, default=embed_match.PART_VECTORS,
                        help="vectors per index part (a smaller part shows memory flat in the corpus sooner)")
    args = parser.parse_args()
    from audio_dataset.raystart import start_ray

    args.out.mkdir(parents=True, exist_ok=True)
    fp.STOP_FLOOR = args.stop_floor  # the plan (made here) carries the threshold to the tasks
    start_ray(None, num_cpus=os.cpu_count())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30
    results = {"machine": f"{os.cpu_count()} cores, {memory_gb} GB", "load_average": os.getloadavg()}
    model_file = args.out / "model.json"
    if args.real:
        real = run_real(args.out, args.per_transform, args.seed)
        model_file.write_text(json.dumps(real.pop("model")))
        results["real"] = real
        print(json.dumps({"real": real}, indent=1), flush=True)
    for size in [int(s) for s in args.standin.split(",") if s]:
        model = Model.of(json.loads(model_file.read_text()))
        result = run_standin(args.out, model, size, args.eval, args.seed)
        results[f"standin_{size}"] = result
        print(json.dumps({f"standin_{size}": result}, indent=1), flush=True)
    embed_match.PART_VECTORS = args.part_vectors  # read where the plan is made: here, in the driver
    for size in [int(s) for s in args.embeddings.split(",") if s]:
        result = run_embeddings(args.out, size, args.eval, args.seed, args.threshold)
        results[f"embeddings_{size}"] = result
        print(json.dumps({f"embeddings_{size}": result}, indent=1), flush=True)
    name = f"results-{'real-' if args.real else ''}{('emb' + args.embeddings.replace(',', '-') + f'-part{args.part_vectors}') if args.embeddings else ''}{args.standin.replace(',', '-')}-stop{args.stop_floor}.json"
    (args.out / name).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
