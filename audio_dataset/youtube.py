"""Audio of one online video through yt-dlp, cut to a segment: AudioSet and AudioCaps use it.

yt-dlp runs in-process (`yt_dlp.YoutubeDL`) with the ffmpeg binary that the `imageio-ffmpeg` wheel
ships, and YouTube's JavaScript challenges run in the Deno binary of the `deno` wheel with the
`yt-dlp-ejs` scripts, so nothing outside pip is needed. A segment is cut by yt-dlp's download ranges: ffmpeg reads
only the bytes around [start, end] (HTTP range requests) and re-encodes at the cut points
(`force_keyframes_at_cuts`), so a 10 s AudioSet segment costs ~10 s of audio, not the whole video,
and starts exactly where the CSV says.

Cookies for age-gated or bot-checked videos come from the file named by $AUDIODATA_YTDLP_COOKIES
(Netscape format, as yt-dlp's --cookies); the path is never logged.
"""
from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from audio_dataset.source import ItemError, SourceError

YOUTUBE_WATCH_URL = "https://www.youtube.com/watch?v={id}"
COOKIES_ENV = "AUDIODATA_YTDLP_COOKIES"

_ffmpeg_lock = threading.Lock()
_ffmpeg_dir: str | None = None


@dataclass(frozen=True)
class YtdlpConfig:
    socket_timeout: float = 30.0
    retries: int = 3
    max_bytes: int = 512 * 2**20
    # yt-dlp format selector: the best audio-only stream, else the best stream with audio.
    format: str = "bestaudio/best"


def video_url(video_id: str, base_url: str | None = None) -> str:
    """The watch URL of a YouTube id; `base_url` replaces the site (`{id}` in it is a template)."""
    if not base_url:
        return YOUTUBE_WATCH_URL.format(id=video_id)
    if "{id}" in base_url:
        return base_url.format(id=video_id)
    return f"{base_url.rstrip('/')}/watch?v={video_id}"


def ffmpeg_dir() -> str:
    """A folder holding `ffmpeg` (a link to imageio-ffmpeg's binary), as yt-dlp's ffmpeg_location.

    yt-dlp recognises the binary by its file name, and imageio's is named like
    `ffmpeg-linux-x86_64-v7.0`, so it gets a correctly named link in a per-user temp folder.
    """
    global _ffmpeg_dir
    with _ffmpeg_lock:
        if _ffmpeg_dir and os.path.exists(os.path.join(_ffmpeg_dir, "ffmpeg")):
            return _ffmpeg_dir
        import imageio_ffmpeg

        binary = imageio_ffmpeg.get_ffmpeg_exe()
        if os.path.basename(binary) == "ffmpeg":
            _ffmpeg_dir = os.path.dirname(binary)
            return _ffmpeg_dir
        folder = Path(tempfile.gettempdir()) / f"audiodata-ffmpeg-{os.getuid()}"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
        # A shared /tmp: a folder someone else made (or can write) could hand yt-dlp their `ffmpeg`.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise SourceError(f"{folder} is not a folder only this user can write; remove it and rerun")
        link = folder / "ffmpeg"
        if not (link.is_symlink() and os.readlink(link) == binary):
            temp = folder / f"ffmpeg.{os.getpid()}.{threading.get_ident()}"
            temp.unlink(missing_ok=True)
            temp.symlink_to(binary)
            os.replace(temp, link)  # atomic: concurrent workers never see a half-made link
        _ffmpeg_dir = str(folder)
        return _ffmpeg_dir


def download_audio(url: str, section: tuple[float, float] | None = None,
                   config: YtdlpConfig = YtdlpConfig()) -> bytes:
    """The audio of `url` (cut to `section` seconds when given) as encoded bytes, or ItemError."""
    import yt_dlp
    from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor
    from yt_dlp.utils import download_range_func

    location = ffmpeg_dir()
    # yt-dlp decides whether ffmpeg can cut sections before it reads `ffmpeg_location`, from a
    # context variable its CLI sets; set it too (per thread: each thread has its own context).
    FFmpegPostProcessor._ffmpeg_location.set(location)
    with tempfile.TemporaryDirectory(prefix="audiodata-ytdlp-") as folder:
        options = {
            "quiet": True, "no_warnings": True, "noprogress": True, "noplaylist": True,
            "format": config.format, "outtmpl": os.path.join(folder, "audio.%(ext)s"),
            "ffmpeg_location": location, "socket_timeout": config.socket_timeout,
            "retries": config.retries, "fragment_retries": config.retries,
            "max_filesize": config.max_bytes, "cachedir": False, "logger": _SilentLogger(),
        }
        runtime = _deno_path()
        if runtime:
            options["js_runtimes"] = {"deno": {"path": runtime}}
        cookies = os.environ.get(COOKIES_ENV)
        if cookies:
            if not os.path.isfile(cookies):
                raise SourceError(f"${COOKIES_ENV} does not name a readable cookies file")
            options["cookiefile"] = cookies
        if section is not None:
            start, end = section
            if not end > start >= 0:
                raise ItemError("bad_segment", f"segment [{start}, {end}]")
            options["download_ranges"] = download_range_func(None, [(float(start), float(end))])
            options["force_keyframes_at_cuts"] = True
        try:
            with yt_dlp.YoutubeDL(options) as ydl:
                ydl.extract_info(url, download=True)
        except yt_dlp.utils.DownloadError as exc:
            message = str(exc)
            raise ItemError(failure_reason(message), _clean(message)) from None
        files = [p for p in Path(folder).iterdir() if p.is_file() and not p.name.endswith((".part", ".ytdl"))]
        if not files:
            # max_filesize makes yt-dlp skip the download without an error.
            raise ItemError("too_large", f"no file written (over {config.max_bytes} bytes, or nothing to download)")
        data = max(files, key=lambda p: p.stat().st_size).read_bytes()
    if len(data) > config.max_bytes:
        raise ItemError("too_large", f"{len(data)} bytes")
    return data


def _deno_path() -> str | None:
    """The Deno binary the `deno` wheel ships: YouTube's player needs a JavaScript runtime (with the
    yt-dlp-ejs scripts) to unlock its audio formats; found here whatever PATH a Ray worker has."""
    try:
        import deno
    except ImportError:
        return None
    path = deno.find_deno_bin()
    return path if path and os.path.exists(path) else None


_REASONS = (
    (re.compile(r"HTTP Error 404|HTTP Error 410"), "http_404"),
    (re.compile(r"HTTP Error 429|Too Many Requests"), "http_429"),
    (re.compile(r"HTTP Error 403"), "http_4xx"),
    (re.compile(r"HTTP Error 5\d\d"), "http_5xx"),
    (re.compile(r"(?i)private video|video unavailable|has been removed|account .* terminated|"
                r"not available in your country|members-only|sign in to confirm"), "video_unavailable"),
    (re.compile(r"(?i)unsupported url|no video formats|requested format is not available"), "no_media"),
    (re.compile(r"(?i)timed out|timeout"), "timeout"),
    (re.compile(r"(?i)connection (refused|reset|aborted)|name or service not known"), "connection_error"),
)


def failure_reason(message: str) -> str:
    """A short manifest reason for a yt-dlp error message."""
    for pattern, reason in _REASONS:
        if pattern.search(message):
            return reason
    return "download_error"


def _clean(message: str) -> str:
    from audio_dataset.redaction import redact

    return redact(message.replace("ERROR: ", ""))[:300]


class _SilentLogger:
    """yt-dlp logs to stderr by default; errors reach us as DownloadError instead."""

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        pass
