"""Sonniss GDC bundle served as LAION mirrored it: an autoindex listing of library archives and WAVs."""
from __future__ import annotations

import pytest
from web_source_helpers import run_build, samples, serve_tree, status_counts, wav_bytes, zip_bytes

from audio_dataset.source import SourceConfig, SourceError, UserError
from pipelines._packs import directory_links, pack_item
from pipelines.sonniss import Sonniss

BUNDLE = "Sonniss.com - GDC 2019 - Game Audio Bundle"
LIBRARY = "Boom Library - Cinematic Doors.zip"


def bundle_tree() -> dict:
    library = zip_bytes({
        "Cinematic Doors/DOOR_Wood_Creak_01.wav": wav_bytes("456440__inspectorj__bird-whistling-robin-single-13", 2.5),
        "Cinematic Doors/DOOR_Metal_Slam_02.wav": wav_bytes("sorohanro_-_solo-trumpet-06", 3.0),
        "Cinematic Doors/DOOR_Broken_03.wav": b"RIFF\x10\x00\x00\x00WAVEjunk-not-audio",
        "__MACOSX/Cinematic Doors/._DOOR_Wood_Creak_01.wav": b"\x00\x05\x16\x07",
        "Cinematic Doors/Readme.txt": b"Thank you for downloading",
    })
    return {BUNDLE: {LIBRARY: library, "Ambience": {
        "AMB_Forest_Birds_01.wav": wav_bytes("glacier-bay-humpback", 3.0),
        "AMB_Missing_02.wav": b"",      # replaced by a 404 below
        "AMB_Huge_03.wav": b"",         # replaced by an oversized body below
    }}}


def test_pack_items_caption_from_file_and_folder_names():
    item = pack_item(f"{BUNDLE}/{LIBRARY}/Cinematic Doors/DOOR_Wood_Creak_01.wav", "x", "lic")
    assert item.text == ["DOOR Wood Creak", "DOOR Wood Creak, Cinematic Doors"]
    assert item.tag == ["Sonniss com GDC 2019 Game Audio Bundle", "Boom Library Cinematic Doors", "Cinematic Doors"]


def test_directory_links_stay_below_the_root():
    page = ('<a href="?C=N;O=D">Name</a><a href="/">Parent Directory</a><a href="../">up</a>'
            '<a href="a%20b/">a b/</a><a href="x.wav">x.wav</a><a href="http://elsewhere/y.wav">y</a>')
    assert directory_links(page, "http://h/root/") == ["http://h/root/a%20b/", "http://h/root/x.wav"]


def test_an_archive_that_cannot_be_downloaded_stops_the_listing(loopback, tmp_path):
    root = serve_tree(loopback, "/b/", {"Library.zip": b""})
    loopback.fault("/b/Library.zip", "404", times=None)
    with pytest.raises(SourceError, match="cannot list archive"):
        list(Sonniss(SourceConfig(input=root, state_dir=tmp_path)).list_items())


def test_input_is_required():
    with pytest.raises(UserError, match="needs --input"):
        Sonniss(SourceConfig()).check()


@pytest.mark.usefixtures("ray_local")
def test_sonniss_builds_from_a_directory_listing_with_exact_counts(loopback, tmp_path):
    root = serve_tree(loopback, "/bundles/", bundle_tree())
    folder = f"/bundles/{BUNDLE}/".replace(" ", "%20")
    loopback.fault(f"{folder}{LIBRARY}".replace(" ", "%20"), "truncate", times=1)  # retried
    loopback.fault(f"{folder}Ambience/AMB_Missing_02.wav", "404", times=None)
    loopback.fault(f"{folder}Ambience/AMB_Huge_03.wav", "oversize", times=None, size=3_000_000)
    out = tmp_path / "out"
    rows = run_build("sonniss", out, input=root,
                     options={"http_max_bytes": "2000000", "http_backoff_base": "0.01", "http_backoff_cap": "0.02"})
    assert status_counts(rows) == {"ok": 3, "failed": 3}
    by_name = {sid.rsplit("/", 1)[-1]: row for sid, row in rows.items()}
    assert by_name["AMB_Missing_02.wav"]["error"] == "http_404"
    assert by_name["AMB_Huge_03.wav"]["error"] == "too_large"
    assert by_name["DOOR_Broken_03.wav"]["status"] == "failed"
    assert "._DOOR_Wood_Creak_01.wav" not in by_name and "Readme.txt" not in by_name
    # The library archive was fetched once (plus the truncated try), however many workers read it.
    assert len(loopback.requests_to(f"{folder}{LIBRARY}".replace(" ", "%20"))) == 2
    built = {meta["text"][0]: meta for meta in samples(out).values()}
    assert set(built) == {"DOOR Wood Creak", "DOOR Metal Slam", "AMB Forest Birds"}
    assert built["AMB Forest Birds"]["tag"] == ["Sonniss com GDC 2019 Game Audio Bundle", "Ambience"]
