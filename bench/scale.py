"""Driver memory and time against the number of items: a whole build of an N-row table.

    python bench/scale.py [--sizes 100000,1000000] [--before /tmp/flat-base] [--before-up-to 1000000]

The input is a CSV of N rows (`path`, `caption`) whose files do not exist. This is the stand-in
for the transcode, and only that: every item fails fast as `missing_file` inside its Ray shard
task, so listing, split assignment, shard planning, the shard tasks, the manifest parts and
finalize all run at full size while no audio is fetched or encoded (bench/transcode.py measures
that part). Each measurement is a fresh child process calling `build()` (2 Ray workers); the
build's own `list_with_cache`, `plan_shards` and `finalize` are wrapped with timers, and the
driver's peak RSS is its ru_maxrss (Ray workers are other processes, not counted), read after
listing, after planning, before finalize (the shard tasks' share) and at the end.

`--before DIR`: the same measurement with the code of another checkout (e.g. `git worktree add
--detach /tmp/flat-base <base>`), on the same CSV, skipped above `--before-up-to` items.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from audio_dataset import build as b
from audio_dataset.source import SourceConfig

table, out, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
timings = {}

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def timed(name, fn):
    def wrapper(*args, **kwargs):
        timings[f"peak_before_{name}_mb"] = peak_mb()
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[f"{name}_s"] = timings.get(f"{name}_s", 0.0) + time.perf_counter() - start
        timings[f"peak_after_{name}_mb"] = peak_mb()
        return result
    return wrapper

for name in ("list_with_cache", "plan_shards", "finalize"):
    setattr(b, name, timed(name, getattr(b, name)))
start = time.perf_counter()
summary = b.build(b.BuildOptions(source="local", out=out, source_config=SourceConfig(input=table),
                                 workers=2, progress=False))
total = time.perf_counter() - start
stats = summary.stats
# Every row of the table listed, planned and run through a shard task (as missing_file), or no figure.
if not stats["items"] == stats["by_reason"].get("missing_file") == rows:
    sys.exit(f"FAILED: {rows} rows, {stats['items']} items, reasons {stats['by_reason']}")
print(json.dumps({"peak_mb": peak_mb(), "total_s": total, "items": stats["items"],
                  "shards": summary.shards_total, **timings}))
"""


def write_table(path: Path, rows: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "caption"])
        for number in range(rows):
            writer.writerow([f"audio/{number // 1000:05d}/clip_{number:08d}.wav",
                             f"a recording number {number} of something happening"])


def measure(code: Path, table: Path, work: Path, rows: int) -> dict:
    out = work / f"out-{code.name}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(table), str(out), str(rows)], env=env, cwd=code,
                          capture_output=True, text=True, check=False)
    subprocess.run(["rm", "-rf", str(out)], check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare against")
    parser.add_argument("--before-up-to", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'code':<7}{'items':>9}{'peak MB':>9}{'list s':>8}{'plan s':>8}{'final s':>8}{'total s':>9}"
          "   peak MB after listing / planning / the shard tasks")
    with tempfile.TemporaryDirectory(prefix="audiodata-scale-") as tmp:
        work = Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            table = work / f"table-{size}.csv"
            write_table(table, size)
            runs = [("after", ROOT)]
            if args.before is not None and size <= args.before_up_to:
                runs.insert(0, ("before", args.before))
            for label, code in runs:
                r = measure(code, table, work, size)
                print(f"{label:<7}{r['items']:>9}{r['peak_mb']:>9.0f}{r['list_with_cache_s']:>8.1f}"
                      f"{r['plan_shards_s']:>8.1f}{r['finalize_s']:>8.1f}{r['total_s']:>9.1f}   "
                      f"{r['peak_after_list_with_cache_mb']:.0f} / {r['peak_after_plan_shards_mb']:.0f} / "
                      f"{r['peak_before_finalize_mb']:.0f}", flush=True)
            table.unlink()


if __name__ == "__main__":
    main()
