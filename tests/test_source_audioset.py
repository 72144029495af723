"""AudioSet through a loopback "YouTube": real segment CSV format, real ontology, yt-dlp for real."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr
from web_source_helpers import run_build, samples, serve_videos, status_counts

from audio_dataset import manifest
from audio_dataset.source import SourceConfig, SourceError
from audio_dataset.youtube import download_audio, failure_reason
from conftest import DATA_DIR, REAL_AUDIO_DIR
from pipelines.audioset import AudioSet, label_caption, parse_segments

FIXTURES = Path(__file__).parent / "fixtures" / "audioset"
SEGMENTS = FIXTURES / "segments.csv"


def test_parse_segments_reads_the_real_csv_layout():
    rows = list(parse_segments(SEGMENTS.read_text()))
    assert rows[0] == ("PiBbLe00001", 10.0, 20.0, ["/m/0bt9lr", "/m/07qf0zm"])
    assert len(rows) == 5
    assert label_caption(["Dog"]) == "The sound of Dog"
    assert label_caption(["Dog", "Howl", "Bark"]) == "The sounds of Dog, Howl and Bark"


def test_malformed_segment_csv_is_a_source_error(tmp_path):
    bad = tmp_path / "eval_segments.csv"
    bad.write_text("# c\n# c\n# YTID, start_seconds, end_seconds, positive_labels\nabc, x, 10, \"/m/04rlf\"\n")
    source = AudioSet(SourceConfig(input=str(bad), options={"ontology": str(DATA_DIR / "ontology.json")}))
    with pytest.raises(SourceError, match="non-numeric"):
        list(source.list_items())


def test_ytdlp_cuts_the_segment_from_a_direct_media_url(loopback):
    """yt-dlp's generic extractor, ffmpeg range reads, exact cut: the bytes are pibble.ogg 10-20 s."""
    base = serve_videos(loopback, {"PiBbLe00001": "pibble"})
    data = download_audio(f"{base}/watch?v=PiBbLe00001", (10.0, 20.0))
    cut, rate = soundfile.read(io.BytesIO(data), dtype="float32")
    assert abs(len(cut) / rate - 10.0) < 0.05
    whole, whole_rate = soundfile.read(REAL_AUDIO_DIR / "pibble.ogg", dtype="float32")
    reference = whole[10 * whole_rate:20 * whole_rate]
    if rate != whole_rate:
        reference = soxr.resample(reference, whole_rate, rate)
    n = min(len(cut), len(reference))
    correlation = np.corrcoef(cut[:n], reference[:n])[0, 1]
    assert correlation > 0.9, correlation  # the right ten seconds, not some other part
    ranged_requests = [r for r in loopback.requests_to("/watch") if r.header("Range")]
    assert ranged_requests, "ffmpeg should seek with HTTP range requests"


def test_ytdlp_errors_become_named_reasons():
    assert failure_reason("ERROR: [generic] x: Unable to download webpage: HTTP Error 404: Not Found") == "http_404"
    assert failure_reason("ERROR: [youtube] abc: Private video. Sign in if you've been granted access") \
        == "video_unavailable"
    assert failure_reason("ERROR: Unsupported URL: http://x") == "no_media"


@pytest.mark.usefixtures("ray_local")
def test_audioset_builds_verified_shards_with_exact_fault_counts(loopback, tmp_path):
    base = serve_videos(loopback, {"PiBbLe00001": "pibble", "HuMpBaCk001": "glacier-bay-humpback",
                                   "WaLtZ000001": "147793__setuniman__sweet-waltz-0i-22mi"})
    ontology_url = loopback.add("/ontology.json", (DATA_DIR / "ontology.json").read_bytes(), "application/json")
    exclude = tmp_path / "eval-overlap.txt"
    exclude.write_text("# AudioSet ids used by an evaluation set\nWaLtZ000001\n")
    out = tmp_path / "out"
    rows = run_build("audioset", out, input=str(SEGMENTS), base_url=base,
                     options={"ontology": ontology_url}, exclude=[exclude])
    assert status_counts(rows) == {"ok": 2, "failed": 2, "excluded": 1}
    assert rows["MiSsInG0001"]["error"] == "http_404"
    assert rows["HtMlPaGe001"]["error"] == "no_media"
    assert rows["WaLtZ000001"]["status"] == "excluded"
    built = samples(out)
    assert set(built) == {"PiBbLe00001", "HuMpBaCk001"}
    dog = built["PiBbLe00001"]
    assert dog["text"] == ["The sounds of Dog and Howl"]
    assert dog["tag"] == ["Dog", "Howl"]
    assert dog["original_data"]["start_seconds"] == 10.0
    assert abs(dog["duration"] - 10.0) < 0.05
    assert rows["HuMpBaCk001"]["split"] == "train"  # a training CSV: AudioSet's own split


def test_audiodata_cli_builds_an_eval_csv_and_verify_passes(loopback, tmp_path):
    """The user's path: `audiodata build --source audioset ...` then `audiodata verify`."""
    base = serve_videos(loopback, {"PiBbLe00001": "pibble"})
    segments = tmp_path / "eval_segments.csv"
    segments.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=2, num_segs=2\n"
                        "# YTID, start_seconds, end_seconds, positive_labels\n"
                        'PiBbLe00001, 0.000, 10.000, "/m/0bt9lr"\nMiSsInG0001, 0.000, 10.000, "/m/04rlf"\n')
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "audio_dataset.cli"]
    build = subprocess.run([*cli, "build", "--source", "audioset", "--input", str(segments), "--base-url", base,
                            "--source-option", f"ontology={DATA_DIR / 'ontology.json'}", "--out", str(out),
                            "--workers", "1", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    verify = subprocess.run([*cli, "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0 and "verified" in verify.stdout
    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    assert sorted((r["source_id"], r["status"], r["split"]) for r in rows) == [
        ("MiSsInG0001", "failed", "test"), ("PiBbLe00001", "ok", "test")]
