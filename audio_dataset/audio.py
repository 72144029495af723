"""Audio operations: decode anything ffmpeg reads, downmix, resample, plan segments, FLAC-encode.

Decoding runs in-process through PyAV (ffmpeg's libraries), resampling through soxr (high quality),
encoding through libsndfile: no subprocess per file. All three stream in blocks, so a worker's
memory does not grow with the clip's length (a 3-hour recording is decoded a block at a time and
its FLAC spools to a temp file).

A clip takes two passes. `scan` decodes, downmixes and resamples it to learn what the policies and
the level need (duration, peaks, overs, how much a downmix cancelled); `encode` then writes the FLAC
with the gain that fits the peak under full scale. The first pass keeps its resampled blocks while
they fit in `REPLAY_BYTES` (clips of a few minutes), and the second reuses them; a longer clip is
decoded again instead, trading CPU for flat memory.
"""
from __future__ import annotations

import functools
import io
import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
import soundfile
import soxr

from audio_dataset.media import sniff_audio
from audio_dataset.source import ItemError

# A peak under half a 16-bit step encodes to all zeros: such a clip is digitally silent.
SILENCE_PEAK = 2.0**-16
LONG_CLIP_POLICIES = ("drop", "truncate", "segment")
# attenuate: scale the clip just enough that its peak fits; clip: LAION's hard clipping, counted.
CLIPPING_POLICIES = ("attenuate", "clip")
# The highest rate a FLAC stream can declare (libsndfile refuses more).
FLAC_MAX_RATE = 655_350
# The largest value 16-bit PCM holds; samples beyond [-1, FULL_SCALE] clip.
FULL_SCALE = 1.0 - 2.0**-15
# A downmix this much quieter than its channels would be if they were unrelated cancels itself
# (phase-inverted stereo summed to mono): flagged on the row and in the sample JSON.
CANCEL_DB = -10.0
# Resampled audio the first pass keeps for the second (float32 bytes); longer clips decode again.
REPLAY_BYTES = 64 * 2**20
# Decoded frames are gathered into blocks of about this many samples before conversion.
BLOCK_FRAMES = 1 << 16
# An encoded sample stays in memory up to this size, then spools to a temp file.
SPOOL_BYTES = 8 * 2**20
# What a header may declare before anything is decoded. Resampling multiplies a block by the rate
# ratio (a 1 Hz WAV resampled to 48 kHz is 48000x: gigabytes from a 64k-frame block), and decoded
# blocks grow with the channel count; headers outside these bounds are not audio we can use.
MIN_HEADER_RATE = 1_000
MAX_HEADER_RATE = 1_536_000  # 32x 48 kHz (DXD is 352.8 kHz)
MAX_HEADER_CHANNELS = 64  # ffmpeg's layouts name at most 64 (Ambisonics 7th order)
MAX_HEADER_SECONDS = 7 * 24 * 3600.0  # a week-long recording is not a clip

# A clip's bytes in memory, or a local file read in place (so a file bigger than memory still works).
Media = bytes | Path


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
    clipping: str = "attenuate"

    def __post_init__(self) -> None:
        if self.long_clips not in LONG_CLIP_POLICIES:
            raise ValueError(f"long_clips must be one of {LONG_CLIP_POLICIES}")
        if self.clipping not in CLIPPING_POLICIES:
            raise ValueError(f"clipping must be one of {CLIPPING_POLICIES}")
        if self.channels not in (1, 2):
            raise ValueError("channels must be 1 or 2")
        if not 1 <= self.sample_rate <= FLAC_MAX_RATE:
            raise ValueError(f"sample_rate must be 1..{FLAC_MAX_RATE} Hz (FLAC's range)")


@dataclass
class Decoded:
    """A whole clip in memory: for short clips and tools (previews, tests), not the build path."""

    samples: np.ndarray  # float32, shape (channels, frames)
    sample_rate: int
    codec: str
    layout: str = ""

    @property
    def duration(self) -> float:
        return self.samples.shape[1] / self.sample_rate


@dataclass
class Segment:
    start: float
    end: float
    # The encoded FLAC, rewound; a SpooledTemporaryFile, so a long one lives on disk.
    file: BinaryIO

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def flac(self) -> bytes:
        """The whole FLAC in memory (for short clips and tests; the build streams `file`)."""
        self.file.seek(0)
        data = self.file.read()
        self.file.seek(0)
        return data


_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}
_DTYPES = {"u8": np.uint8, "s16": np.int16, "s32": np.int32, "s64": np.int64, "flt": np.float32,
           "dbl": np.float64}


class _PcmCollector:
    """Gathers decoded frames' raw PCM bytes per channel and converts a block to float32 at a time.

    Vorbis yields thousands of tiny frames; copying their plane buffers is several times cheaper
    than a numpy array (and a vstack) per frame.
    """

    def __init__(self, frame: av.AudioFrame) -> None:
        self.format = frame.format
        self.channels = len(frame.layout.channels)
        self.name = self.format.name.rstrip("p")
        self.frames = 0
        self.chunks: list[list[memoryview]] = self._empty()

    def _empty(self) -> list[list[memoryview]]:
        return [[] for _ in range(self.channels if self.format.is_planar else 1)]

    def add(self, frame: av.AudioFrame) -> None:
        if frame.format.name != self.format.name or len(frame.layout.channels) != self.channels:
            raise ItemError("decode_error", "sample format or channels change mid-stream")
        width = self.format.bytes * frame.samples * (1 if self.format.is_planar else self.channels)
        for chunk, plane in zip(self.chunks, frame.planes):
            chunk.append(memoryview(plane)[:width])
        self.frames += frame.samples

    def take(self) -> np.ndarray:
        """The gathered frames as float32 (channels, n); the collector starts empty again."""
        dtype = _DTYPES[self.name]
        rows = [np.frombuffer(b"".join(chunk), dtype=dtype) for chunk in self.chunks]
        self.chunks, self.frames = self._empty(), 0
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


def _open(media: Media) -> BinaryIO:
    return open(media, "rb") if isinstance(media, Path) else io.BytesIO(media)


def _wav_data_shortfall(handle: BinaryIO, size: int) -> bool:
    """True when a RIFF/WAVE file's data chunk claims more bytes than the file holds."""
    pos = 12
    while pos + 8 <= size:
        handle.seek(pos)
        header = handle.read(8)
        chunk, length = header[:4], int.from_bytes(header[4:8], "little")
        if chunk == b"data":
            # 0 and 0xFFFFFFFF mark streamed WAVs whose writer never knew the size.
            return length not in (0, 0xFFFFFFFF) and pos + 8 + length > size
        pos += 8 + length + (length & 1)
    return False


def _ogg_lacks_end(tail: bytes) -> bool:
    """True when an Ogg stream's last page (within `tail`, the file's end) is incomplete or not final."""
    start = tail.rfind(b"OggS")
    if start < 0 or start + 27 > len(tail):
        return True
    segments = tail[start + 26]
    table_end = start + 27 + segments
    if table_end > len(tail):
        return True
    body = sum(tail[start + 27:table_end])
    return table_end + body > len(tail) or not tail[start + 5] & 0x04


def _cut_short(handle: BinaryIO, container_format: str) -> bool:
    """Container-level truncation checks for formats whose decoders end quietly at a cut."""
    size = handle.seek(0, io.SEEK_END)
    if container_format == "wav":
        return _wav_data_shortfall(handle, size)
    if container_format == "ogg":
        handle.seek(max(0, size - 65_536))
        return _ogg_lacks_end(handle.read())
    return False


class DecodeStream:
    """One clip's decoded PCM as float32 blocks (channels, n), read once; `clip` cuts [start, end] s.

    `sample_rate`, `layout`, `channel_names` and `codec` are set once the first block is out;
    `frames` counts what was yielded. Problems end as ItemError with a named reason.
    """

    def __init__(self, media: Media, clip: tuple[float, float] | None = None, min_rate: int = 0) -> None:
        self.media = media
        self.clip = clip
        self.min_rate = min_rate  # a lower rate is `low_source_rate`, known from the header alone
        self.sample_rate = 0
        self.codec = ""
        self.layout = ""
        self.channel_names: list[str] = []
        self.frames = 0
        self.decoded_frames = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        with _open(self.media) as handle:
            head = handle.read(512)
            if not head:
                raise ItemError("empty", "zero bytes")
            handle.seek(0)
            try:
                container = av.open(handle, mode="r")
            except (av.FFmpegError, ValueError) as exc:
                # Recognisable media that will not open was cut short (an MP4 missing its index, say).
                reason = "truncated" if sniff_audio(head) else "not_audio"
                raise ItemError(reason, str(exc)[:200]) from None
            with container:
                yield from self._blocks(container)
            if _cut_short(handle, container.format.name):
                raise ItemError("truncated", f"{container.format.name} stream ends early")

    def _blocks(self, container: av.container.InputContainer) -> Iterator[np.ndarray]:
        if not container.streams.audio:
            raise ItemError("not_audio", "no audio stream")
        stream = container.streams.audio[0]
        codec = stream.codec_context
        self._check_header(int(stream.rate or codec.sample_rate or 0), int(codec.channels or 0),
                           _declared_seconds(container, stream))
        pcm: _PcmCollector | None = None
        frames = container.decode(stream)
        while True:
            try:
                frame = next(frames, None)
            except (av.FFmpegError, ValueError) as exc:
                raise ItemError("truncated" if pcm is not None else "decode_error", str(exc)[:200]) from None
            if frame is None:
                break
            if pcm is None:
                self._check_header(int(frame.sample_rate or 0), len(frame.layout.channels), None)
                pcm = _PcmCollector(frame)
                self.sample_rate = int(stream.rate or stream.codec_context.sample_rate or 0)
                self.codec = stream.codec_context.name
                self.layout = frame.layout.name
                self.channel_names = [channel.name for channel in frame.layout.channels]
            pcm.add(frame)
            if pcm.frames >= BLOCK_FRAMES:
                yield from self._cut(pcm.take())
        if pcm is None or not self.sample_rate:
            raise ItemError("empty", "no audio frames")
        if pcm.frames:
            yield from self._cut(pcm.take())
        if self.decoded_frames == 0:
            raise ItemError("empty", "no audio samples")
        self._check_length(_declared_seconds(container, stream))

    def _check_header(self, rate: int, channels: int, seconds: float | None) -> None:
        """Refuse what the header (or the first frame) declares before decoding: 0 means unknown."""
        if rate and rate < self.min_rate:
            raise ItemError("low_source_rate", f"{rate} Hz < {self.min_rate} Hz")
        if rate and not MIN_HEADER_RATE <= rate <= MAX_HEADER_RATE:
            raise ItemError("bad_audio_header", f"sample rate {rate} Hz outside {MIN_HEADER_RATE}..{MAX_HEADER_RATE}")
        if channels > MAX_HEADER_CHANNELS:
            raise ItemError("bad_audio_header", f"{channels} channels, over {MAX_HEADER_CHANNELS}")
        if seconds is not None and math.isfinite(seconds) and seconds > MAX_HEADER_SECONDS:
            raise ItemError("bad_audio_header", f"declares {seconds / 3600:,.0f} hours, over "
                                                f"{MAX_HEADER_SECONDS / 3600:.0f}")

    def _cut(self, block: np.ndarray) -> Iterator[np.ndarray]:
        first = self.decoded_frames
        self.decoded_frames += block.shape[1]
        if self.clip is not None:
            start = max(0, int(round(self.clip[0] * self.sample_rate)))
            end = int(round(self.clip[1] * self.sample_rate))
            block = block[:, max(0, start - first):max(0, end - first)]
        if block.shape[1]:
            self.frames += block.shape[1]
            yield block

    def _check_length(self, declared: float | None) -> None:
        decoded = self.decoded_frames / self.sample_rate
        # A body cut short still decodes, but to less than its header promised.
        if declared is not None and declared > 0.5 and decoded < 0.95 * declared - 0.1:
            raise ItemError("truncated", f"decoded {decoded:.2f}s of {declared:.2f}s declared")
        if self.clip is not None and self.frames == 0:
            raise ItemError("clip_out_of_range", f"[{self.clip[0]}, {self.clip[1]}] outside {decoded:.2f}s")


def decode(media: Media) -> Decoded:
    """A whole clip decoded into memory (short clips and tools; the build streams through `scan`)."""
    stream = DecodeStream(media)
    samples = np.concatenate(list(stream), axis=1)
    return Decoded(samples, stream.sample_rate, stream.codec, stream.layout)


def cut(decoded: Decoded, start: float, end: float) -> Decoded:
    first = max(0, int(round(start * decoded.sample_rate)))
    last = min(decoded.samples.shape[1], int(round(end * decoded.sample_rate)))
    if last <= first:
        raise ItemError("clip_out_of_range", f"[{start}, {end}] outside {decoded.duration:.2f}s")
    return Decoded(decoded.samples[:, first:last], decoded.sample_rate, decoded.codec, decoded.layout)


# --------------------------------------------------------------------------- channels

_HALF_POWER = math.sqrt(0.5)
# Each channel's share of (left, right) in an ITU-R BS.775 downmix (ffmpeg's channel names). The
# LFE channel is left out, as the recommendation does; surround and centre go in at -3 dB.
_STEREO_SHARE: dict[str, tuple[float, float]] = {
    "FL": (1.0, 0.0), "FR": (0.0, 1.0), "FC": (_HALF_POWER, _HALF_POWER), "LFE": (0.0, 0.0),
    "LFE2": (0.0, 0.0), "FLC": (1.0, 0.0), "FRC": (0.0, 1.0),
    "BL": (_HALF_POWER, 0.0), "BR": (0.0, _HALF_POWER), "SL": (_HALF_POWER, 0.0), "SR": (0.0, _HALF_POWER),
    "BC": (0.5, 0.5), "DL": (1.0, 0.0), "DR": (0.0, 1.0), "WL": (1.0, 0.0), "WR": (0.0, 1.0),
    "TFL": (_HALF_POWER, 0.0), "TFR": (0.0, _HALF_POWER), "TFC": (0.5, 0.5), "TC": (0.5, 0.5),
    "TBL": (_HALF_POWER, 0.0), "TBR": (0.0, _HALF_POWER), "TBC": (0.5, 0.5),
}


def mix_matrix(channel_names: list[str], channels: int) -> np.ndarray:
    """(channels, len(channel_names)) downmix/upmix coefficients for a source channel layout.

    Mono is the mean of the BS.775 left and right. A layout with channels we cannot place (an
    unnamed 4-channel WAV) mixes every channel equally rather than keeping the first ones.
    """
    count = len(channel_names)
    if count == 1:
        return np.ones((channels, 1), dtype=np.float32)
    placed = all(name in _STEREO_SHARE for name in channel_names)
    if placed or count == 2:  # two channels we cannot name are taken as left and right
        names = channel_names if placed else ["FL", "FR"]
        stereo = np.array([_STEREO_SHARE[name] for name in names], dtype=np.float64).T
    else:
        stereo = np.full((2, count), 1.0 / count)
    matrix = stereo if channels == 2 else stereo.mean(axis=0, keepdims=True)
    return matrix.astype(np.float32)


def _default_names(count: int) -> list[str]:
    return {1: ["FC"], 2: ["FL", "FR"]}.get(count, [f"C{i}" for i in range(count)])


def set_channels(samples: np.ndarray, channels: int, channel_names: list[str] | None = None) -> np.ndarray:
    """Mix (channels_in, n) audio to 1 or 2 channels by its layout (BS.775; default by count)."""
    names = channel_names or _default_names(samples.shape[0])
    if len(names) == channels and channels <= 2:
        return samples
    return mix_matrix(names, channels) @ samples


def resample(samples: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    if rate_in == rate_out:
        return samples
    out = soxr.resample(np.ascontiguousarray(samples.T), rate_in, rate_out, quality="HQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


class _Resampler:
    """soxr's streaming resampler over (channels, n) blocks; the same output as one `resample` call."""

    def __init__(self, rate_in: int, rate_out: int, channels: int) -> None:
        self.stream = None if rate_in == rate_out else soxr.ResampleStream(
            rate_in, rate_out, channels, dtype="float32", quality="HQ")
        self.channels = channels

    def __call__(self, block: np.ndarray, last: bool = False) -> np.ndarray:
        if self.stream is None:
            return block
        out = self.stream.resample_chunk(np.ascontiguousarray(block.T), last=last)
        return np.ascontiguousarray(out.reshape(-1, self.channels).T)

    def flush(self) -> np.ndarray:
        return self(np.zeros((self.channels, 0), dtype=np.float32), last=True)


# --------------------------------------------------------------------------- encoding


class _FlacWriter:
    """16-bit FLAC written block by block into a spooled temp file."""

    def __init__(self, sample_rate: int, channels: int) -> None:
        self.file: BinaryIO = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # type: ignore[assignment]
        self._sound = soundfile.SoundFile(self.file, "w", sample_rate, channels, format="FLAC", subtype="PCM_16")
        self.frames = 0

    def write(self, block: np.ndarray) -> None:
        # To 16-bit here as libsndfile would (x 32768, rounded half to even): the same FLAC bytes,
        # and about a fifth less encoding CPU than handing it floats (bench/RESULTS.md, transcode).
        pcm = np.clip(block, -1.0, FULL_SCALE)
        pcm *= 32768.0
        self._sound.write(np.rint(pcm, out=pcm).astype(np.int16).T)
        self.frames += block.shape[1]

    def close(self) -> BinaryIO:
        self._sound.close()
        self.file.seek(0)
        return self.file


def encode_flac(samples: np.ndarray, sample_rate: int) -> bytes:
    """(channels, n) float audio as 16-bit FLAC bytes, clipped to full scale."""
    writer = _FlacWriter(sample_rate, samples.shape[0])
    writer.write(samples)
    return writer.close().read()


# --------------------------------------------------------------------------- policies


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
class Scan:
    """What the first pass learnt about a clip; its facts go on the manifest row even when dropped."""

    media: Media
    clip: tuple[float, float] | None
    sample_rate: int
    channels: int
    layout: str
    channel_names: list[str]
    codec: str
    frames: int
    peak: float  # of the decoded source
    output_frames: int  # after downmix and resampling
    output_peak: float  # of the kept output, before any gain
    overs: int  # kept output samples beyond full scale, before any gain
    # dB the downmix lost against its channels summed as if unrelated; None when nothing was mixed.
    downmix_db: float | None
    target_channels: int
    replay: list[np.ndarray] | None = field(default=None, repr=False)

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    @property
    def downmix(self) -> str | None:
        """How channels were combined ("5.1 -> mono"), or None when they were not."""
        if self.downmix_db is None:
            return None
        return f"{self.layout or self.channels} -> {_TARGET_NAMES[self.target_channels]}"

    @property
    def downmix_cancels(self) -> bool:
        return self.downmix_db is not None and self.downmix_db < CANCEL_DB


_TARGET_NAMES = {1: "mono", 2: "stereo"}


def finite_extremes(block: np.ndarray) -> tuple[float, float]:
    """A non-empty block's (max, min); ItemError `non_finite` when it holds NaN or inf (the extremes
    say it all: NaN propagates through max and min, so no |x| or isfinite copy is made)."""
    high, low = float(block.max()), float(block.min())
    if not (math.isfinite(high) and math.isfinite(low)):
        raise ItemError("non_finite", "the decoded audio holds NaN or infinite samples")
    return high, low


class _ScanStats:
    """Running figures of the first pass."""

    def __init__(self, config: AudioConfig) -> None:
        self.peak = 0.0
        self.output_peak = 0.0
        self.overs = 0
        self.output_frames = 0
        self.expected_power = 0.0  # of the downmix, if the source channels were unrelated
        self.mixed_power = 0.0
        limit = config.max_seconds if config.long_clips == "truncate" else None
        self.kept_frames = None if limit is None else int(round(limit * config.sample_rate))

    def source(self, block: np.ndarray) -> None:
        if not block.size:
            return
        high, low = finite_extremes(block)
        self.peak = max(self.peak, high, -low)

    def mixed(self, block: np.ndarray, mixed: np.ndarray, matrix: np.ndarray) -> None:
        wide = block.astype(np.float64)
        power = np.einsum("ij,ij->i", wide, wide)
        self.expected_power += float(np.sum((matrix.astype(np.float64) ** 2) @ power))
        self.mixed_power += float(np.sum(mixed.astype(np.float64) ** 2))

    def output(self, block: np.ndarray) -> None:
        kept = block
        if self.kept_frames is not None:
            kept = block[:, :max(0, self.kept_frames - self.output_frames)]
        if kept.size:
            high, low = float(kept.max()), float(kept.min())
            self.output_peak = max(self.output_peak, high, -low)
            if high > FULL_SCALE or low < -1.0:  # counted only where there is anything to count
                self.overs += int(np.count_nonzero((kept > FULL_SCALE) | (kept < -1.0)))
        self.output_frames += block.shape[1]

    def downmix_db(self) -> float:
        if self.expected_power <= 0:
            return 0.0
        return 10 * math.log10(max(self.mixed_power, 1e-30) / self.expected_power)


def _combines(channels_in: int, channels_out: int) -> bool:
    """True when a mix sums source channels (a downmix), not when it keeps or copies them."""
    return channels_in > max(channels_out, 1)


def _output_blocks(stream: DecodeStream, config: AudioConfig, stats: _ScanStats | None = None) -> Iterator[np.ndarray]:
    """Decoded blocks mixed to the target channels and resampled to the target rate."""
    matrix: np.ndarray | None = None
    resampler: _Resampler | None = None
    for block in stream:
        if matrix is None:
            names = stream.channel_names or _default_names(block.shape[0])
            matrix = mix_matrix(names, config.channels)
            resampler = _Resampler(stream.sample_rate, config.sample_rate, config.channels)
        if stats is not None:
            stats.source(block)
        mixed = matrix @ block
        if stats is not None and _combines(block.shape[0], config.channels):
            stats.mixed(block, mixed, matrix)
        out = resampler(mixed)
        if out.shape[1]:
            yield out
    if resampler is not None:
        tail = resampler.flush()
        if tail.shape[1]:
            yield tail


def scan(media: Media, config: AudioConfig, clip: tuple[float, float] | None = None) -> Scan:
    """The first pass: decode, downmix and resample the clip once, keeping figures (and, when
    small, the resampled audio for `encode`). Decoding problems raise ItemError."""
    stream = DecodeStream(media, clip, min_rate=config.min_source_rate)
    stats = _ScanStats(config)
    replay: list[np.ndarray] | None = []
    kept_bytes = 0
    for block in _output_blocks(stream, config, stats):
        stats.output(block)
        if replay is not None:
            kept_bytes += block.nbytes
            if kept_bytes > REPLAY_BYTES:
                replay = None  # too long to keep: `encode` decodes again
            else:
                replay.append(block)
    channels = len(stream.channel_names)
    mixed = _combines(channels, config.channels)
    return Scan(media, clip, stream.sample_rate, channels, stream.layout, stream.channel_names, stream.codec,
                  stream.frames, stats.peak, stats.output_frames, stats.output_peak, stats.overs,
                  round(stats.downmix_db(), 2) if mixed else None, config.channels, replay)


@dataclass
class Transcoded:
    source_sample_rate: int
    source_channels: int
    source_duration: float
    codec: str
    # Each sample's [start, end] seconds within the clip, known before any is encoded.
    spans: list[tuple[float, float]]
    # True when the sample is the whole clip (no cutting by the length policy).
    whole: bool
    # Each sample's FLAC, encoded as it is asked for (see `iter_segments`).
    files: Iterator[BinaryIO] = field(repr=False)
    # dB applied to fit the peak under full scale (0.0: none); --clipping clip never attenuates.
    gain_db: float = 0.0
    # Output samples clipped at full scale (only --clipping clip leaves any).
    clipped_samples: int = 0

    def iter_segments(self) -> Iterator[Segment]:
        """The samples one at a time, each encoded when asked for: a 3-hour clip cut into
        10-second pieces never has more than one piece's FLAC in hand. Read once."""
        for (start, end), file in zip(self.spans, self.files):
            yield Segment(start, end, file)

    @functools.cached_property
    def segments(self) -> list[Segment]:
        """Every sample at once (short clips and tests; the build writes `iter_segments` as they come)."""
        return list(self.iter_segments())

    @property
    def output_duration(self) -> float:
        return sum(end - start for start, end in self.spans)


def _gain(found: Scan, config: AudioConfig) -> float:
    if config.clipping == "clip" or found.output_peak <= FULL_SCALE:
        return 1.0
    return FULL_SCALE / found.output_peak


def encode(found: Scan, config: AudioConfig) -> Transcoded:
    """The policy checks, then the plan of the second pass: FLAC segments at the gain the peak allows.

    Encoding happens as `iter_segments` is read; it repeats the first pass, which succeeded.
    """
    if found.sample_rate < config.min_source_rate:
        raise ItemError("low_source_rate", f"{found.sample_rate} Hz < {config.min_source_rate} Hz")
    if found.peak < SILENCE_PEAK:
        raise ItemError("silent", "digitally silent")
    spans = plan_segments(found.duration, config)
    rate = config.sample_rate
    bounds = [(int(round(start * rate)), min(int(round(end * rate)), found.output_frames)) for start, end in spans]
    gain = _gain(found, config)
    if found.replay is not None:
        blocks: Iterable[np.ndarray] = found.replay
    else:
        blocks = _output_blocks(DecodeStream(found.media, found.clip), config)
    whole = len(spans) == 1 and spans[0][0] == 0.0 and spans[0][1] == found.duration
    written = [(start, start + max(0, last - first) / rate) for (start, _), (first, last) in zip(spans, bounds)]
    return Transcoded(found.sample_rate, found.channels, found.duration, found.codec, written, whole,
                      _segment_files(blocks, bounds, gain, config),
                      gain_db=round(20 * math.log10(gain), 4) if gain != 1.0 else 0.0,
                      clipped_samples=found.overs if config.clipping == "clip" else 0)


def _segment_files(blocks: Iterable[np.ndarray], bounds: list[tuple[int, int]], gain: float,
                   config: AudioConfig) -> Iterator[BinaryIO]:
    """Encode output frames [first, last) of each bound from consecutive blocks, yielding each FLAC
    as soon as it is complete (one writer open at a time)."""
    index, position = 0, 0
    writer: _FlacWriter | None = None
    for block in blocks:
        end = position + block.shape[1]
        while index < len(bounds) and bounds[index][0] < end:
            first, last = bounds[index]
            if writer is None:
                writer = _FlacWriter(config.sample_rate, config.channels)
            piece = block[:, max(0, first - position):max(0, min(last, end) - position)]
            if piece.shape[1]:
                writer.write(piece * gain if gain != 1.0 else piece)
            if last > end:
                break
            yield writer.close()
            writer, index = None, index + 1
        position = end
        if index >= len(bounds):
            return
    while index < len(bounds):  # a bound past the audio's end (rounding) ends where the audio does
        yield (writer or _FlacWriter(config.sample_rate, config.channels)).close()
        writer, index = None, index + 1


def transcode(media: Media, config: AudioConfig, clip: tuple[float, float] | None = None) -> Transcoded:
    """bytes or a local file -> checked, resampled, channel-set FLAC segments; ItemError names any drop."""
    return encode(scan(media, config, clip), config)
