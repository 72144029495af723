"""Audio fingerprints after Wang (2003), "An Industrial-Strength Audio Search Algorithm" (Shazam):
spectrogram peaks ("constellation"), pairs of nearby peaks hashed as (f1, f2 - f1, t2 - t1), and a
match is many shared hashes at one consistent time offset.

Peaks are local maxima of the log spectrogram, the strongest few per second: a gain change shifts
every log magnitude alike and keeps them; re-encoding, resampling and mono/stereo mixing keep the
strong peaks; a trim moves all of them by one offset, which the offset histogram absorbs. Parameters
follow Ellis's audfprint (11025 Hz, 512-point FFT, hop 256).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import maximum_filter

from audio_dataset.audio import resample, set_channels

RATE = 11_025
N_FFT = 512
HOP = 256
PEAKS_PER_SECOND = 20
FANOUT = 4  # pairs per anchor peak
MAX_DT = 40  # frames (~0.93 s) ahead an anchor looks for partners
MAX_DF = 32  # bins either side
NEIGHBOURHOOD = (9, 7)  # (freq bins, frames): a peak is the maximum of this box
MAX_SECONDS = 120.0  # hashes of a clip's first two minutes: enough to match, memory stays bounded
# A match: at least this many hashes agree on one offset (within a frame), and that is at least
# this fraction of the shorter clip's hashes.
MIN_COUNT = 20
MIN_FRACTION = 0.1
# Hashes shared by more than this many clips say nothing (silence, hum) and would cost n^2 pairs.
MAX_BUCKET = 64

_DT_BITS, _DF_BITS = 6, 6


@dataclass(frozen=True)
class Fingerprint:
    hashes: np.ndarray  # uint32
    times: np.ndarray  # int32, frame of the anchor peak


def mono_at_rate(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """(channels, frames) float (as `audio.decode` gives) -> mono float32 (frames,) at `target` Hz."""
    return resample(set_channels(samples, 1), rate, target)[0]


def _log_spectrogram(wave: np.ndarray) -> np.ndarray:
    """(bins, frames) log magnitude, Hann-windowed."""
    if len(wave) < N_FFT:
        return np.empty((N_FFT // 2 + 1, 0), np.float32)
    frames = np.lib.stride_tricks.sliding_window_view(wave, N_FFT)[::HOP]
    spectrum = np.abs(np.fft.rfft(frames * np.hanning(N_FFT).astype(np.float32), axis=1)).T
    return np.log(np.maximum(spectrum, 1e-6)).astype(np.float32)


def peaks(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(frames, bins) of the constellation, sorted by frame: local maxima, strongest per second."""
    spec = _log_spectrogram(wave)
    if spec.shape[1] == 0:
        return np.empty(0, np.int32), np.empty(0, np.int32)
    floor = np.median(spec) + 1.0  # below the clip's typical level is noise, not a landmark
    local = (spec == maximum_filter(spec, size=NEIGHBOURHOOD, mode="constant", cval=-np.inf)) & (spec > floor)
    local[0] = False  # DC
    bins, frames = np.nonzero(local)
    strength = spec[bins, frames]
    per_block = int(PEAKS_PER_SECOND * 1.0)
    block = frames // max(1, round(RATE / HOP))  # one-second blocks
    order = np.lexsort((-strength, block))
    bins, frames, block = bins[order], frames[order], block[order]
    rank = np.arange(len(block)) - np.searchsorted(block, block)  # rank within its block by strength
    keep = rank < per_block
    bins, frames = bins[keep], frames[keep]
    order = np.lexsort((bins, frames))
    return frames[order].astype(np.int32), bins[order].astype(np.int32)


def fingerprint(wave: np.ndarray) -> Fingerprint:
    """Landmark hashes of mono float audio at RATE (see `mono_at_rate`), from two analyses half a
    hop apart (as audfprint does for queries): a trim that falls between two frames of one analysis
    lands near a frame of the other, so its peaks keep their spacing."""
    wave = wave[: int(MAX_SECONDS * RATE)]
    halves = [_landmarks(wave), _landmarks(wave[HOP // 2 :])]
    return Fingerprint(np.concatenate([h for h, _ in halves]), np.concatenate([t for _, t in halves]))


def _landmarks(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames, bins = peaks(wave)
    anchors, dts, dfs = [], [], []
    taken = np.zeros(len(frames), np.int32)
    for step in range(1, 3 * FANOUT + 1):  # the next peaks in time order, nearest first
        if step >= len(frames):
            break
        i = np.arange(len(frames) - step)
        dt, df = frames[i + step] - frames[i], bins[i + step] - bins[i]
        ok = (dt > 0) & (dt < MAX_DT) & (np.abs(df) < MAX_DF) & (taken[i] < FANOUT)
        taken[i[ok]] += 1
        anchors.append(i[ok]), dts.append(dt[ok]), dfs.append(df[ok])
    if not anchors:
        return np.empty(0, np.uint32), np.empty(0, np.int32)
    a, dt, df = np.concatenate(anchors), np.concatenate(dts), np.concatenate(dfs)
    hashes = ((bins[a].astype(np.uint32) << (_DT_BITS + _DF_BITS)) | ((df + MAX_DF).astype(np.uint32) << _DT_BITS)
              | dt.astype(np.uint32))
    return hashes, frames[a]


@dataclass(frozen=True)
class Match:
    a: int
    b: int
    count: int  # hashes agreeing on the best offset
    score: float  # count / the shorter clip's hash count
    offset: int  # frames from a to b


def match_all(prints: list[Fingerprint], groups: np.ndarray | None = None) -> list[Match]:
    """Every pair of fingerprints that match (a < b). With `groups`, only pairs with a member in
    group 0 (the dataset; other groups are the eval sets it is checked against)."""
    sizes = np.array([len(p.hashes) for p in prints], np.int64)
    if sizes.sum() == 0:
        return []
    hashes = np.concatenate([p.hashes for p in prints])
    times = np.concatenate([p.times for p in prints])
    items = np.repeat(np.arange(len(prints), dtype=np.int64), sizes)
    order = np.argsort(hashes, kind="stable")
    hashes, times, items = hashes[order], times[order], items[order]
    starts = np.searchsorted(hashes, hashes, side="left")
    ends = np.searchsorted(hashes, hashes, side="right")
    common = (ends - starts) > MAX_BUCKET
    pairs_a, pairs_b, offsets = [], [], []
    for step in range(1, MAX_BUCKET):
        i = np.nonzero((np.arange(len(hashes)) + step < ends) & ~common)[0]
        if len(i) == 0:
            break
        j = i + step
        differ = items[i] != items[j]
        i, j = i[differ], j[differ]
        swap = items[i] > items[j]
        a = np.where(swap, items[j], items[i])
        b = np.where(swap, items[i], items[j])
        offset = np.where(swap, times[i] - times[j], times[j] - times[i])
        pairs_a.append(a), pairs_b.append(b), offsets.append(offset)
    if not pairs_a:
        return []
    a, b, offset = np.concatenate(pairs_a), np.concatenate(pairs_b), np.concatenate(offsets)
    if groups is not None:
        ga, gb = groups[a], groups[b]
        wanted = (ga == 0) | (gb == 0)
        a, b, offset = a[wanted], b[wanted], offset[wanted]
    return _best_offsets(a, b, offset, sizes)


def _best_offsets(a: np.ndarray, b: np.ndarray, offset: np.ndarray, sizes: np.ndarray) -> list[Match]:
    """Per pair of clips, the most hashes agreeing on one offset give or take a frame (a trim that
    is not a whole number of hops moves some peaks to the neighbouring frame)."""
    shift = 1 << 20
    # Each vote counts for its offset and both neighbours; the window's total is the best offset's.
    a3, b3 = np.tile(a, 3), np.tile(b, 3)
    off3 = np.concatenate([offset - 1, offset, offset + 1]) + shift
    key = (a3 << 42) | (b3 << 21) | off3
    keys, counts = np.unique(key, return_counts=True)
    pair = keys >> 21
    order = np.lexsort((-counts, pair))
    pair, keys, counts = pair[order], keys[order], counts[order]
    first = np.ones(len(pair), bool)
    first[1:] = pair[1:] != pair[:-1]
    matches = []
    for k, count in zip(keys[first], counts[first]):
        ia, ib = int(k >> 42), int((k >> 21) & (shift * 2 - 1))
        score = count / max(1, min(sizes[ia], sizes[ib]))
        if count >= MIN_COUNT and score >= MIN_FRACTION:
            matches.append(Match(ia, ib, int(count), float(score), int(k & (shift * 2 - 1)) - shift))
    return matches


__all__ = ["Fingerprint", "Match", "RATE", "fingerprint", "match_all", "mono_at_rate", "peaks"]
