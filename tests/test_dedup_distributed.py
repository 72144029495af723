"""Fingerprint matching over hash partitions (`curate/match.py`): the same matches as matching all in
one process, the stop-list reported and deterministic, partial overlaps with their span, a late
excerpt of a clip longer than one analysis block, resume after an interruption, partitions sized."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from upath import UPath

from audio_dataset.audio import decode, encode_flac
from audio_dataset.curate import fingerprint as fp
from audio_dataset.curate import match as matching
from audio_dataset.curate.dedup import analyse, matched_span
from conftest import REAL_AUDIO_DIR

CLIPS = ("glacier-bay-humpback", "pibble", "147793__setuniman__sweet-waltz-0i-22mi",
         "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra)", "admiralbob77_-_Choice_-_Drum-bass")


@pytest.fixture(scope="module")
def waves() -> dict[str, np.ndarray]:
    """The longer real clips, mono at the fingerprint rate."""
    found = {}
    for name in CLIPS:
        decoded = decode((REAL_AUDIO_DIR / f"{name}.ogg").read_bytes())
        found[name] = fp.mono_at_rate(decoded.samples, decoded.sample_rate, fp.RATE)
    return found


def _seconds(wave: np.ndarray, start: float, length: float) -> np.ndarray:
    return wave[int(start * fp.RATE): int((start + length) * fp.RATE)]


@pytest.fixture(scope="module")
def corpus(waves) -> list[fp.Fingerprint]:
    """12 clips: 5 recordings' first 20 s, a copy of each (gain, excerpts, noise), and two cuts that
    overlap a clip by half."""
    rng = np.random.default_rng(0)
    clips = [_seconds(w, 0, 20) for w in waves.values()]
    clips += [0.5 * clips[0], _seconds(waves[CLIPS[1]], 7.3, 6), _seconds(waves[CLIPS[2]], 12.0, 15),
              clips[3] + 0.003 * rng.standard_normal(len(clips[3])).astype(np.float32),
              _seconds(waves[CLIPS[4]], 12, 4), _seconds(waves[CLIPS[0]], 10, 20), _seconds(waves[CLIPS[3]], 10, 20)]
    return [fp.fingerprint(c) for c in clips]


def _write_parts(folder: Path, prints: list[fp.Fingerprint], per_part: int) -> list[matching.PrintPart]:
    """The prints as fingerprint parts (the columns the matching reads), `per_part` rows a file."""
    parts = []
    for first in range(0, len(prints), per_part):
        chunk = prints[first: first + per_part]
        table = pa.table({"hashes": pa.array([p.hashes for p in chunk], pa.list_(pa.uint64())),
                          "times": pa.array([p.times for p in chunk], pa.list_(pa.int32()))})
        path = folder / f"{first:06d}.parquet"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        parts.append(matching.part_of(UPath(path), first))
    return parts


def _match(tmp_path: Path, prints: list[fp.Fingerprint], name: str, first_other: int | None = None,
           partition_hashes: int | None = None, runner=matching.run_inline) -> matching.MatchResult:
    parts = _write_parts(tmp_path / f"{name}-prints", prints, 3)
    total = sum(p.hashes for p in parts)
    plan = matching.plan_matching(UPath(tmp_path / name), parts, first_other,
                                  partition_hashes or max(1, total // 5))
    return matching.run_matching(plan, runner)


def test_partitioned_matching_equals_matching_all_in_one(tmp_path, corpus):
    result = _match(tmp_path, corpus, "work")
    assert result.report["partitions"] >= 5 and result.report["map_tasks"] >= 2  # it was split
    assert result.matches == fp.match_all(corpus)
    pairs = {(m.a, m.b) for m in result.matches}
    assert {(0, 5), (1, 6), (2, 7), (3, 8), (4, 9), (0, 10), (3, 11)} <= pairs  # each copy found
    assert not pairs & {(a, b) for a in range(5) for b in range(a + 1, 5)}  # distinct recordings are not
    # With eval sets (items 6.. here): only pairs with a dataset member, as match_all with groups.
    groups = np.array([0] * 6 + [1] * 6)
    with_eval = _match(tmp_path, corpus, "work-eval", first_other=6)
    assert with_eval.matches == fp.match_all(corpus, groups)
    assert all(m.a < 6 for m in with_eval.matches) and (0, 10) in {(m.a, m.b) for m in with_eval.matches}


def test_the_stop_list_is_applied_counted_and_deterministic(tmp_path, corpus):
    """A hash in more clips than the threshold (a tone in every clip) is left out, and counted."""
    rng = np.random.default_rng(1)
    crowd = [fp.Fingerprint(np.append(rng.integers(0, 2**fp.KEY_BITS, 30, dtype=np.uint64), np.uint64(7)),
                            np.append(np.arange(30, dtype=np.int32), np.int32(5))) for _ in range(fp.STOP_FLOOR + 20)]
    prints = corpus + crowd
    first, again = _match(tmp_path, prints, "a"), _match(tmp_path, prints, "b")
    stop = first.report["stop_list"]
    assert stop["threshold"] == fp.stop_threshold(len(prints)) == fp.STOP_FLOOR
    assert stop["hashes"] >= 1 and stop["occurrences"] >= fp.STOP_FLOOR + 20
    assert stop == again.report["stop_list"] and first.matches == again.matches == fp.match_all(prints)
    assert (UPath(tmp_path / "a") / "match.json").exists()  # the run record holds the report


def test_a_partial_overlap_is_found_with_its_span(tmp_path, waves):
    whole = _seconds(waves[CLIPS[0]], 0, 60)
    start = 23.4
    excerpt = _seconds(whole, start, 10)
    [m] = _match(tmp_path, [fp.fingerprint(whole), fp.fingerprint(excerpt)], "w").matches
    offset_s, length_s = matched_span(m.offset, len(whole) / fp.RATE, len(excerpt) / fp.RATE)
    assert abs(offset_s - start) <= fp.HOP / fp.RATE and abs(length_s - 10) <= fp.HOP / fp.RATE
    # The other way round (the excerpt listed first), the same span.
    [m] = fp.match_all([fp.fingerprint(excerpt), fp.fingerprint(whole)])
    offset_s, length_s = matched_span(m.offset, len(excerpt) / fp.RATE, len(whole) / fp.RATE)
    assert abs(offset_s - start) <= fp.HOP / fp.RATE and abs(length_s - 10) <= fp.HOP / fp.RATE


def test_a_long_clip_is_fingerprinted_whole_and_its_late_excerpt_found(waves):
    """A 3.4-minute clip, decoded as a stream and analysed in blocks: an excerpt from 2:30 matches."""
    long = np.concatenate([waves[name] for name in CLIPS[:4]])
    assert len(long) / fp.RATE > fp.MAX_SECONDS + 60
    found = analyse(encode_flac(long[None, :], fp.RATE))
    assert found.landmarks.times.max() * fp.HOP / fp.RATE > len(long) / fp.RATE - 5  # to its end (a fade)
    start = 150.0
    excerpt = analyse(encode_flac(_seconds(long, start, 10)[None, :], fp.RATE)).landmarks
    [m] = fp.match_all([found.landmarks, excerpt])
    offset_s, _ = matched_span(m.offset, found.duration, 10.0)
    assert abs(offset_s - start) <= fp.HOP / fp.RATE and m.score > 0.3
    # The landmarks do not depend on how the stream is cut into decoded blocks.
    whole = fp.fingerprint(long)
    streamed = fp.fingerprint_blocks(iter(np.array_split(long, 97)))
    assert np.array_equal(whole.hashes, streamed.hashes) and np.array_equal(whole.times, streamed.times)


class Interrupted(Exception):
    pass


def test_resume_after_an_interruption_equals_a_clean_run(tmp_path, corpus):
    clean = _match(tmp_path, corpus, "clean")
    done = []

    def dies_midway(task, plan, count):  # the run is killed during the hash round, some tasks done
        if task is matching.hash_task:
            for i in range(count // 2):
                done.append(task(plan, i))
            raise Interrupted
        return matching.run_inline(task, plan, count)

    with pytest.raises(Interrupted):
        _match(tmp_path, corpus, "killed", runner=dies_midway)
    resumed = _match(tmp_path, corpus, "killed")
    assert resumed.matches == clean.matches and done
    assert resumed.report["resumed_tasks"] == clean.report["map_tasks"] + len(done)
    assert {k: v for k, v in resumed.report.items() if k not in ("seconds", "resumed_tasks", "peak_rss_mb")} == \
        {k: v for k, v in clean.report.items() if k not in ("seconds", "resumed_tasks", "peak_rss_mb")}
    assert not (tmp_path / "killed" / "hashes").exists()  # intermediates go once done
    assert _match(tmp_path, corpus, "killed").report["resumed"]  # a finished matching is read back


def test_partitions_are_sized_by_the_plan(tmp_path, corpus):
    total = sum(len(p.hashes) for p in corpus)
    result = _match(tmp_path, corpus, "sized", partition_hashes=total // 8)
    sizes = result.report["partition_hashes"]
    assert len(sizes) == result.report["partitions"] == 9 and sum(sizes) == total == result.report["hashes"]
    assert max(sizes) <= 2 * (total // 8)  # hashes are mixed before bucketing: no range holds most
    assert result.matches == fp.match_all(corpus)


def test_matching_on_ray_equals_inline(tmp_path, corpus, ray_local):
    result = _match(tmp_path, corpus, "ray", runner=matching.run_on_ray)
    assert result.matches == fp.match_all(corpus) and result.report["peak_rss_mb"] > 0


@pytest.mark.parametrize("hashes, times", [
    (pa.list_(pa.uint32()), pa.list_(pa.int32())),  # an earlier version's keys (triplets)
    (pa.list_(pa.int64()), pa.list_(pa.int32())),
    (pa.list_(pa.string()), pa.list_(pa.int32())),
    (pa.list_(pa.uint64()), pa.list_(pa.float64())),
    (pa.list_(pa.uint64()), pa.list_(pa.int32()), ),  # with a null key, below
])
def test_a_part_of_another_format_is_refused_in_one_line(tmp_path, corpus, hashes, times):
    """A fingerprint part is resume state anyone may have left: keys of another type were cast and
    silently mixed with this version's (a uint32 triplet never equals a 56-bit key), text keys and
    nulls ended in a traceback."""
    from audio_dataset.source import UserError

    keys = [p.hashes.astype(np.uint32) if hashes.value_type == pa.uint32() else p.hashes for p in corpus[:3]]
    values = [[str(k) for k in row] if hashes.value_type == pa.string() else
              [None, *row[1:].tolist()] if hashes.value_type == pa.uint64() and times.value_type == pa.int32()
              else row for row in keys]
    path = tmp_path / "prints" / "000000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"hashes": pa.array(values, hashes),
                             "times": pa.array([p.times for p in corpus[:3]], times)}), path)
    plan = matching.plan_matching(UPath(tmp_path / "work"), [matching.part_of(UPath(path), 0)], None)
    with pytest.raises(UserError, match="not a fingerprint part of this version .*remove it to fingerprint"):
        matching.run_matching(plan)


def _rewrite(path: Path, change) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


@pytest.mark.parametrize("where, tamper, says", [
    ("hashes/*/*.parquet", lambda p: _rewrite(p, lambda t: t.drop(["hash"])), "not this matching's file"),
    ("hashes/*/*.parquet", lambda p: _rewrite(p, lambda t: t.set_column(0, "hash", t.column(0).cast(pa.string()))),
     "not this matching's file"),
    ("hashes/*/*.parquet", lambda p: _rewrite(p, lambda t: t.set_column(
        1, "item", pa.array(np.full(t.num_rows, 10**6, np.uint32)))), "pairs of items the plan does not hold"),
    ("votes/*/*.parquet", lambda p: _rewrite(p, lambda t: t.drop(["count"])), "not this matching's file"),
    ("votes/*/*.parquet", lambda p: _rewrite(p, lambda t: t.set_column(
        0, "pair", pa.array(np.full(t.num_rows, (5 << 32) | 900, np.uint64)))), "pairs of items the plan does not hold"),
    ("sizes/*.npy", lambda p: p.write_bytes(_npy(np.array([{"a": 1}], dtype=object))), "unreadable"),
    ("sizes/*.npy", lambda p: p.write_bytes(_npy(np.array(["x", "y", "z"]))), "not hash counts"),
    ("sizes/*.npy", lambda p: p.write_bytes(_npy(np.zeros((3, 2)))), "not hash counts"),
    ("done/m*.json", lambda p: p.write_text("{}"), "not a finished task's record"),
])
def test_a_matchings_own_files_edited_are_refused_in_one_line(tmp_path, corpus, where, tamper, says):
    """WORK's files are resume state anyone may have edited: each ended in a traceback (a schema
    that will not concatenate, an item past the plan indexing the sizes, a pickled .npy, a marker
    without its counts)."""
    from audio_dataset.source import UserError

    def killed(task, plan, count):  # after the round that wrote the files edited
        if task is (matching.hash_task if where.startswith("hashes") else matching.pair_task):
            raise Interrupted
        return matching.run_inline(task, plan, count)

    with pytest.raises(Interrupted):
        _match(tmp_path, corpus, "work", runner=killed)
    tamper(sorted((tmp_path / "work").glob(where))[0])
    with pytest.raises(UserError, match=f"{says}.*remove .* to match again"):
        _match(tmp_path, corpus, "work")


@pytest.mark.parametrize("bucket_items", [1_000_000, 7])
def test_exact_links_spooled_in_buckets_equal_grouping_all_at_once(tmp_path, monkeypatch, bucket_items):
    """Each sample links to the first dataset sample of its PCM digest; eval-only digests link
    nothing; nulls never link. With buckets of 7 the digests go through files under WORK (removed
    after), and the links are the same as with every digest held at once."""
    from audio_dataset.curate import dedup

    monkeypatch.setattr(dedup, "EXACT_BUCKET_ITEMS", bucket_items)
    rng = np.random.default_rng(3)
    digests = [None if i % 17 == 0 else f"{int(rng.integers(0, 40)):064x}" for i in range(200)]
    groups = [0] * 150 + [1] * 50
    digests[160] = f"{999:064x}"  # two eval samples alone share a digest: no dataset anchor
    digests[170] = f"{999:064x}"
    items = _digests_items(tmp_path / "parts", digests, groups)
    want = set()
    for i, digest in enumerate(digests):
        anchor = next((j for j in range(150) if digests[j] == digest), None) if digest is not None else None
        if anchor is not None and anchor != i:
            want.add((anchor, i))
    got = dedup.exact_links(items, UPath(tmp_path / "work"))
    assert {(link.a, link.b) for link in got} == want and len(want) > 100
    assert all(link.kind == dedup.EXACT for link in got) and not (tmp_path / "work" / "exact").exists()


def test_exact_links_spooled_with_no_digest_at_all_link_nothing(tmp_path, monkeypatch):
    """More samples than a bucket, none with a PCM digest (none decoded): nothing is spooled, and
    removing the spool folder that was never made ended in a traceback (FileNotFoundError)."""
    from audio_dataset.curate import dedup

    monkeypatch.setattr(dedup, "EXACT_BUCKET_ITEMS", 7)
    items = _digests_items(tmp_path / "parts", [None] * 30, [0] * 20 + [1] * 10)
    assert dedup.exact_links(items, UPath(tmp_path / "work")) == []
    assert not (tmp_path / "work" / "exact").exists()


def _digests_items(folder: Path, digests: list, groups: list[int]):
    """Parts of 23 rows or fewer (never spanning two groups)."""
    from audio_dataset.curate.dedup import Items

    folder.mkdir(parents=True, exist_ok=True)
    parts, part_groups, first = [], [], 0
    while first < len(digests):
        last = min(first + 23, len(digests))
        last = next(j for j in range(first + 1, last + 1) if j == last or groups[j] != groups[first])
        path = folder / f"{first:06d}.parquet"
        pq.write_table(pa.table({"pcm_sha256": pa.array(digests[first:last], pa.string())}), path)
        parts.append(matching.PrintPart(str(path), first, last - first, 0))
        part_groups.append(groups[first])
        first = last
    return Items(parts, part_groups, ["dataset", "eval"])


def test_items_are_listed_in_time_linear_in_the_parts(monkeypatch):
    """_load_items numbered each part by summing the rows of every part before it: quadratic in the
    parts (8 s for 20k shards, minutes for 100k) where the old driver kept a running count."""
    import time

    from audio_dataset.curate import dedup
    from audio_dataset.stage_runner import ShardJob

    jobs = [ShardJob("train", f"{i:06d}.tar", "", "", f"/p/{i:06d}.parquet") for i in range(30_000)]
    monkeypatch.setattr(dedup, "find_jobs", lambda *args, **kwargs: jobs)
    monkeypatch.setattr(matching, "part_of", lambda path, first: matching.PrintPart(str(path), first, 7, 0))
    started = time.process_time()
    items = dedup._load_items([(UPath("/d"), UPath("/p")), (UPath("/e"), UPath("/q"))])
    assert time.process_time() - started < 4
    assert [p.first for p in items.parts[:3]] == [0, 7, 14] and items.parts[-1].first == 7 * (2 * len(jobs) - 1)
    assert items.count == 7 * 2 * len(jobs) and items.first_other == 7 * len(jobs)


@pytest.mark.parametrize("tamper, says", [
    (lambda path: pq.write_table(pa.table({"pcm_sha256": pa.array(range(23), pa.int64())}), path), "pcm_sha256 int64"),
    (lambda path: pq.write_table(pa.table({"other": ["x"] * 23}), path), "unreadable fingerprint part"),
    (lambda path: path.write_bytes(b"PAR1 not a parquet"), "unreadable fingerprint part"),
    (lambda path: path.unlink(), "unreadable fingerprint part"),
])
def test_a_part_changed_since_listing_is_one_line_where_the_driver_reads_it(tmp_path, tamper, says):
    """The driver lists the parts, then reads their digests and the linked samples' rows: a part
    retyped, stripped, corrupted or removed in between is refused naming it, not a traceback."""
    from audio_dataset.curate import dedup
    from audio_dataset.source import UserError

    items = _digests_items(tmp_path / "parts", [f"{i % 5:064x}" for i in range(46)], [0] * 46)
    tamper(Path(items.parts[1].path))
    with pytest.raises(UserError, match=says):
        dedup.exact_links(items, UPath(tmp_path / "work"))
    with pytest.raises(UserError, match=says):
        items.rows({30}, ["pcm_sha256"])
