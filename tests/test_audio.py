"""Audio core on real recordings: every format decodes to the same sound, policies name their drops."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audio_dataset.audio import AudioConfig, decode, plan_segments, resample, transcode
from audio_dataset.source import ItemError
from conftest import ffmpeg_convert

FORMATS = {  # extension -> ffmpeg output options
    "wav": [],
    "flac": ["-sample_fmt", "s16"],
    "mp3": ["-b:a", "128k"],
    "m4a": ["-c:a", "aac", "-b:a", "128k"],
    "opus": ["-c:a", "libopus", "-b:a", "96k"],
    "webm": ["-c:a", "libopus", "-b:a", "96k"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, robin_path: Path) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("formats")
    files = {"ogg": robin_path.read_bytes()}
    for ext, opts in FORMATS.items():
        files[ext] = ffmpeg_convert(robin_path, folder / f"robin.{ext}", *opts).read_bytes()
    return files


def _best_correlation(a: np.ndarray, b: np.ndarray, max_lag: int = 4000) -> float:
    """Peak normalised cross-correlation within ±max_lag samples (codecs add priming delay)."""
    n = min(len(a), len(b))
    a, b = a[:n] - a[:n].mean(), b[:n] - b[:n].mean()
    spectrum = np.fft.rfft(a, 2 * n) * np.conj(np.fft.rfft(b, 2 * n))
    corr = np.fft.irfft(spectrum)
    lags = np.concatenate([corr[:max_lag], corr[-max_lag:]])
    return float(lags.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("ext", ["ogg", *FORMATS])
def test_every_format_decodes_to_the_same_sound(converted: dict[str, bytes], ext: str) -> None:
    reference = transcode(converted["wav"], AudioConfig())
    result = transcode(converted[ext], AudioConfig())
    ref_audio, ref_rate = soundfile.read(io.BytesIO(reference.segments[0].flac), dtype="float32")
    audio, rate = soundfile.read(io.BytesIO(result.segments[0].flac), dtype="float32")
    assert rate == ref_rate == 48_000
    assert audio.ndim == 1  # mono by default
    assert abs(len(audio) / rate - 2.699) < 0.06  # codec priming/padding only
    assert _best_correlation(audio, ref_audio) > 0.9


def test_lossless_formats_match_sample_for_sample(converted: dict[str, bytes]) -> None:
    wav = decode(converted["wav"])
    flac = decode(converted["flac"])
    assert wav.sample_rate == flac.sample_rate == 22_050
    np.testing.assert_array_equal(wav.samples, flac.samples)


def test_output_is_16_bit_flac_at_target_rate_and_channels(converted: dict[str, bytes]) -> None:
    for channels in (1, 2):
        result = transcode(converted["ogg"], AudioConfig(sample_rate=32_000, channels=channels))
        info = soundfile.info(io.BytesIO(result.segments[0].flac))
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 32_000, channels)


def test_stereo_source_downmixes_to_mono_and_keeps_stereo(tmp_path: Path, robin_path: Path) -> None:
    # left = the robin, right = silence: mono is their mean, stereo keeps them apart
    stereo = ffmpeg_convert(robin_path, tmp_path / "st.wav", "-af", "pan=stereo|c0=c0|c1=0*c0", "-ar", "44100")
    data = stereo.read_bytes()
    mono = soundfile.read(io.BytesIO(transcode(data, AudioConfig(channels=1)).segments[0].flac))[0]
    kept = soundfile.read(io.BytesIO(transcode(data, AudioConfig(channels=2)).segments[0].flac))[0]
    assert kept.shape[1] == 2 and np.abs(kept[:, 1]).max() < 1e-4
    np.testing.assert_allclose(mono, kept[:, 0] / 2, atol=2e-4)


def test_resampler_keeps_a_tone_clean() -> None:
    rate_in, rate_out = 22_050, 48_000
    t = np.arange(rate_in) / rate_in
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)[None, :]
    out = resample(tone, rate_in, rate_out)[0]
    assert abs(len(out) - rate_out) <= 1
    spectrum = np.abs(np.fft.rfft(out[2000:-2000] * np.hanning(len(out) - 4000)))
    freqs = np.fft.rfftfreq(len(out) - 4000, 1 / rate_out)
    assert abs(freqs[spectrum.argmax()] - 1000) < 2
    away = spectrum[np.abs(freqs - 1000) > 50]
    assert 20 * np.log10(away.max() / spectrum.max()) < -80  # HQ resampler: no audible images
    assert abs(np.abs(out[2000:-2000]).max() - 0.5) < 0.01


@pytest.mark.parametrize(
    ("duration", "config", "expected"),
    [
        (30.0, AudioConfig(), [(0.0, 30.0)]),  # kept whole by default
        (10.0, AudioConfig(max_seconds=10.0), [(0.0, 10.0)]),  # exactly the limit stays whole
        (12.0, AudioConfig(max_seconds=10.0, long_clips="truncate"), [(0.0, 10.0)]),
        (30.0, AudioConfig(long_clips="segment", segment_seconds=10.0), [(0, 10), (10, 20), (20, 30)]),
        (25.2, AudioConfig(long_clips="segment", segment_seconds=10.0, min_seconds=5.2),
         [(0, 10), (10, 20), (20, 25.2)]),  # a tail of exactly min_seconds is kept
        (25.1, AudioConfig(long_clips="segment", segment_seconds=10.0, min_seconds=5.2),
         [(0, 10), (10, 20)]),  # a shorter tail is dropped
        (25.0, AudioConfig(max_seconds=20.0, long_clips="segment", segment_seconds=8.0),
         [(0, 8), (8, 16), (16, 24), (24, 25)]),
    ],
)
def test_plan_segments(duration: float, config: AudioConfig, expected: list) -> None:
    spans = plan_segments(duration, config)
    assert len(spans) == len(expected)
    assert [x for span in spans for x in span] == pytest.approx([x for span in expected for x in span])


@pytest.mark.parametrize(
    ("duration", "config", "reason"),
    [(0.3, AudioConfig(), "too_short"), (200.0, AudioConfig(max_seconds=180.0), "too_long")],
)
def test_plan_segments_drops_with_reason(duration: float, config: AudioConfig, reason: str) -> None:
    with pytest.raises(ItemError) as caught:
        plan_segments(duration, config)
    assert caught.value.reason == reason


def test_segments_cover_the_clip_and_match_its_audio(robin_path: Path) -> None:
    data = robin_path.read_bytes()
    whole = transcode(data, AudioConfig())
    parts = transcode(data, AudioConfig(long_clips="segment", segment_seconds=1.0, min_seconds=0.5))
    assert [(round(s.start, 3), round(s.end, 3)) for s in parts.segments] == [(0, 1), (1, 2), (2, 2.699)]
    joined = np.concatenate([soundfile.read(io.BytesIO(s.flac))[0] for s in parts.segments])
    np.testing.assert_array_equal(joined, soundfile.read(io.BytesIO(whole.segments[0].flac))[0])


def _reason(data: bytes, config: AudioConfig = AudioConfig()) -> str:
    with pytest.raises(ItemError) as caught:
        transcode(data, config)
    return caught.value.reason


def test_bad_inputs_end_as_named_failures(converted: dict[str, bytes], tmp_path: Path, robin_path: Path) -> None:
    assert _reason(b"") == "empty"
    assert _reason(b"<!DOCTYPE html><html><body>Not found</body></html>") == "not_audio"
    assert _reason(np.random.default_rng(0).bytes(50_000)) == "not_audio"
    for ext in ("wav", "flac", "mp3", "ogg", "opus", "m4a"):
        data = converted[ext]
        assert _reason(data[: len(data) // 2]) == "truncated", ext
    silent = io.BytesIO()
    soundfile.write(silent, np.zeros(48_000, dtype=np.float32), 48_000, format="WAV")
    assert _reason(silent.getvalue()) == "silent"
    low = ffmpeg_convert(robin_path, tmp_path / "low.wav", "-ar", "8000").read_bytes()
    assert _reason(low) == "low_source_rate"
    assert transcode(low, AudioConfig(min_source_rate=8000)).source_sample_rate == 8000
