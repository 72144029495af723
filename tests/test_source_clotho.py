"""Clotho from a loopback "Zenodo": its caption/metadata CSVs and 7z audio archives."""
from __future__ import annotations

import io
from pathlib import Path

import py7zr
import pytest
import soundfile
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.source import Item, ItemError, SourceConfig
from conftest import REAL_AUDIO_DIR
from pipelines.clotho import Clotho

FIXTURES = Path(__file__).parent / "fixtures" / "clotho"


def wav(stem: str, seconds: float = 6.0) -> bytes:
    """A WAV (Clotho ships WAV) made from a real clip, at most `seconds` long."""
    data, rate = soundfile.read(REAL_AUDIO_DIR / f"{stem}.ogg", dtype="int16")
    buffer = io.BytesIO()
    soundfile.write(buffer, data[: int(seconds * rate)], rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def seven_zip(folder: str, files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(data, f"{folder}/{name}")
    return buffer.getvalue()


@pytest.fixture
def zenodo(loopback):
    for csv in FIXTURES.glob("*.csv"):
        loopback.add(f"/files/{csv.name}", csv.read_bytes(), "text/csv")
    loopback.add("/files/clotho_audio_development.7z", seven_zip("development", {
        "Robin singing in garden.wav": wav("456440__inspectorj__bird-whistling-robin-single-13"),
        "solo trumpet phrase.wav": wav("sorohanro_-_solo-trumpet-06"),
    }), "application/x-7z-compressed")
    loopback.add("/files/clotho_audio_validation.7z", seven_zip("validation", {
        "dog howls asleep.wav": wav("pibble")}), "application/x-7z-compressed")
    loopback.add("/files/clotho_audio_evaluation.7z", seven_zip("evaluation", {
        "man reading aloud.wav": wav("198-209-0000")}), "application/x-7z-compressed")
    return loopback


def test_listing_keeps_five_captions_and_the_own_splits(zenodo, tmp_path):
    source = Clotho(SourceConfig(input=zenodo.url + "/files", state_dir=tmp_path))
    items = {item.source_id: item for item in source.list_items()}
    assert len(items) == 5
    robin = items["Robin singing in garden.wav"]
    assert len(robin.text) == 5 and robin.text[0] == "A small bird whistles a short bright song."
    assert robin.tag == ["bird", "robin", "song", "garden"]
    assert robin.split == "train" and robin.original_data["clotho_split"] == "development"
    assert robin.original_data["sound_id"] == "456440"
    assert robin.license == "http://creativecommons.org/licenses/by/3.0/"
    assert items["dog howls asleep.wav"].split == "valid"
    assert items["man reading aloud.wav"].split == "test"


def test_archive_is_downloaded_once_for_all_items(zenodo, tmp_path):
    source = Clotho(SourceConfig(input=zenodo.url + "/files", state_dir=tmp_path,
                                 options={"splits": "development"}))
    items = [i for i in source.list_items() if i.source_id != "lost recording.wav"]
    for item in items:
        assert soundfile.info(io.BytesIO(source.fetch(item))).samplerate == 22050
    assert len(zenodo.requests_to("/files/clotho_audio_development.7z")) == 1
    with pytest.raises(ItemError) as error:
        source.fetch(Item(source_id="x", locator="development/lost recording.wav", text=["x"]))
    assert error.value.reason == "missing_member"


def test_local_folder_with_extracted_audio(tmp_path):
    root = tmp_path / "clotho"
    (root / "evaluation").mkdir(parents=True)
    (root / "clotho_captions_evaluation.csv").write_bytes((FIXTURES / "clotho_captions_evaluation.csv").read_bytes())
    (root / "evaluation" / "man reading aloud.wav").write_bytes(wav("198-209-0000", 2.0))
    source = Clotho(SourceConfig(input=str(root), state_dir=tmp_path / "state", options={"splits": "evaluation"}))
    source.check()
    [item] = list(source.list_items())
    assert item.tag == [] and len(item.text) == 5  # no metadata file: captions still make the item
    assert soundfile.info(io.BytesIO(source.fetch(item))).duration == pytest.approx(2.0)


@pytest.mark.usefixtures("ray_local")
def test_clotho_builds_with_faults_and_exact_counts(zenodo, tmp_path):
    # The development archive is cut short once (a retry fixes it); validation's URL serves an HTML page.
    zenodo.fault("/files/clotho_audio_development.7z", "truncate", times=1)
    zenodo.fault("/files/clotho_audio_validation.7z", "html", times=None)
    out = tmp_path / "out"
    rows = run_build("clotho", out, input=zenodo.url + "/files",
                     options={"http_retries": "2", "http_backoff_base": "0.01", "http_backoff_cap": "0.02"})
    assert status_counts(rows) == {"ok": 3, "failed": 2}
    assert rows["lost recording.wav"]["error"] == "missing_member"
    assert rows["dog howls asleep.wav"]["error"] == "not_archive_content"
    assert {rows[k]["split"] for k in ("Robin singing in garden.wav", "man reading aloud.wav")} == {"train", "test"}
    built = samples(out)
    assert len(built["solo trumpet phrase.wav"]["text"]) == 5
    assert built["Robin singing in garden.wav"]["original_data"]["clotho_split"] == "development"
