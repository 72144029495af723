"""Transcode benchmark: our build against a plain ffmpeg-per-file loop, side by side in one run.

    python bench/transcode.py [--items 400 1536] [--cores N] [--repeat 2] [--skip-memory]

Inputs: N distinct OGG Vorbis files made from the ten test clips: copy k of a clip is the clip with
a few samples changed (so no two inputs share bytes or decoded audio) re-encoded as Vorbis, with the
clip's caption sidecar. They are made once and cached (`--cache`); a folder of N of them is linked
from the cache, one link per distinct file, so the local source lists exactly N items.

For each N, in one run with Ray started and its workers warmed before timing:
1. the build: `build()` over the N files (wall time, and the CPU seconds of the whole process
   tree: driver, GCS, raylet, workers);
2. the ffmpeg loop: the bundled ffmpeg (imageio-ffmpeg) once per file for the same conversion
   (decode, resample to 48 kHz mono, 16-bit FLAC), as many at once as cores;
3. the CPU ceiling: the in-process decode + resample + FLAC encode of every file (every segment
   read, as the build reads it), CPU seconds summed on one core and divided by the cores.
Fraction of the ceiling = ceiling / build wall time. On a loaded machine the wall times swell; the
CPU figure (in-process transcode CPU / build tree CPU) says how much of the build's own CPU goes
to the transcode whatever else runs.

Every run checks it did the work it reports and stops with an error otherwise: the build's manifest
has one `ok` row per input, its shards hold exactly the expected samples (one per clip here) and
their FLACs the expected number of frames; the ffmpeg loop wrote one FLAC per input; the in-process
pass encoded one segment per input.

Memory (unless --skip-memory): the peak RSS of the whole build process tree for M and for
`--memory-scale` x M items.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import soundfile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import BenchFailed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLIPS = sorted((ROOT / "tests" / "data" / "real-audio").glob("*.ogg"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "audiodata-bench" / "transcode-v1"
OUTPUT_RATE = 48_000


def _copy_name(index: int) -> str:
    return f"{index:06d}_{CLIPS[index % len(CLIPS)].stem}"


def _make_copy(index: int, folder: str) -> None:
    """Copy `index` of clip `index % 10`: a few samples changed, so the copy is a distinct file."""
    clip = CLIPS[index % len(CLIPS)]
    samples, rate = soundfile.read(clip, dtype="float32", always_2d=True)
    rng = np.random.default_rng(index)
    where = rng.integers(0, len(samples), size=8)
    samples[where] += rng.uniform(-0.01, 0.01, size=(8, samples.shape[1])).astype(np.float32)
    target = Path(folder) / f"{_copy_name(index)}.ogg"
    partial = target.with_suffix(".part")
    soundfile.write(partial, samples, rate, format="OGG", subtype="VORBIS")
    sidecar = json.loads(clip.with_suffix(".json").read_text(encoding="utf-8"))
    target.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
    partial.rename(target)


def cached_copies(count: int, cache: Path, workers: int) -> list[Path]:
    """The first `count` distinct copies, made (in parallel) where the cache lacks them."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(count) if not (cache / f"{_copy_name(i)}.ogg").exists()]
    if missing:
        print(f"making {len(missing)} distinct input copies in {cache} (once) ...", flush=True)
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(_make_copy, missing, [str(cache)] * len(missing), chunksize=8))
    return [cache / f"{_copy_name(i)}.ogg" for i in range(count)]


def make_inputs(folder: Path, count: int, cache: Path, workers: int) -> list[Path]:
    """A folder of `count` distinct inputs (links into the cache, one per distinct file) with sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in cached_copies(count, cache, workers):
        for member in (source, source.with_suffix(".json")):
            link = folder / member.name
            if not link.exists():
                os.link(member, link) if member.stat().st_dev == folder.stat().st_dev else shutil.copy(member, link)
        paths.append(folder / source.name)
    digests = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    if len(digests) != count:
        raise BenchFailed(f"{count} inputs hold only {len(digests)} distinct files")
    return paths


def expected_frames(paths: list[Path]) -> list[int]:
    """Output frames at 48 kHz per input, from the source's own header."""
    return [round(soundfile.info(str(p)).frames * OUTPUT_RATE / soundfile.info(str(p)).samplerate) for p in paths]


# --------------------------------------------------------------------------- CPU accounting


def _tree_pids(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """(role, user + system CPU seconds) of every live process under `root` (itself included):
    role `driver` (root), `worker` (a Ray worker, `ray::...`) or `ray` (GCS, raylet, agents)."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for pid in _tree_pids(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        role = "driver" if pid == root else "worker" if command.startswith(b"ray::") else "ray"
        times[pid] = (role, (int(fields[11]) + int(fields[12])) / tick)
    return times


def cpu_between(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, per role."""
    spent = {"driver": 0.0, "worker": 0.0, "ray": 0.0}
    for pid, (role, seconds) in after.items():
        spent[role] += seconds - before.get(pid, (role, 0.0))[1]
    return spent


# --------------------------------------------------------------------------- the three measures


def ffmpeg_loop(paths: list[Path], out: Path, cores: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the ffmpeg processes) of the plain loop."""
    import ffmpeg  # ffmpeg-python builds the command line; the binary comes from imageio-ffmpeg

    binary = imageio_ffmpeg.get_ffmpeg_exe()
    out.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> None:
        stream = ffmpeg.input(str(path)).output(str(out / f"{path.stem}.flac"), ac=1, ar=OUTPUT_RATE,
                                                sample_fmt="s16", acodec="flac", loglevel="error")
        stream.run(cmd=binary, overwrite_output=True, quiet=True)

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(one, paths))
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    written = len(list(out.glob("*.flac")))
    if written != len(paths):
        raise BenchFailed(f"the ffmpeg loop wrote {written} FLACs for {len(paths)} inputs")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cpu_seconds_in_process(paths: list[Path]) -> float:
    """CPU seconds of the build's transcode of every file on one core, each segment's FLAC read."""
    from audio_dataset.audio import AudioConfig, transcode

    config = AudioConfig()
    segments = 0
    start = time.process_time()
    for path in paths:
        for segment in transcode(path, config).iter_segments():
            segment.file.read()
            segment.file.close()
            segments += 1
    spent = time.process_time() - start
    if segments != len(paths):
        raise BenchFailed(f"the in-process transcode made {segments} segments for {len(paths)} inputs")
    return spent


def ours(folder: Path, out: Path, cores: int, per_shard: int) -> tuple[float, dict[str, float]]:
    """(wall seconds, CPU seconds of the process tree per role) of `build()`."""
    from audio_dataset.build import BuildOptions, build
    from audio_dataset.source import SourceConfig

    before = tree_cpu_seconds(os.getpid())
    start = time.perf_counter()
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(folder)),
                       samples_per_shard=per_shard, workers=cores, progress=False))
    wall = time.perf_counter() - start
    return wall, cpu_between(before, tree_cpu_seconds(os.getpid()))


def check_build(out: Path, paths: list[Path], frames: list[int]) -> None:
    """The build made one ok row and one sample per input, each FLAC 48 kHz mono with the input's
    length in frames (to a frame or two of resampling rounding)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "manifest.parquet", columns=["source_id", "status", "n_samples"]).to_pylist()
    if len(rows) != len(paths):
        raise BenchFailed(f"the build listed {len(rows)} items for {len(paths)} inputs")
    bad = [r for r in rows if r["status"] != "ok" or r["n_samples"] != 1]
    if bad:
        raise BenchFailed(f"{len(bad)} items not built as one sample each, e.g. {bad[0]}")
    want = dict(zip((p.name for p in paths), frames))
    got: dict[str, int] = {}
    for shard in sorted(out.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, sample in members.items():
            name = Path(json.loads(sample["json"])["source_id"]).name
            info = soundfile.info(io.BytesIO(sample["flac"]))
            if info.samplerate != OUTPUT_RATE or info.channels != 1:
                raise BenchFailed(f"{shard.name}/{key}: {info.samplerate} Hz, {info.channels} channels")
            if name in got:
                raise BenchFailed(f"{name} has two samples")
            got[name] = info.frames
    if set(got) != set(want):
        raise BenchFailed(f"the shards hold {len(got)} samples ({len(set(got) & set(want))} of the inputs), "
                          f"expected {len(want)}")
    off = [name for name in want if abs(got[name] - want[name]) > 2]
    if off:
        raise BenchFailed(f"{len(off)} samples of the wrong length, e.g. {off[0]}: {got[off[0]]} frames, "
                          f"expected {want[off[0]]}")


def schedule_bound(out: Path, cores: int) -> float:
    """The best fraction of the ceiling this build's shard layout allows: each shard's work taken as
    its audio seconds, run largest first (as the build submits them) on the earliest free core;
    total work / (cores x the time the last core finishes). Below 1 where a few long shards end
    on one core while the others idle."""
    import heapq

    import pyarrow.parquet as pq

    rows = pq.read_table(out / "manifest.parquet", columns=["shard", "source_duration"]).to_pylist()
    work: dict[str, list[float]] = {}
    for row in rows:
        work.setdefault(row["shard"], []).append(row["source_duration"])
    order = sorted(work.values(), key=len, reverse=True)
    free = [0.0] * cores
    for shard in order:
        heapq.heapreplace(free, free[0] + sum(shard))
    total = sum(map(sum, order))
    return total / (cores * max(free))


def _tree_rss(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    total = 0
    for pid in _tree_pids(root_pid):
        try:
            pages = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[21])
        except (OSError, IndexError, ValueError):
            continue
        total += pages * os.sysconf("SC_PAGE_SIZE")
    return total


def peak_rss_of_build(folder: Path, out: Path, cores: int, per_shard: int, count: int) -> int:
    cmd = [sys.executable, "-m", "audio_dataset.cli", "build", "--source", "local", "--input", str(folder),
           "--out", str(out), "--workers", str(cores), "--samples-per-shard", str(per_shard), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise BenchFailed(f"build failed with exit code {proc.returncode}")
    import pyarrow.parquet as pq

    built = sum(pq.read_table(out / "manifest.parquet", columns=["n_samples"]).column("n_samples").to_pylist())
    if built != count:
        raise BenchFailed(f"the memory run built {built} samples for {count} inputs")
    return peak


def one_size(work: Path, count: int, args: argparse.Namespace) -> dict[str, float]:
    """Build, ffmpeg loop and in-process transcode of `count` inputs, each checked."""
    paths = make_inputs(work / f"in-{count}", count, args.cache, args.cores)
    frames = expected_frames(paths)
    audio_seconds = sum(f / OUTPUT_RATE for f in frames)
    figures: dict[str, float] = {}
    per_shard = args.samples_per_shard or min(128, -(-count // (4 * args.cores)))
    for attempt in range(args.repeat):
        t_ours, roles = ours(work / f"in-{count}", work / f"ours-{count}", args.cores, per_shard)
        cpu_ours = sum(roles.values())
        check_build(work / f"ours-{count}", paths, frames)
        bound = schedule_bound(work / f"ours-{count}", args.cores)
        shutil.rmtree(work / f"ours-{count}")
        t_ffmpeg, cpu_ffmpeg = ffmpeg_loop(paths, work / f"ffmpeg-{count}", args.cores)
        shutil.rmtree(work / f"ffmpeg-{count}")
        t_cpu = cpu_seconds_in_process(paths)
        ceiling = t_cpu / args.cores
        print(f"[{count} items, {per_shard} per shard, run {attempt + 1}] build {t_ours:6.2f} s wall, {cpu_ours:6.2f} CPU s | "
              f"ffmpeg loop {t_ffmpeg:6.2f} s wall, {cpu_ffmpeg:6.2f} CPU s | in-process transcode "
              f"{t_cpu:6.2f} CPU s | {t_ffmpeg / t_ours:4.2f}x ffmpeg | {ceiling / t_ours:4.2f} of the ceiling | "
              f"transcode/build CPU {t_cpu / cpu_ours:4.2f} | shard layout allows {bound:4.2f}", flush=True)
        print(f"    build CPU by role: workers {roles['worker']:.2f} s (transcode / workers "
              f"{t_cpu / roles['worker']:.2f}), driver {roles['driver']:.2f} s, Ray's services {roles['ray']:.2f} s",
              flush=True)
        run = dict(build_s=t_ours, build_cpu_s=cpu_ours, ffmpeg_s=t_ffmpeg, ffmpeg_cpu_s=cpu_ffmpeg,
                   transcode_cpu_s=t_cpu, vs_ffmpeg=t_ffmpeg / t_ours, of_ceiling=ceiling / t_ours,
                   cpu_share=t_cpu / cpu_ours, audio_s=audio_seconds, bound=bound, per_shard=per_shard,
                   worker_cpu_s=roles["worker"], driver_cpu_s=roles["driver"], ray_cpu_s=roles["ray"])
        if not figures or run["of_ceiling"] > figures["of_ceiling"]:
            figures = run  # the least disturbed run of a loaded machine
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[400, 1536])
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=2, help="runs per size (the best is reported)")
    # Unset: N / (4 x cores), at most 128 (half the build's default), so N items make at least four
    # shards per core and the last shards to finish are short; large enough that per-task costs
    # (scheduling, one tar and manifest part per shard) stay small.
    parser.add_argument("--samples-per-shard", type=int, default=None)
    parser.add_argument("--memory-items", type=int, default=150, help="base item count of the memory runs")
    parser.add_argument("--memory-scale", type=int, default=10)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the distinct input copies are kept")
    args = parser.parse_args()

    import logging

    import ray

    with open("/proc/loadavg") as handle:
        print(f"machine: {os.cpu_count()} CPUs, load average at start {handle.read().split()[0]}; "
              f"{args.cores} cores used", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench-transcode-"))
    try:
        cached_copies(max([*args.items, 0 if args.skip_memory else args.memory_items * args.memory_scale]),
                      args.cache, args.cores)
        make_inputs(work / "warm-in", 4 * args.cores, args.cache, args.cores)
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False, logging_level=logging.WARNING)
        ours(work / "warm-in", work / "warm", args.cores, 2)  # start the workers, import their modules
        shutil.rmtree(work / "warm")
        results = {count: one_size(work, count, args) for count in args.items}
        ray.shutdown()
        print("\n| items | per shard | build s | ffmpeg loop s | in-process transcode CPU s | x ffmpeg "
              "| of ceiling | shard layout allows | transcode / build CPU |")
        print("|---|---|---|---|---|---|---|---|---|")
        for count, r in results.items():
            print(f"| {count} | {r['per_shard']} | {r['build_s']:.2f} | {r['ffmpeg_s']:.2f} | "
                  f"{r['transcode_cpu_s']:.2f} | {r['vs_ffmpeg']:.2f}x | {r['of_ceiling']:.2f} | {r['bound']:.2f} | "
                  f"{r['cpu_share']:.2f} |")
        biggest = results[max(results)]
        # What `audiodata plan` uses (audio_dataset/plan.py): audio seconds per CPU second of the
        # whole build (driver, Ray, workers), which other load on the machine does not inflate.
        rate = biggest["audio_s"] / biggest["build_cpu_s"]
        wall_rate = biggest["audio_s"] / (biggest["build_s"] * args.cores)
        print(f"plan figure: {rate:.0f} s of audio per build CPU second ({max(results)} items; "
              f"audiodata plan --transcode-rate {rate:.0f}); per core-second of wall time {wall_rate:.0f}")
        if not args.skip_memory:
            small, big = args.memory_items, args.memory_items * args.memory_scale
            make_inputs(work / "small", small, args.cache, args.cores)
            make_inputs(work / "big", big, args.cache, args.cores)
            per_shard = max(1, small // (4 * args.cores))  # the same shard size for both runs
            small_peak = peak_rss_of_build(work / "small", work / "mem-small", args.cores, per_shard, small)
            big_peak = peak_rss_of_build(work / "big", work / "mem-big", args.cores, per_shard, big)
            print(f"peak RSS {small} items: {small_peak / 2**20:.0f} MiB; "
                  f"{big} items: {big_peak / 2**20:.0f} MiB; ratio {big_peak / small_peak:.2f} (target <= 1.2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
