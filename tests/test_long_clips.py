"""A long clip in flat memory: an hour of audio through a shard worker (kept whole, then cut into 10 s
segments) under an address-space cap, its peak RSS measured in a child process. Holding the clip
whole (as the transcoder once did) grows a worker by ~3 GB an hour at 48 kHz; here it stays small."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

SECONDS = 3600
RATE = 8_000  # low-rate audio keeps the hour quick to decode and encode
# Allowed growth of peak RSS over a warmed-up worker. The resampled blocks the first pass keeps for
# the second (audio.REPLAY_BYTES, 64 MiB) are most of it; holding the clip whole takes ~400 MB here.
MAX_GROWTH_MB = 150
# Address space allowed beyond the warmed-up process: the old code fails under it with MemoryError.
CAP_BYTES = 320 * 2**20

CHILD = r"""
import json, resource, sys
from audio_dataset import manifest
from audio_dataset.audio import AudioConfig
from audio_dataset.build import WORK_DIR, ShardTask, run_shard
from audio_dataset.source import SourceConfig
from audio_dataset.storage import location
from pipelines.local import LocalSource

def vm_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

folder, out = sys.argv[1], location(sys.argv[2])
source = LocalSource(SourceConfig(input=folder))
items = {item.source_id: item for item in source.list_items()}
configs = {"whole": AudioConfig(sample_rate=16_000, min_source_rate=8_000),
           "segmented": AudioConfig(sample_rate=16_000, min_source_rate=8_000, segment_seconds=10.0,
                                    long_clips="segment")}
for index, config in enumerate(configs.values()):  # warm up: libraries loaded, allocator pools made
    run_shard(ShardTask("warm", index, [items["minute.wav"]]), source, out, config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cap = vm_bytes() + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
report = {"base_mb": base}
for index, (name, config) in enumerate(configs.items()):
    task = ShardTask("train", index, [items["hour.wav"]])
    run_shard(task, source, out, config)
    row = manifest.read_parquet(out / WORK_DIR / "parts" / task.part_name).to_pylist()[0]
    report[name] = {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "status": row["status"],
                    "samples": row["n_samples"], "seconds": row["output_duration"],
                    "tar_bytes": (out / task.name).stat().st_size}
print(json.dumps(report))
"""


def _write_tone(path: Path, seconds: int) -> None:
    """A tone with noise, written a minute at a time (the test process stays small too)."""
    rng = np.random.default_rng(0)
    with soundfile.SoundFile(path, "w", RATE, 1, subtype="PCM_16") as sound:
        for minute in range(0, seconds, 60):
            t = np.arange(minute * RATE, (minute + min(60, seconds - minute)) * RATE) / RATE
            sound.write((0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32))


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("long")
    _write_tone(folder / "hour.wav", SECONDS)
    _write_tone(folder / "minute.wav", 60)
    return folder


def test_an_hour_goes_through_a_shard_worker_in_flat_memory(clips: Path, tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", CHILD, str(clips), str(tmp_path / "out"), str(CAP_BYTES)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    whole, segmented = report["whole"], report["segmented"]
    assert (whole["status"], whole["samples"], segmented["status"], segmented["samples"]) == ("ok", 1, "ok", 360)
    assert whole["seconds"] == pytest.approx(SECONDS, abs=1e-3) == segmented["seconds"]
    assert whole["tar_bytes"] > 20 * 2**20  # the hour really was encoded (and spooled, not held)
    for name in ("whole", "segmented"):
        growth = report[name]["peak_mb"] - report["base_mb"]
        assert growth < MAX_GROWTH_MB, f"{name}: peak RSS grew {growth:.0f} MB"
