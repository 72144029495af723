"""Helpers for the web-source tests: a range-capable media route, a build runner, manifest counts."""
from __future__ import annotations

import io
import json
import re
import zipfile
from collections import Counter
from pathlib import Path

from loopback import HTML_ERROR_PAGE, Request, Response

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig
from audio_dataset.build import BuildOptions, build
from audio_dataset.shards import iter_shard
from audio_dataset.source import SourceConfig
from audio_dataset.verify import verify

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def ranged(body: bytes, content_type: str):
    """A handler that honours Range requests with 206 Partial Content, as CDNs and YouTube do
    (ffmpeg seeks inside a remote file with them)."""

    def handler(request: Request) -> Response:
        wanted = request.header("Range")
        match = _RANGE.fullmatch(wanted.strip()) if wanted else None
        if not match or (not match.group(1) and not match.group(2)):
            return Response(200, body, content_type, {"Accept-Ranges": "bytes"})
        if match.group(1):
            first = int(match.group(1))
            last = min(int(match.group(2)) if match.group(2) else len(body) - 1, len(body) - 1)
        else:  # suffix range: the last N bytes
            first, last = max(0, len(body) - int(match.group(2))), len(body) - 1
        if first >= len(body):
            return Response(416, b"", content_type, {"Content-Range": f"bytes */{len(body)}"})
        return Response(206, body[first:last + 1], content_type,
                        {"Accept-Ranges": "bytes", "Content-Range": f"bytes {first}-{last}/{len(body)}"})

    return handler


def serve_videos(loopback, clips: dict[str, str], html_ids: tuple[str, ...] = ("HtMlPaGe001",)) -> str:
    """A loopback "YouTube": /watch?v=ID serves the real clip named for ID (range-capable), an
    HTML page for `html_ids`, 404 otherwise. Returns the base URL to pass as --base-url."""
    from conftest import REAL_AUDIO_DIR

    handlers = {video: ranged((REAL_AUDIO_DIR / f"{stem}.ogg").read_bytes(), "audio/ogg")
                for video, stem in clips.items()}

    def watch(request: Request) -> Response:
        video = request.query.get("v", "")
        if video in html_ids:
            return Response(200, HTML_ERROR_PAGE, "text/html; charset=utf-8")
        if video not in handlers:
            return Response(404, HTML_ERROR_PAGE, "text/html")
        return handlers[video](request)

    loopback.add_handler("/watch", watch)
    return loopback.url


def run_build(source: str, out: Path, *, input: str | None = None, base_url: str | None = None,
              options: dict[str, str] | None = None, exclude: list[Path] | None = None,
              audio: AudioConfig | None = None) -> dict[str, dict]:
    """Build `source` into `out`, check `audiodata verify` passes, return manifest rows by source id."""
    config = SourceConfig(input=input, base_url=base_url, options=dict(options or {}))
    build(BuildOptions(source=source, out=out, source_config=config, audio=audio or AudioConfig(),
                       progress=False, workers=2, samples_per_shard=8, exclude_files=list(exclude or [])))
    report = verify(out)
    assert report.ok, report.problems
    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    return {row["source_id"]: row for row in rows}


def status_counts(rows: dict[str, dict]) -> Counter:
    return Counter(row["status"] for row in rows.values())


def samples(out: Path) -> dict[str, dict]:
    """Every sample's JSON in the output, by source id."""
    found = {}
    for tar in sorted(out.glob("*/*.tar")):
        for sample in iter_shard(tar):
            meta = json.loads(sample["json"])
            found[meta["source_id"]] = meta
    return found


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def apache_index(title_path: str, names: list[str]) -> bytes:
    """A directory listing page in Apache mod_autoindex's format (what `wget -r -np` walks)."""
    from urllib.parse import quote

    rows = "".join(
        f'<tr><td valign="top"><img src="/icons/{"folder" if n.endswith("/") else "unknown"}.gif" alt="[   ]"></td>'
        f'<td><a href="{quote(n)}">{n}</a></td><td align="right">2022-10-01 12:00  </td>'
        f'<td align="right">  - </td><td>&nbsp;</td></tr>\n' for n in names)
    return (
        '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 3.2 Final//EN">\n<html>\n <head>\n'
        f"  <title>Index of {title_path}</title>\n </head>\n <body>\n<h1>Index of {title_path}</h1>\n  <table>\n"
        '   <tr><th valign="top"><img src="/icons/blank.gif" alt="[ICO]"></th><th><a href="?C=N;O=D">Name</a></th>'
        '<th><a href="?C=M;O=A">Last modified</a></th><th><a href="?C=S;O=A">Size</a></th></tr>\n'
        '<tr><td valign="top"><img src="/icons/back.gif" alt="[PARENTDIR]"></td><td><a href="/">Parent Directory</a>'
        "</td></tr>\n" + rows + "</table>\n</body></html>\n").encode()


def serve_tree(loopback, root: str, tree: dict) -> str:
    """Serve `tree` ({name: bytes | subtree}) below `root` with autoindex pages; returns the root URL."""
    from urllib.parse import quote

    def add(path: str, node: dict) -> None:
        names = [f"{k}/" if isinstance(v, dict) else k for k, v in node.items()]
        loopback.add(quote(path), apache_index(path, names), "text/html;charset=UTF-8")
        for name, value in node.items():
            if isinstance(value, dict):
                add(f"{path}{name}/", value)
            else:
                kind = "application/zip" if name.endswith(".zip") else "audio/wav"
                loopback.add(quote(f"{path}{name}"), value, kind)

    add(root if root.endswith("/") else root + "/", tree)
    return loopback.url + quote(root if root.endswith("/") else root + "/")


def wav_bytes(stem: str, seconds: float = 3.0) -> bytes:
    """A short WAV (sound libraries ship WAV) cut from a real test clip."""
    import soundfile

    from conftest import REAL_AUDIO_DIR

    data, rate = soundfile.read(REAL_AUDIO_DIR / f"{stem}.ogg", dtype="int16")
    buffer = io.BytesIO()
    soundfile.write(buffer, data[: int(seconds * rate)], rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()
