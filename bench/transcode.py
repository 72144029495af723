"""Transcode benchmark: our build against a plain ffmpeg-per-file loop, side by side in one run.

    python bench/transcode.py [--items 200] [--cores N] [--memory-scale 10]

1. Throughput: `build()` over N real files (the test clips, repeated under distinct names) against a
   loop that shells out to ffmpeg once per file for the same conversion (decode, resample to 48 kHz
   mono, 16-bit FLAC), both with the same number of cores. Ray is started before timing.
2. CPU ceiling: the in-process decode + resample + encode time of every file, summed on one core and
   divided by the cores; our wall time against it.
3. Memory: the peak RSS of the whole build process tree (driver, raylet, workers) for N and for
   `--memory-scale` x N items.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imageio_ffmpeg
import soundfile

ROOT = Path(__file__).resolve().parents[1]
CLIPS = sorted((ROOT / "tests" / "data" / "real-audio").glob("*.ogg"))


def make_inputs(folder: Path, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        clip = CLIPS[index % len(CLIPS)]
        path = folder / f"{index:06d}_{clip.name}"
        if not path.exists():
            os.link(clip, path) if clip.stat().st_dev == folder.stat().st_dev else shutil.copy(clip, path)
        paths.append(path)
    return paths


def ffmpeg_loop(paths: list[Path], out: Path, cores: int) -> float:
    import ffmpeg  # ffmpeg-python builds the command line; the binary comes from imageio-ffmpeg

    binary = imageio_ffmpeg.get_ffmpeg_exe()
    out.mkdir(parents=True, exist_ok=True)

    def one(path: Path) -> None:
        stream = ffmpeg.input(str(path)).output(str(out / f"{path.stem}.flac"), ac=1, ar=48000,
                                                sample_fmt="s16", acodec="flac", loglevel="error")
        stream.run(cmd=binary, overwrite_output=True, quiet=True)

    start = time.perf_counter()
    with ThreadPoolExecutor(cores) as pool:
        list(pool.map(one, paths))
    return time.perf_counter() - start


def cpu_seconds_in_process(paths: list[Path]) -> float:
    from audio_dataset.audio import AudioConfig, transcode

    config = AudioConfig()
    start = time.perf_counter()
    for path in paths:
        transcode(path.read_bytes(), config)
    return time.perf_counter() - start


def ours(folder: Path, out: Path, cores: int, per_shard: int) -> float:
    from audio_dataset.build import BuildOptions, build
    from audio_dataset.source import SourceConfig

    start = time.perf_counter()
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(folder)),
                       samples_per_shard=per_shard, workers=cores, progress=False))
    return time.perf_counter() - start


def _tree_rss(root_pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(stat[1]), []).append(int(entry.name))
            rss[int(entry.name)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def peak_rss_of_build(folder: Path, out: Path, cores: int, per_shard: int) -> int:
    cmd = [sys.executable, "-m", "audio_dataset.cli", "build", "--source", "local", "--input", str(folder),
           "--out", str(out), "--workers", str(cores), "--samples-per-shard", str(per_shard), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    if proc.returncode != 0:
        raise SystemExit(f"build failed with exit code {proc.returncode}")
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1536)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    # Half the build's default (256) so N items still make several shards per core; large enough
    # that per-task costs (scheduling, one tar and manifest part per shard) stay small.
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--memory-items", type=int, default=200, help="base item count of the memory runs")
    parser.add_argument("--memory-scale", type=int, default=10)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()

    import logging

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench-transcode-"))
    try:
        paths = make_inputs(work / "in", args.items)
        make_inputs(work / "warm-in", 4 * args.cores)
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False, logging_level=logging.WARNING)
        ours(work / "warm-in", work / "warm", args.cores, 2)  # start the workers, import their modules
        shutil.rmtree(work / "warm")
        t_ffmpeg = ffmpeg_loop(paths, work / "ffmpeg", args.cores)
        t_ours = ours(work / "in", work / "ours", args.cores, args.samples_per_shard)
        t_cpu = cpu_seconds_in_process(paths)
        ray.shutdown()
        ceiling = t_cpu / args.cores
        print(f"machine: {os.cpu_count()} CPUs; {args.items} items, {args.cores} cores")
        print(f"ffmpeg loop : {t_ffmpeg:7.2f} s  {args.items / t_ffmpeg:7.1f} items/s")
        print(f"audiodata   : {t_ours:7.2f} s  {args.items / t_ours:7.1f} items/s")
        print(f"ratio ours/ffmpeg throughput: {t_ffmpeg / t_ours:.2f}x (target >= 1.5)")
        print(f"CPU ceiling : {ceiling:7.2f} s  (in-process transcode {t_cpu:.2f} s / {args.cores} cores)")
        print(f"fraction of CPU ceiling: {ceiling / t_ours:.2f} (target >= 0.85)")
        audio_seconds = sum(soundfile.info(path).duration for path in paths)
        rate = audio_seconds / (t_ours * args.cores)
        print(f"plan figure : {rate:.0f} s of audio per core-second (audiodata plan --transcode-rate {rate:.0f})")
        if not args.skip_memory:
            small, big = args.memory_items, args.memory_items * args.memory_scale
            make_inputs(work / "small", small)
            make_inputs(work / "big", big)
            per_shard = max(1, small // (4 * args.cores))  # the same shard size for both runs
            small_peak = peak_rss_of_build(work / "small", work / "mem-small", args.cores, per_shard)
            big_peak = peak_rss_of_build(work / "big", work / "mem-big", args.cores, per_shard)
            print(f"peak RSS {small} items: {small_peak / 2**20:.0f} MiB; "
                  f"{big} items: {big_peak / 2**20:.0f} MiB; ratio {big_peak / small_peak:.2f} (target <= 1.2)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
