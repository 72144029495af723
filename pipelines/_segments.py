"""The shared half of AudioSet and AudioCaps: a YouTube id plus [start, end] seconds, fetched
through yt-dlp and cut to the segment (see `audio_dataset.youtube`)."""
from __future__ import annotations

from typing import ClassVar

from audio_dataset.source import Item, Source, SourceConfig
from audio_dataset.youtube import YtdlpConfig, download_audio, video_url


class YoutubeSegmentSource(Source):
    """Items carry the YouTube id as `locator` and the segment in `original_data`."""

    # Each download runs an ffmpeg process; more in flight mostly waits on YouTube's throttling.
    fetch_concurrency: ClassVar[int] = 4

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        timeout = float(config.options.get("timeout", 30))
        self.ytdlp = YtdlpConfig(socket_timeout=timeout)

    def segment_item(self, video_id: str, start: float, end: float, **fields) -> Item:
        original = dict(fields.pop("original_data", {}))
        original.update({"youtube_id": video_id, "start_seconds": start, "end_seconds": end})
        return Item(locator=video_id, url=f"https://www.youtube.com/watch?v={video_id}&t={int(start)}",
                    original_data=original, **fields)

    def fetch(self, item: Item) -> bytes:
        section = (float(item.original_data["start_seconds"]), float(item.original_data["end_seconds"]))
        return download_audio(video_url(item.locator, self.config.base_url), section, self.ytdlp)
