"""Audio fingerprints after Wang (2003), "An Industrial-Strength Audio Search Algorithm" (Shazam):
spectrogram peaks ("constellation"), an anchor peak with four of its next five peaks hashed as
(f1, f2 - f1, t2 - t1, ..., f5 - f1, t5 - t1) in 56 of a key's 64 bits, and a match is many shared
keys at one consistent time offset.

Why five peaks: two distinct clips' keys must almost never be equal, or chance votes grow with the
square of the corpus. Measured on real audio (`bench/dedup_scale.py`: 584 clips, pairs holding no
recording in common), a key's odds of equalling one of another clip are ~1.8e-7 for a triplet
(32 bits, as Panako and Olaf hash; at 1M clips ~1e11 chance votes), ~2e-9 for an anchor with three
partners and ~2e-11 with four (~3e7 chance votes at 1M clips), while a copy keeps a key whenever it
keeps its five peaks (an MP3 copy kept 40-60% of them).

Peaks are local maxima of the log spectrogram, the strongest few per second: a gain change shifts
every log magnitude alike and keeps them; re-encoding, resampling and mono/stereo mixing keep the
strong peaks; a trim moves all of them by one offset, which the offset histogram absorbs. Parameters
follow Ellis's audfprint (11025 Hz, 512-point FFT, hop 256).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from scipy.ndimage import maximum_filter

from audio_dataset.audio import resample, set_channels

RATE = 11_025
N_FFT = 512
HOP = 256
PEAKS_PER_SECOND = 12  # the strongest peaks: they survive a re-encode best
FANOUT = 5  # partners per anchor peak
MAX_DT = 40  # frames (~0.93 s) ahead an anchor looks for partners
MAX_DF = 32  # bins either side
NEIGHBOURHOOD = (9, 7)  # (freq bins, frames): a peak is the maximum of this box
SHIFTS = (0, HOP // 4, HOP // 2, 3 * HOP // 4)  # analyses this many samples in (see _block_landmarks)
# A clip is analysed in blocks of this many seconds overlapping by BLOCK_OVERLAP (a block's edges
# are dropped, each anchor is kept by exactly one block): any length in bounded memory.
MAX_SECONDS = 120.0
BLOCK_OVERLAP = 4.0
# A match: at least this many hashes agree on one offset (within a frame), and that is at least
# this fraction of the shorter clip's hashes.
MIN_COUNT = 20
MIN_FRACTION = 0.1
# The stop-list: a hash found in more than max(STOP_FLOOR, STOP_FRACTION * clips) clips says nothing
# (silence, hum, a test tone) and would cost n^2 candidate pairs; it is left out of matching, and
# how many hashes (and occurrences) that drops is reported.
STOP_FLOOR = 100
STOP_FRACTION = 1e-4

_DT_BITS, _DF_BITS = 6, 6
PART_BITS = _DT_BITS + _DF_BITS
PARTNERS = 4  # peaks a key joins to its anchor: FANOUT choose PARTNERS keys per anchor
_COMBOS = tuple(itertools.combinations(range(FANOUT), PARTNERS))  # which of an anchor's FANOUT partners
KEY_BITS = 8 + PARTNERS * PART_BITS  # the anchor's band, then each partner's (df, dt)


@dataclass(frozen=True)
class Fingerprint:
    hashes: np.ndarray  # uint64 keys (KEY_BITS used)
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
    floor = np.median(spec, axis=0) + 1.0  # below the frame's typical level is noise, not a landmark
    local = (spec == maximum_filter(spec, size=NEIGHBOURHOOD, mode="constant", cval=-np.inf)) & (spec > floor)
    local[0] = False  # DC
    bins, frames = np.nonzero(local)
    # A strict order, strongest first (ties: lower bin, then earlier frame), in which two peaks
    # compare alike however the clip is trimmed: a plateau of equal maxima cannot keep them all.
    rank = np.empty(len(bins), np.int64)
    rank[np.lexsort((frames, bins, -spec[bins, frames]))] = np.arange(len(bins))
    # By frame, strongest first within it. A frame's peaks past its PEAKS_PER_SECOND strongest have
    # that many stronger peaks in every window holding them, so they are never chosen: dropped
    # first, which bounds the work below.
    order = np.lexsort((rank, frames))
    bins, frames, rank = bins[order], frames[order], rank[order]
    top = np.arange(len(frames)) - np.searchsorted(frames, frames) < PEAKS_PER_SECOND
    keep = np.flatnonzero(top)[_strongest(frames[top], rank[top], PEAKS_PER_SECOND, round(RATE / HOP / 2))]
    keep = keep[np.lexsort((bins[keep], frames[keep]))]  # by frame, then bin, as _landmarks pairs them
    return frames[keep].astype(np.int32), bins[keep].astype(np.int32)


def _strongest(frames: np.ndarray, rank: np.ndarray, most: int, half: int) -> np.ndarray:
    """Which peaks (sorted by frame, any order within one; `rank` 0 is the strongest) have fewer than `most` stronger
    peaks within `half` frames either side: a window centred on each peak, so a trim, which moves
    every peak alike, keeps the same choice (fixed one-second blocks cut elsewhere in a trimmed copy
    and chose other peaks). At most `most` peaks are chosen in any `half` frames."""
    stronger = np.zeros(len(frames), np.int64)
    live = np.arange(len(frames))
    for step in itertools.count(1):  # each peak against the next ones, while within the window
        live = live[live + step < len(frames)]
        live = live[frames[live + step] - frames[live] <= half]
        if len(live) == 0:
            break
        later = live + step
        stronger[live] += rank[later] < rank[live]
        stronger[later] += rank[live] < rank[later]
    return stronger < most


def stop_threshold(clips: int) -> int:
    """The most clips a hash may be in and still be matched (the stop-list rule)."""
    return max(STOP_FLOOR, int(np.ceil(STOP_FRACTION * clips)))


def fingerprint(wave: np.ndarray) -> Fingerprint:
    """Landmark hashes of mono float audio at RATE (see `mono_at_rate`)."""
    return fingerprint_blocks(iter([wave]))


def fingerprint_blocks(blocks: Iterator[np.ndarray]) -> Fingerprint:
    """Landmark hashes of mono float audio at RATE given in blocks of any size (a stream): the clip
    is analysed MAX_SECONDS at a time, so memory is bounded whatever its length."""
    size, step = int(MAX_SECONDS * RATE), int((MAX_SECONDS - BLOCK_OVERLAP) * RATE) // HOP * HOP
    margin = int(BLOCK_OVERLAP / 2 * RATE) // HOP  # frames each side of a block boundary
    buffer, start, parts = np.empty(0, np.float32), 0, []
    for block in blocks:
        buffer = np.concatenate([buffer, np.asarray(block, np.float32)])
        while len(buffer) > size:
            parts.append(_block_landmarks(buffer[:size], start // HOP, margin if start else 0, step // HOP + margin))
            buffer, start = buffer[step:], start + step
    parts.append(_block_landmarks(buffer, start // HOP, margin if start else 0, None))
    return Fingerprint(np.concatenate([h for h, _ in parts]), np.concatenate([t for _, t in parts]))


def _block_landmarks(wave: np.ndarray, first: int, head: int, until: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A block's landmarks from four analyses a quarter hop apart (audfprint shifts its queries so):
    a peak's frame moves with a shift of a fraction of a hop (half the peaks move at a quarter hop),
    so a trim by any amount lands within an eighth of a hop of one analysis, where its peaks keep
    their spacing. The block keeps the anchors in its frames [head, until) (the others belong to the
    blocks around it); times are frames from the clip's start (`first` is the block's)."""
    hashes, times = [], []
    for shift in SHIFTS:
        h, t = _landmarks(wave[shift:])
        keep = (t >= head) & (t < (until if until is not None else np.iinfo(np.int32).max))
        hashes.append(h[keep]), times.append(t[keep] + first)
    return np.concatenate(hashes), np.concatenate(times).astype(np.int32)


def _landmarks(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    frames, bins = peaks(wave)
    partners = np.full((len(frames), FANOUT), -1, np.int64)
    taken = np.zeros(len(frames), np.int32)
    for step in range(1, 3 * FANOUT + 1):  # the next peaks in time order, nearest first
        if step >= len(frames):
            break
        i = np.arange(len(frames) - step)
        dt, df = frames[i + step] - frames[i], bins[i + step] - bins[i]
        ok = (dt > 0) & (dt < MAX_DT) & (np.abs(df) < MAX_DF) & (taken[i] < FANOUT)
        partners[i[ok], taken[i[ok]]] = i[ok] + step
        taken[i[ok]] += 1
    hashes, anchors = [], []
    band = np.minimum(bins, 255).astype(np.uint64) << np.uint64(PARTNERS * PART_BITS)
    for combo in _COMBOS:
        a = np.nonzero(partners[:, combo[-1]] >= 0)[0]
        key = band[a]
        for n, p in enumerate(combo):
            key |= _part(bins, frames, a, partners[a, p]) << np.uint64((PARTNERS - 1 - n) * PART_BITS)
        hashes.append(key)
        anchors.append(a)
    a = np.concatenate(anchors)
    order = np.argsort(a, kind="stable")
    return np.concatenate(hashes)[order], frames[a[order]].astype(np.int32)


def _part(bins: np.ndarray, frames: np.ndarray, a: np.ndarray, j: np.ndarray) -> np.ndarray:
    """A partner's 12 bits: (df + MAX_DF) then dt."""
    return ((bins[j] - bins[a] + MAX_DF).astype(np.uint64) << np.uint64(_DT_BITS)) \
        | (frames[j] - frames[a]).astype(np.uint64)


@dataclass(frozen=True)
class Match:
    a: int
    b: int
    count: int  # hashes agreeing on the best offset
    score: float  # count / the shorter clip's hash count
    offset: int  # frames from a to b


@dataclass
class Votes:
    """Candidate votes of one set of hash occurrences: per (pair of items a < b, offset t_b - t_a),
    how many hashes agree; and what the stop-list left out."""

    pair: np.ndarray  # uint64: a << 32 | b
    offset: np.ndarray  # int32, frames
    count: np.ndarray  # int64
    stopped_hashes: int = 0  # distinct hashes over the stop-list threshold
    stopped_occurrences: int = 0  # their occurrences, not matched


def candidate_votes(hashes: np.ndarray, times: np.ndarray, items: np.ndarray, threshold: int,
                    first_other: int | None = None) -> Votes:
    """Every pair of items sharing a hash votes for its time offset. Hashes found in more than
    `threshold` items are stop-listed. With `first_other`, items from it on (the eval sets) are only
    paired with items below it (the dataset). Every occurrence of a hash must be in these arrays:
    the caller partitions by hash, never splitting one hash's occurrences."""
    order = np.lexsort((items, hashes))
    hashes, times, items = hashes[order], times[order].astype(np.int64), items[order].astype(np.int64)
    new_hash = np.ones(len(hashes), bool)
    new_hash[1:] = hashes[1:] != hashes[:-1]
    new_item = new_hash.copy()
    new_item[1:] |= items[1:] != items[:-1]
    group = np.cumsum(new_hash) - 1
    starts = np.nonzero(new_hash)[0]
    df = np.add.reduceat(new_item.astype(np.int64), starts) if len(starts) else np.empty(0, np.int64)
    stopped = df > threshold
    keep = ~stopped[group]
    stopped_hashes, stopped_occurrences = int(stopped.sum()), int((~keep).sum())
    hashes, times, items = hashes[keep], times[keep], items[keep]
    ends = np.searchsorted(hashes, hashes, side="right")
    pairs, offsets = [], []
    live = np.arange(len(hashes))
    for step in itertools.count(1):  # the group's next occurrences, until no group is that long
        live = live[live + step < ends[live]]
        if len(live) == 0:
            break
        i, j = live, live + step
        differ = items[i] != items[j]
        i, j = i[differ], j[differ]  # sorted by item within a hash: items[i] < items[j]
        if first_other is not None:
            wanted = items[i] < first_other
            i, j = i[wanted], j[wanted]
        pairs.append((items[i].astype(np.uint64) << np.uint64(32)) | items[j].astype(np.uint64))
        offsets.append(times[j] - times[i])
    votes = aggregate(np.concatenate(pairs) if pairs else np.empty(0, np.uint64),
                      np.concatenate(offsets) if offsets else np.empty(0, np.int64),
                      None)
    votes.stopped_hashes, votes.stopped_occurrences = stopped_hashes, stopped_occurrences
    return votes


def aggregate(pair: np.ndarray, offset: np.ndarray, count: np.ndarray | None) -> Votes:
    """The votes summed per (pair, offset)."""
    count = np.ones(len(pair), np.int64) if count is None else count.astype(np.int64)
    if len(pair) == 0:
        return Votes(np.empty(0, np.uint64), np.empty(0, np.int32), np.empty(0, np.int64))
    order = np.lexsort((offset, pair))
    pair, offset, count = pair[order], offset[order], count[order]
    first = np.ones(len(pair), bool)
    first[1:] = (pair[1:] != pair[:-1]) | (offset[1:] != offset[:-1])
    starts = np.nonzero(first)[0]
    return Votes(pair[starts], offset[starts].astype(np.int32), np.add.reduceat(count, starts))


def best_matches(votes: Votes, sizes: np.ndarray) -> list[Match]:
    """Per pair of clips, the most hashes agreeing on one offset give or take a frame (a trim that
    is not a whole number of hops moves some peaks to the neighbouring frame); a match when that
    is at least MIN_COUNT and MIN_FRACTION of the shorter clip's hashes. `votes` must hold all of
    a pair's votes. `sizes`: each item's hash count."""
    # A pair with fewer votes in all than MIN_COUNT cannot match: most pairs (chance collisions) go
    # here, before the window below triples what is held.
    votes = _with_total(votes, MIN_COUNT)
    # Each vote counts for its offset and both neighbours; the window's total is the best offset's.
    offset = votes.offset.astype(np.int64)
    window = aggregate(np.tile(votes.pair, 3), np.concatenate([offset - 1, offset, offset + 1]),
                       np.tile(votes.count, 3))
    if len(window.pair) == 0:
        return []
    order = np.lexsort((window.offset, -window.count, window.pair))  # per pair: most votes, then lowest offset
    pair, offset, count = window.pair[order], window.offset[order], window.count[order]
    first = np.ones(len(pair), bool)
    first[1:] = pair[1:] != pair[:-1]
    pair, offset, count = pair[first], offset[first], count[first]
    a, b = (pair >> np.uint64(32)).astype(np.int64), (pair & np.uint64(0xFFFFFFFF)).astype(np.int64)
    score = count / np.maximum(1, np.minimum(sizes[a], sizes[b]))
    ok = (count >= MIN_COUNT) & (score >= MIN_FRACTION)
    return [Match(int(x), int(y), int(c), float(sc), int(o))
            for x, y, c, sc, o in zip(a[ok], b[ok], count[ok], score[ok], offset[ok])]


def _with_total(votes: Votes, least: int) -> Votes:
    """The votes of the pairs with at least `least` votes in all (`votes` sorted by pair, as
    `aggregate` leaves them)."""
    if len(votes.pair) == 0:
        return votes
    first = np.ones(len(votes.pair), bool)
    first[1:] = votes.pair[1:] != votes.pair[:-1]
    starts = np.nonzero(first)[0]
    totals = np.add.reduceat(votes.count, starts)
    keep = np.repeat(totals >= least, np.diff(np.append(starts, len(votes.pair))))
    return Votes(votes.pair[keep], votes.offset[keep], votes.count[keep])


def match_all(prints: list[Fingerprint], groups: np.ndarray | None = None,
              threshold: int | None = None) -> list[Match]:
    """Every pair of fingerprints that match (a < b), all in memory: the reference the partitioned
    matching (`curate/match.py`) equals. With `groups`, only pairs with a member in group 0 (the
    dataset, listed first; other groups are the eval sets it is checked against)."""
    sizes = np.array([len(p.hashes) for p in prints], np.int64)
    if sizes.sum() == 0:
        return []
    items = np.repeat(np.arange(len(prints), dtype=np.int64), sizes)
    first_other = None
    if groups is not None:
        if np.any(np.diff(groups) < 0) or (len(groups) and groups[0] != 0):
            raise ValueError("groups must list the dataset (group 0) first")
        first_other = int((groups == 0).sum())
    votes = candidate_votes(np.concatenate([p.hashes for p in prints]), np.concatenate([p.times for p in prints]),
                            items, threshold if threshold is not None else stop_threshold(len(prints)), first_other)
    return sorted(best_matches(votes, sizes), key=lambda m: (m.a, m.b))


__all__ = ["Fingerprint", "Match", "RATE", "Votes", "aggregate", "best_matches", "candidate_votes", "fingerprint",
           "fingerprint_blocks", "match_all", "mono_at_rate", "peaks", "stop_threshold"]
