"""VGGSound: its CSV (no header, quoted labels) and clips through a loopback "YouTube" with yt-dlp;
videos that are gone are counted as `unavailable`."""
from __future__ import annotations

from collections import Counter

import pytest
from web_source_helpers import run_build, samples, serve_videos, status_counts

from audio_dataset import manifest
from audio_dataset.source import Item, ItemError, SourceConfig, SourceError, UserError
from audio_dataset.stats import compute_stats
from pipelines import vggsound
from pipelines.vggsound import VGGSound, parse_rows

CSV = """PiBbLe00001,10,dog barking,train
PiBbLe00001,10,dog howling,train
WaLtZ000001,5,"vehicle horn, car horn, honking",test
GoNe0000001,0,people marching,test
HtMlPaGe001,0,playing accordion,train
HuMpBaCk001,30,whale calling,train
"""


def test_csv_rows_merge_labels_of_one_clip_and_keep_the_splits(loopback, tmp_path):
    url = loopback.add("/~vgg/data/vggsound/vggsound.csv", CSV.encode(), "text/csv")
    source = VGGSound(SourceConfig(input=url))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert sorted(items) == ["GoNe0000001_000000", "HtMlPaGe001_000000", "HuMpBaCk001_000030",
                             "PiBbLe00001_000010", "WaLtZ000001_000005"]
    dog = items["PiBbLe00001_000010"]
    assert (dog.text, dog.tag, dog.split) == (["dog barking", "dog howling"], ["dog barking", "dog howling"], "train")
    assert dog.sample_fields == {"class_labels": ["dog barking", "dog howling"], "fold": None,
                                 "benchmark_split": "train"}
    assert dog.original_data == {"youtube_id": "PiBbLe00001", "start_seconds": 10.0, "end_seconds": 20.0}
    horn = items["WaLtZ000001_000005"]
    assert horn.tag == ["vehicle horn, car horn, honking"] and horn.split == "test"
    only_test = VGGSound(SourceConfig(input=url, options={"splits": "test"}))
    assert {item.split for item in only_test.list_items()} == {"test"}


def test_bad_csv_and_bad_options_are_refused(tmp_path):
    bad = tmp_path / "vggsound.csv"
    bad.write_text("abc,5,dog barking,train\n")
    with pytest.raises(SourceError, match="start_seconds 'ten'"):
        list(parse_rows("abc,5,dog,train\nabc,ten,dog barking,train\n"))
    assert [row[0] for row in parse_rows("youtube_id,start_seconds,label,split\nabc,5,dog,train\n")] == ["abc"]
    with pytest.raises(UserError, match=r"split\(s\) val; choose from train, test"):
        VGGSound(SourceConfig(input=str(bad), options={"splits": "val"})).check()
    with pytest.raises(UserError, match="unknown vggsound option"):
        VGGSound(SourceConfig(input=str(bad), options={"split": "test"})).check()


@pytest.mark.parametrize("reason, counted", [("video_unavailable", "unavailable"), ("http_404", "unavailable"),
                                             ("http_429", "http_429"), ("timeout", "timeout")])
def test_only_a_gone_video_counts_as_unavailable(monkeypatch, reason, counted):
    def download(url, section, config):
        raise ItemError(reason, "ERROR: [youtube] x: Video unavailable. This video has been removed")

    monkeypatch.setattr("pipelines._segments.download_audio", download)
    source = VGGSound(SourceConfig())
    item = Item(source_id="x_000000", locator="x", text=["dog"],
                original_data={"youtube_id": "x", "start_seconds": 0.0, "end_seconds": 10.0})
    with pytest.raises(ItemError) as error:
        source.fetch(item)
    assert error.value.reason == counted
    assert vggsound.UNAVAILABLE == "unavailable"


@pytest.mark.usefixtures("ray_local")
def test_vggsound_builds_with_unavailable_videos_counted(loopback, tmp_path):
    base = serve_videos(loopback, {"PiBbLe00001": "pibble", "HuMpBaCk001": "glacier-bay-humpback",
                                   "WaLtZ000001": "147793__setuniman__sweet-waltz-0i-22mi"})
    table = tmp_path / "vggsound.csv"
    table.write_text(CSV)
    out = tmp_path / "out"
    rows = run_build("vggsound", out, input=str(table), base_url=base)
    assert status_counts(rows) == {"ok": 3, "failed": 2}
    assert Counter(row["error"] for row in rows.values() if row["error"]) == {"unavailable": 1, "no_media": 1}
    assert rows["GoNe0000001_000000"]["error_detail"].startswith("http_404")
    assert {key: rows[key]["split"] for key in ("WaLtZ000001_000005", "HuMpBaCk001_000030")} == \
        {"WaLtZ000001_000005": "test", "HuMpBaCk001_000030": "train"}
    by_reason = compute_stats(manifest.read_table(out / manifest.MANIFEST_FILE))["by_reason"]
    assert by_reason["unavailable"] == 1  # what `audiodata stats` and the card report
    horn = samples(out)["WaLtZ000001_000005"]
    assert (horn["text"], horn["class_labels"], horn["benchmark_split"], horn["fold"]) == \
        (["vehicle horn, car horn, honking"], ["vehicle horn, car horn, honking"], "test", None)
    assert abs(horn["duration"] - 10.0) < 0.05
