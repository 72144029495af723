"""Fixtures for the benchmark-source tests: tiny tones as WAV/AU, archives and CSVs made in the test."""
from __future__ import annotations

import csv
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import soundfile

from audio_dataset.audio import AudioConfig

RATE = 16_000
# Small output: the builds stay fast, and 16 kHz is the tones' own rate.
AUDIO = AudioConfig(sample_rate=16_000)


def tone(number: int, seconds: float = 1.0, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    """A distinct tone per `number` (never silent, never the same twice) as an audio file."""
    t = np.arange(int(seconds * RATE)) / RATE
    data = 0.3 * np.sin(2 * np.pi * (220 + 37 * number) * t).astype("float32")
    buffer = io.BytesIO()
    soundfile.write(buffer, data, RATE, format=fmt, subtype=subtype)
    return buffer.getvalue()


def csv_text(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return root


def zip_of(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_of(files: dict[str, bytes | str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in files.items():
            raw = data.encode() if isinstance(data, str) else data
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return buffer.getvalue()
