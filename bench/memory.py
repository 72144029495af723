"""Peak worker memory against clip length: one long clip through a shard worker, before and after.

    python bench/memory.py [--lengths 10,600,3600,10800] [--formats mp3,wav] [--before-up-to 3600]

Clips are synthetic (pink noise, 44.1 kHz stereo; mp3 at 192 kb/s or 16-bit wav) made with the
bundled ffmpeg. Each measurement runs in a fresh child process: it warms up on a 10 s clip
(libraries loaded, allocator pools made; its peak is the "base"), then takes the long clip through
decode -> downmix -> resample to 48 kHz mono -> FLAC, kept whole or cut into 10 s segments, and
reports its peak RSS (ru_maxrss).

after: `run_shard` (the build's worker) over a local folder holding the clip.
before: the transcoder as of 73be499 (`git show` into a temp folder), called the way its worker
called it: `transcode(path.read_bytes(), config)`, every sample's FLAC held in a list. Skipped
above `--before-up-to` seconds (the issue measured 9.4 GB for 3 hours).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import require  # noqa: E402
BEFORE_COMMIT = "73be499"
FORMATS = {"mp3": ["-c:a", "libmp3lame", "-b:a", "192k"], "wav": ["-c:a", "pcm_s16le"]}

AFTER = r"""
import json, resource, sys
from audio_dataset.audio import AudioConfig
from audio_dataset.build import ShardTask, run_shard
from audio_dataset.source import SourceConfig
from audio_dataset.storage import location
from pipelines.local import LocalSource

folder, warm, out, mode = sys.argv[1:5]
config = AudioConfig(long_clips="segment", segment_seconds=10.0) if mode == "segmented" else AudioConfig()
warm_source = LocalSource(SourceConfig(input=warm))
run_shard(ShardTask("warm", 0, list(warm_source.list_items())), warm_source, location(out), config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
source = LocalSource(SourceConfig(input=folder))
result = run_shard(ShardTask("train", 0, list(source.list_items())), source, location(out), config)
if result["ok"] != 1:
    sys.exit(f"FAILED: the clip was not built: {result}")
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "samples": result["samples"]}))
"""

BEFORE = r"""
import json, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[5])
import audio_dataset.build, pipelines.local  # the libraries a worker has loaded, as in the after run
from old_audio import AudioConfig, transcode

folder, warm, out, mode = sys.argv[1:5]
config = AudioConfig(long_clips="segment", segment_seconds=10.0) if mode == "segmented" else AudioConfig()
for path in Path(warm).iterdir():
    transcode(path.read_bytes(), config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path = next(Path(folder).iterdir())
result = transcode(path.read_bytes(), config)
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "samples": len(result.segments)}))
"""


def make_clip(folder: Path, seconds: int, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"noise-{seconds}s.{fmt}"
    if not path.exists():
        source = f"anoisesrc=duration={seconds}:color=pink:sample_rate=44100:amplitude=0.3"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", source,
                        "-ac", "2", *FORMATS[fmt], str(path)], check=True)
    return path


def measure(script: str, clip: Path, warm: Path, work: Path, mode: str, old_dir: Path) -> dict:
    folder = work / "one"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.link(clip, folder / clip.name)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", script, str(folder), str(warm), str(out), mode, str(old_dir)],
                         capture_output=True, text=True, env=env)
    if run.returncode != 0:
        raise SystemExit(f"measurement failed: {run.stderr[-2000:]}")
    report = json.loads(run.stdout)
    report["seconds"] = time.perf_counter() - start
    seconds = int(clip.stem.split("-")[1].rstrip("s"))
    expected = 1 if mode == "whole" else -(-seconds // 10)  # 10 s segments
    require(report["samples"] == expected, f"{clip.name} {mode}: {report['samples']} samples, expected {expected}")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="10,600,3600,10800", help="clip lengths in seconds")
    parser.add_argument("--formats", default="mp3,wav")
    parser.add_argument("--modes", default="whole,segmented")
    parser.add_argument("--before-up-to", type=int, default=3600, help="longest clip the old code is run on")
    parser.add_argument("--work", type=Path, help="folder for the clips (kept for reruns); default a temp folder")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    old_dir = work / "before"
    old_dir.mkdir(parents=True, exist_ok=True)
    old_source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:audio_dataset/audio.py"],
                                check=True, capture_output=True, text=True).stdout
    (old_dir / "old_audio.py").write_text(old_source)
    print("| clip | format | mode | samples | before: peak RSS | after: peak RSS | after: wall s |")
    print("|---|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        warm = work / f"warm-{fmt}"
        make_clip(warm, 10, fmt)
        for seconds in map(int, args.lengths.split(",")):
            clip = make_clip(work / "clips", seconds, fmt)
            for mode in args.modes.split(","):
                after = measure(AFTER, clip, warm, work, mode, old_dir)
                before = measure(BEFORE, clip, warm, work, mode, old_dir) if seconds <= args.before_up_to else None
                was = f"{before['peak_kb'] / 1024:.0f} MiB (base {before['base_kb'] / 1024:.0f})" if before \
                    else "not run"
                print(f"| {seconds} s | {fmt} | {mode} | {after['samples']} | {was} | "
                      f"{after['peak_kb'] / 1024:.0f} MiB (base {after['base_kb'] / 1024:.0f}) | "
                      f"{after['seconds']:.0f} |", flush=True)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
