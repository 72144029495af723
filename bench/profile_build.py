"""Where a build's time goes: cProfile in the driver and in every Ray worker, for profiling only.

    python bench/profile_build.py [--items 400] [--cores N] [--top 30]

The inputs are bench/transcode.py's distinct copies. Ray is started with a worker setup hook
(`runtime_env.worker_process_setup_hook`) that wraps `audio_dataset.build.run_shard` in cProfile
in each worker (the build's own code is not changed for this); the driver's `build()` is profiled
as a whole. Printed: the build's wall time; per shard, its time in the worker; the time no worker
was in `run_shard` (Ray scheduling, the driver's listing/planning/finalising, the tail where fewer
shards remain than cores); and the top functions of workers and driver by own time.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import transcode  # noqa: E402 - the inputs and their checks

PROFILE_DIR = "AUDIODATA_BENCH_PROFILE_DIR"
PROFILE_CALLS = "AUDIODATA_BENCH_PROFILE_CALLS"  # "1": cProfile each shard; else time it only


def setup_worker() -> None:
    """Ray worker setup hook: profile each `run_shard` call into $AUDIODATA_BENCH_PROFILE_DIR."""
    from audio_dataset import build

    original = build.run_shard

    def profiled(task, *args, **kwargs):  # type: ignore[no-untyped-def]
        profile = cProfile.Profile() if os.environ.get(PROFILE_CALLS) == "1" else None
        start, own, process = time.time(), time.thread_time(), time.process_time()
        try:
            if profile is None:
                return original(task, *args, **kwargs)
            return profile.runcall(original, task, *args, **kwargs)
        finally:
            # The task's own thread (the transcode and the tar) apart from the process's other
            # threads (Ray's core worker, the fetch pool).
            own, process = time.thread_time() - own, time.process_time() - process
            end = time.time()
            name = f"{os.getpid()}-{task.split}-{task.index}"
            folder = Path(os.environ[PROFILE_DIR])
            if profile is not None:
                profile.dump_stats(folder / f"{name}.prof")
            (folder / f"{name}.json").write_text(json.dumps({"start": start, "end": end, "pid": os.getpid(),
                                                             "thread_cpu": own, "process_cpu": process}))

    build.run_shard = profiled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=400)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--samples-per-shard", type=int, default=128)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--no-cprofile", action="store_true",
                        help="time the shards only (CPU of the task's thread and of its process), no cProfile")
    args = parser.parse_args()

    import ray

    from audio_dataset.build import BuildOptions, build
    from audio_dataset.source import SourceConfig

    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    profiles = work / "profiles"
    profiles.mkdir()
    os.environ[PROFILE_DIR] = str(profiles)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent),
                                                os.environ.get("PYTHONPATH", "")])
    try:
        paths = transcode.make_inputs(work / "in", args.items, transcode.CACHE, args.cores)
        transcode.make_inputs(work / "warm-in", 4 * args.cores, transcode.CACHE, args.cores)
        ray.init(address="local", num_cpus=args.cores, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"worker_process_setup_hook": "profile_build.setup_worker",
                              "env_vars": {PROFILE_DIR: str(profiles),
                                           PROFILE_CALLS: "0" if args.no_cprofile else "1"}})
        options = dict(workers=args.cores, progress=False)
        build(BuildOptions(source="local", out=work / "warm", source_config=SourceConfig(input=str(work / "warm-in")),
                           samples_per_shard=2, **options))
        for stale in profiles.iterdir():
            stale.unlink()
        driver = cProfile.Profile()
        start = time.time()
        driver.runcall(build, BuildOptions(source="local", out=work / "out",
                                           source_config=SourceConfig(input=str(work / "in")),
                                           samples_per_shard=args.samples_per_shard, **options))
        end = time.time()
        transcode.check_build(work / "out", paths, transcode.expected_frames(paths))
        ray.shutdown()
        spans = [json.loads(p.read_text()) | {"name": p.stem} for p in sorted(profiles.glob("*.json"))]
        busy = sum(s["end"] - s["start"] for s in spans)
        if args.no_cprofile:
            t_cpu = transcode.cpu_seconds_in_process(paths)
            own, process = sum(s["thread_cpu"] for s in spans), sum(s["process_cpu"] for s in spans)
            print(f"in-process transcode {t_cpu:.2f} CPU s; the shard tasks' own threads {own:.2f} CPU s "
                  f"(transcode / that {t_cpu / own:.2f}); their processes while they ran {process:.2f} CPU s "
                  f"(transcode / that {t_cpu / process:.2f})")
        first, last = min(s["start"] for s in spans), max(s["end"] for s in spans)
        print(f"build wall {end - start:.2f} s; shards {len(spans)}; in run_shard {busy:.2f} worker-s of "
              f"{(end - start) * args.cores:.2f} core-s ({busy / ((end - start) * args.cores):.2f})")
        print(f"before the first shard started {first - start:.2f} s; after the last ended {end - last:.2f} s")
        for s in sorted(spans, key=lambda s: s["start"]):
            print(f"  {s['name']:>24}  {s['start'] - start:6.2f} -> {s['end'] - start:6.2f}  ({s['end'] - s['start']:.2f} s)")
        if args.no_cprofile:
            return
        workers = pstats.Stats(*[str(p) for p in profiles.glob("*.prof")])
        print("\n=== workers (run_shard), by own time ===")
        workers.sort_stats("tottime").print_stats(args.top)
        print("\n=== workers, cumulative ===")
        workers.sort_stats("cumulative").print_stats(args.top)
        print("\n=== driver build(), cumulative ===")
        pstats.Stats(driver).sort_stats("cumulative").print_stats(args.top)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
