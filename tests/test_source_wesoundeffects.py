"""WeSoundEffects from a URL list (.txt) of purchased files on a loopback server."""
from __future__ import annotations

import pytest
from web_source_helpers import run_build, samples, status_counts, wav_bytes, zip_bytes

from audio_dataset.source import SourceConfig
from pipelines.wesoundeffects import WeSoundEffects



def serve(loopback) -> str:
    loopback.add("/dl/Whoosh_Fast_01.wav", wav_bytes("sorohanro_-_solo-trumpet-06", 2.0), "audio/wav")
    loopback.add("/dl/Impact_Metal_02.wav", wav_bytes("198-209-0000", 2.0), "audio/wav")
    loopback.add("/dl/WeSoundEffects%20-%20Sci-Fi.zip", zip_bytes({
        "Sci-Fi/Laser_Blast_Short.wav": wav_bytes("456440__inspectorj__bird-whistling-robin-single-13", 2.0)}),
        "application/zip")
    listing = "\n".join(["# purchased WeSoundEffects downloads", f"{loopback.url}/dl/Whoosh_Fast_01.wav",
                         f"{loopback.url}/dl/Impact_Metal_02.wav",
                         f"{loopback.url}/dl/WeSoundEffects%20-%20Sci-Fi.zip"])
    return loopback.add("/downloads.txt", listing.encode(), "text/plain")


def test_url_list_entries_become_items(loopback, tmp_path):
    source = WeSoundEffects(SourceConfig(input=serve(loopback), state_dir=tmp_path))
    items = {i.source_id: i for i in source.list_items()}
    assert set(items) == {"Whoosh_Fast_01.wav", "Impact_Metal_02.wav",
                          "WeSoundEffects - Sci-Fi.zip/Sci-Fi/Laser_Blast_Short.wav"}
    assert items["WeSoundEffects - Sci-Fi.zip/Sci-Fi/Laser_Blast_Short.wav"].text == [
        "Laser Blast Short", "Laser Blast Short, Sci Fi"]


@pytest.mark.usefixtures("ray_local")
def test_wesoundeffects_builds_with_exact_counts(loopback, tmp_path):
    listing = serve(loopback)
    loopback.fault("/dl/Impact_Metal_02.wav", "html", times=None)   # a login page instead of the file
    loopback.fault("/dl/Whoosh_Fast_01.wav", "503", times=1)        # retried
    rows = run_build("wesoundeffects", tmp_path / "out", input=listing,
                     options={"http_backoff_base": "0.01", "http_backoff_cap": "0.02"})
    assert status_counts(rows) == {"ok": 2, "failed": 1}
    assert rows["Impact_Metal_02.wav"]["error"] == "not_audio_content"
    assert samples(tmp_path / "out")["Whoosh_Fast_01.wav"]["text"] == ["Whoosh Fast"]
