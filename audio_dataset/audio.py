"""Audio operations: decode anything ffmpeg reads, resample, set channels, plan segments, FLAC-encode.

Decoding runs in-process through PyAV (ffmpeg's libraries), resampling through soxr (high quality),
encoding through libsndfile: no subprocess per file.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import av
import numpy as np
import soundfile
import soxr

from audio_dataset.media import sniff_audio
from audio_dataset.source import ItemError

# A peak under half a 16-bit step encodes to all zeros: such a clip is digitally silent.
SILENCE_PEAK = 2.0**-16
LONG_CLIP_POLICIES = ("drop", "truncate", "segment")
# The highest rate a FLAC stream can declare (libsndfile refuses more).
FLAC_MAX_RATE = 655_350


@dataclass(frozen=True)
class AudioConfig:
    sample_rate: int = 48_000
    channels: int = 1
    # None keeps clips of any length (LAION kept sound effects whole; training crops later).
    max_seconds: float | None = None
    long_clips: str = "drop"
    segment_seconds: float | None = None
    min_seconds: float = 0.5
    min_source_rate: int = 16_000

    def __post_init__(self) -> None:
        if self.long_clips not in LONG_CLIP_POLICIES:
            raise ValueError(f"long_clips must be one of {LONG_CLIP_POLICIES}")
        if self.channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        if not 1 <= self.sample_rate <= FLAC_MAX_RATE:
            raise ValueError(f"sample_rate must be 1..{FLAC_MAX_RATE} Hz (FLAC's range)")


@dataclass
class Decoded:
    samples: np.ndarray  # float32, shape (channels, frames)
    sample_rate: int
    codec: str

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate


@dataclass
class Segment:
    start: float
    end: float
    flac: bytes

    @property
    def duration(self) -> float:
        return self.end - self.start


_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}
_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32,
           "dbl": np.float64}


class _PcmCollector:
    """Gathers decoded frames' raw PCM bytes per channel and converts them to float32 once.

    Vorbis yields thousands of tiny frames; copying their plane buffers is several times cheaper
    than a numpy array (and a vstack) per frame.
    """

    def __init__(self, frame: av.AudioFrame) -> None:
        self.format = frame.format
        self.channels = len(frame.layout.channels)
        self.name = self.format.name.rstrip("p")
        self.chunks: list[list[memoryview]] = [[] for _ in range(self.channels if self.format.is_planar else 1)]

    def add(self, frame: av.AudioFrame) -> None:
        if frame.format.name != self.format.name or len(frame.layout.channels) != self.channels:
            raise ItemError("decode_error", "sample format or channels change mid-stream")
        width = self.format.bytes * frame.samples * (1 if self.format.is_planar else self.channels)
        for chunk, plane in zip(self.chunks, frame.planes):
            chunk.append(memoryview(plane)[:width])

    def to_float(self) -> np.ndarray:
        """float32 array (channels, n)."""
        dtype = _DTYPES[self.name]
        rows = [np.frombuffer(b"".join(chunk), dtype=dtype) for chunk in self.chunks]
        array = np.stack(rows) if self.format.is_planar else rows[0].reshape(-1, self.channels).T
        if self.name == "u8":
            return (array.astype(np.float32) - 128.0) / 128.0
        if self.name in _INT_SCALE:
            return (array / _INT_SCALE[self.name]).astype(np.float32)
        return np.ascontiguousarray(array, dtype=np.float32)


def _declared_seconds(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000
    return None


def _wav_data_shortfall(data: bytes) -> bool:
    """True when a RIFF/WAVE file's data chunk claims more bytes than the file holds."""
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            # 0 and 0xFFFFFFFF mark streamed WAVs whose writer never knew the size.
            return size not in (0, 0xFFFFFFFF) and pos + 8 + size > len(data)
        pos += 8 + size + (size & 1)
    return False


def _ogg_lacks_end(data: bytes) -> bool:
    """True when an Ogg stream's last page is incomplete or not flagged end-of-stream."""
    start = data.rfind(b"OggS", max(0, len(data) - 65_536))
    if start < 0 or start + 27 > len(data):
        return True
    segments = data[start + 26]
    table_end = start + 27 + segments
    if table_end > len(data):
        return True
    body = sum(data[start + 27:table_end])
    return table_end + body > len(data) or not data[start + 5] & 0x04


def _cut_short(data: bytes, container_format: str) -> bool:
    """Container-level truncation checks for formats whose decoders end quietly at a cut."""
    if container_format == "wav":
        return _wav_data_shortfall(data)
    if container_format == "ogg":
        return _ogg_lacks_end(data)
    return False


def decode(data: bytes) -> Decoded:
    """Decode bytes of any ffmpeg-readable audio (or video's audio track) to float32."""
    if not data:
        raise ItemError("empty", "zero bytes")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError) as exc:
        # Recognisable media that will not open was cut short (an MP4 missing its index, say).
        reason = "truncated" if sniff_audio(data) else "not_audio"
        raise ItemError(reason, str(exc)[:200]) from None
    with container:
        if not container.streams.audio:
            raise ItemError("not_audio", "no audio stream")
        stream = container.streams.audio[0]
        pcm: _PcmCollector | None = None
        try:
            for frame in container.decode(stream):
                if pcm is None:
                    pcm = _PcmCollector(frame)
                pcm.add(frame)
        except (av.FFmpegError, ValueError) as exc:
            reason = "truncated" if pcm is not None else "decode_error"
            raise ItemError(reason, str(exc)[:200]) from None
        rate = stream.rate or stream.codec_context.sample_rate
        declared = _declared_seconds(container, stream)
        codec = stream.codec_context.name
        container_format = container.format.name
    if pcm is None or not rate:
        raise ItemError("empty", "no audio frames")
    decoded = Decoded(pcm.to_float(), int(rate), codec)
    if decoded.samples.shape[1] == 0:
        raise ItemError("empty", "no audio samples")
    if _cut_short(data, container_format):
        raise ItemError("truncated", f"{container_format} stream ends early")
    # A body cut short still decodes, but to less than its header promised.
    if declared is not None and declared > 0.5 and decoded.duration < 0.95 * declared - 0.1:
        raise ItemError("truncated", f"decoded {decoded.duration:.2f}s of {declared:.2f}s declared")
    return decoded


def cut(decoded: Decoded, start: float, end: float) -> Decoded:
    first = max(0, int(round(start * decoded.sample_rate)))
    last = min(decoded.samples.shape[1], int(round(end * decoded.sample_rate)))
    if last <= first:
        raise ItemError("clip_out_of_range", f"[{start}, {end}] outside {decoded.duration:.2f}s")
    return Decoded(decoded.samples[:, first:last], decoded.sample_rate, decoded.codec)


def set_channels(samples: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1:
        return samples.mean(axis=0, keepdims=True) if samples.shape[0] > 1 else samples
    if samples.shape[0] == 1:
        return np.repeat(samples, 2, axis=0)
    return samples[:2]


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return samples
    out = soxr.resample(np.ascontiguousarray(samples.T), rate_in, rate_out, quality="HQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def encode_flac(samples: np.ndarray, sample_rate: int) -> bytes:
    buffer = io.BytesIO()
    clipped = np.clip(samples.T, -1.0, 1.0 - 2.0**-15)
    soundfile.write(buffer, clipped, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def plan_segments(duration: float, config: AudioConfig) -> list[tuple[float, float]]:
    """Where to cut a clip of `duration` seconds, or ItemError with the reason it is dropped."""
    if duration < config.min_seconds - 1e-9:
        raise ItemError("too_short", f"{duration:.2f}s < {config.min_seconds}s")
    limit = config.max_seconds
    if config.long_clips == "segment" and limit is None:
        limit = config.segment_seconds
    if limit is None or duration <= limit:
        return [(0.0, duration)]
    if config.long_clips == "drop":
        raise ItemError("too_long", f"{duration:.2f}s > {limit}s")
    if config.long_clips == "truncate":
        return [(0.0, float(limit))]
    step = float(config.segment_seconds or limit)
    spans = []
    for index in range(int(np.ceil(duration / step - 1e-9))):
        start, end = index * step, min((index + 1) * step, duration)
        if end - start >= config.min_seconds - 1e-9:  # float steps must not lose an exact tail
            spans.append((start, end))
    if not spans:  # segments shorter than --min-seconds: an ok row with no sample would be a lie
        raise ItemError("too_short", f"{step}s segments < {config.min_seconds}s")
    return spans


@dataclass
class Transcoded:
    source_sample_rate: int
    source_channels: int
    source_duration: float
    codec: str
    segments: list[Segment]
    # True when the sample is the whole clip (no cutting by the length policy).
    whole: bool


def decode_clip(data: bytes, clip: tuple[float, float] | None = None) -> Decoded:
    decoded = decode(data)
    return cut(decoded, *clip) if clip is not None else decoded


def transcode(data: bytes, config: AudioConfig, clip: tuple[float, float] | None = None) -> Transcoded:
    """bytes -> checked, resampled, channel-set FLAC segments; ItemError names any drop."""
    return transcode_decoded(decode_clip(data, clip), config)


def transcode_decoded(decoded: Decoded, config: AudioConfig) -> Transcoded:
    """The policy checks and encoding after decoding (a caller may record the decoded facts first)."""
    if decoded.sample_rate < config.min_source_rate:
        raise ItemError("low_source_rate", f"{decoded.sample_rate} Hz < {config.min_source_rate} Hz")
    if float(np.max(np.abs(decoded.samples))) < SILENCE_PEAK:
        raise ItemError("silent", "digitally silent")
    spans = plan_segments(decoded.duration, config)
    audio = resample(set_channels(decoded.samples, config.channels), decoded.sample_rate, config.sample_rate)
    rate = config.sample_rate
    segments = []
    for start, end in spans:
        piece = audio[:, int(round(start * rate)) : int(round(end * rate))]
        segments.append(Segment(start, start + piece.shape[1] / rate, encode_flac(piece, rate)))
    whole = len(spans) == 1 and spans[0][0] == 0.0 and spans[0][1] == decoded.duration
    return Transcoded(decoded.sample_rate, decoded.samples.shape[0], decoded.duration, decoded.codec,
                      segments, whole)
