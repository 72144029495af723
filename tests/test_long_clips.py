"""A long clip in flat memory: an hour of audio transcoded (kept whole, then segmented) under an
address-space cap, its peak RSS measured in a child process. Holding the clip whole (as the
transcoder once did) grows a worker by ~3 GB an hour at 48 kHz; here the growth must stay small."""
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
from pathlib import Path
from audio_dataset.audio import AudioConfig, transcode

def vm_bytes():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))

long_clip, short_clip = Path(sys.argv[1]), Path(sys.argv[2])
configs = {"whole": AudioConfig(sample_rate=16_000, min_source_rate=8_000),
           "segmented": AudioConfig(sample_rate=16_000, min_source_rate=8_000, segment_seconds=600.0,
                                    long_clips="segment")}
for config in configs.values():  # warm up: libraries loaded, allocator pools made
    transcode(short_clip, config)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
cap = vm_bytes() + int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
report = {"base_mb": base}
for name, config in configs.items():
    result = transcode(long_clip, config)
    report[name] = {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "durations": [segment.duration for segment in result.segments],
                    "flac_bytes": [segment.file.seek(0, 2) for segment in result.segments]}
    del result
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
def clips(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("long")
    _write_tone(folder / "hour.wav", SECONDS)
    _write_tone(folder / "minute.wav", 60)
    return folder / "hour.wav", folder / "minute.wav"


def test_an_hour_transcodes_in_flat_memory(clips: tuple[Path, Path]) -> None:
    long_clip, short_clip = clips
    run = subprocess.run([sys.executable, "-c", CHILD, str(long_clip), str(short_clip), str(CAP_BYTES)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    whole, segmented = report["whole"], report["segmented"]
    assert whole["durations"] == pytest.approx([SECONDS], abs=1e-3)
    assert segmented["durations"] == pytest.approx([600.0] * 6, abs=1e-3)
    assert whole["flac_bytes"][0] > 20 * 2**20  # the hour really was encoded (and spooled, not held)
    for name in ("whole", "segmented"):
        growth = report[name]["peak_mb"] - report["base_mb"]
        assert growth < MAX_GROWTH_MB, f"{name}: peak RSS grew {growth:.0f} MB"
