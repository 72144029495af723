"""`--source wavcaps`: the released JSON layout, FLAC zips, download links and blacklists."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.build import BuildOptions, build
from audio_dataset.shards import iter_shard, shard_paths
from audio_dataset.source import ItemError, SourceConfig, SourceError, UserError, load_source
from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR
from loopback import Response

FIXTURE = Path(__file__).parent / "fixtures" / "wavcaps"
# Which real clip each fixture entry's audio is made from (its caption describes that clip).
CLIPS = {
    ("FreeSound", "456440"): "456440__inspectorj__bird-whistling-robin-single-13",
    ("FreeSound", "147793"): "147793__setuniman__sweet-waltz-0i-22mi",
    ("BBC_Sound_Effects", "07066104"): "sorohanro_-_solo-trumpet-06",
    ("SoundBible", "2219"): "198-209-0000",
    ("SoundBible", "2218"): "3436-172162-0000",
    ("AudioSet_SL", "Yb0RFKhbpFJA.wav"): "5703-47212-0000",
    ("AudioSet_SL", "YvfY_TJq7n_U.wav"): "pibble",
}
EXCLUDED = {"FreeSound/147793": "blacklist_exclude_ub8k_esc50_vggsound.json",
            "AudioSet_SL/YvfY_TJq7n_U.wav": "blacklist_exclude_test_ac.json"}
SECONDS = 2.5


def _flac(stem: str, rate: int = 32_000) -> bytes:
    """The first seconds of a real clip as WavCaps stores it: FLAC, 32 kHz mono."""
    audio, source_rate = soundfile.read(REAL_AUDIO_DIR / f"{stem}.ogg", dtype="float32", always_2d=True)
    mono = audio[: int(SECONDS * source_rate)].mean(axis=1)
    resampled = np.interp(np.arange(int(SECONDS * rate)) / rate, np.arange(len(mono)) / source_rate, mono)
    buffer = io.BytesIO()
    soundfile.write(buffer, resampled.astype(np.float32), rate, format="FLAC")
    return buffer.getvalue()


def _member(subset: str, clip_id: str) -> str:
    name = clip_id[:-4] if clip_id.endswith(".wav") else clip_id
    return f"mnt/scratch/WavCaps/waveforms/{subset}_flac/{name}.flac"  # nested, as the released zips are


@pytest.fixture(scope="module")
def wavcaps_copy(tmp_path_factory) -> Path:
    """The fixture's JSON plus Zip_files/<Subset>/<Subset>.zip holding its clips."""
    root = tmp_path_factory.mktemp("wavcaps")
    shutil.copytree(FIXTURE / "json_files", root / "json_files")
    for subset in ("FreeSound", "BBC_Sound_Effects", "SoundBible", "AudioSet_SL"):
        (root / "Zip_files" / subset).mkdir(parents=True)
        with zipfile.ZipFile(root / "Zip_files" / subset / f"{subset}.zip", "w") as archive:
            for (clip_subset, clip_id), stem in CLIPS.items():
                if clip_subset == subset:
                    archive.writestr(_member(subset, clip_id), _flac(stem))
    return root


def _source(root: str | Path, tmp_path: Path, **options: str):
    return load_source("wavcaps", SourceConfig(input=str(root), options=options, state_dir=tmp_path / "state"))


def test_lists_every_subset_with_captions_descriptions_and_blacklists(wavcaps_copy, tmp_path):
    source = _source(wavcaps_copy, tmp_path)
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert set(items) == {f"{subset}/{clip_id}" for subset, clip_id in CLIPS}
    robin = items["FreeSound/456440"]
    assert robin.text == ["A bird is whistling a short melody."]
    assert robin.original_data["description"].startswith("A single robin whistling")
    assert robin.tag == ["bird", "robin", "whistle", "nature"] and robin.author == "InspectorJ"
    assert robin.url == "https://freesound.org/people/InspectorJ/sounds/456440/"
    assert "audio" not in robin.original_data and robin.original_data["file_name"].endswith(".wav")
    assert items["BBC_Sound_Effects/07066104"].tag == ["Music", "Brass"]
    assert items["SoundBible/2219"].url == "https://soundbible.com/2219-Man-Reading.html"
    assert items["AudioSet_SL/Yb0RFKhbpFJA.wav"].url == "https://www.youtube.com/watch?v=b0RFKhbpFJA"
    for source_id, blacklist in EXCLUDED.items():
        with pytest.raises(ItemError) as caught:
            source.fetch(items[source_id])
        assert caught.value.reason == "excluded" and blacklist in caught.value.detail
    # Audio is the zip member, byte for byte.
    assert source.fetch(items["AudioSet_SL/Yb0RFKhbpFJA.wav"]) == _flac("5703-47212-0000")
    only = _source(wavcaps_copy, tmp_path, subsets="SoundBible", blacklist="none")
    assert [i.source_id for i in only.list_items()] == ["SoundBible/2219", "SoundBible/2218"]


@pytest.mark.usefixtures("ray_local")
def test_build_keeps_caption_and_description_and_excludes_blacklisted(wavcaps_copy, tmp_path):
    out = tmp_path / "out"
    build(BuildOptions(source="wavcaps", out=out, source_config=SourceConfig(input=str(wavcaps_copy)),
                       samples_per_shard=4, workers=1, progress=False))
    rows = {r["source_id"]: r for r in manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()}
    assert {k: r["status"] for k, r in rows.items() if r["status"] != "ok"} == {k: "excluded" for k in EXCLUDED}
    assert all(EXCLUDED[k] in rows[k]["error_detail"] for k in EXCLUDED)
    samples = [json.loads(s["json"]) for split in ("train", "valid", "test")
               for path in shard_paths(out / split) for s in iter_shard(path)]
    assert len(samples) == len(CLIPS) - len(EXCLUDED)
    whistle = next(s for s in samples if s["source_id"] == "FreeSound/456440")
    assert whistle["text"] == ["A bird is whistling a short melody."]
    assert whistle["original_data"]["description"].startswith("A single robin")
    assert all(abs(s["duration"] - SECONDS) < 0.01 and s["sample_rate"] == 48_000 for s in samples)
    assert verify(out).ok


def test_reads_a_remote_copy_and_download_links(wavcaps_copy, tmp_path, loopback):
    for path in wavcaps_copy.rglob("*"):
        if path.is_file():
            loopback.add(f"/wc/{path.relative_to(wavcaps_copy).as_posix()}", path.read_bytes(),
                         "application/zip" if path.suffix == ".zip" else "application/json")
    source = _source(f"{loopback.url}/wc", tmp_path, subsets="SoundBible,AudioSet_SL")
    items = {i.source_id: i for i in source.list_items()}
    assert source.fetch(items["SoundBible/2218"]) == _flac("3436-172162-0000")  # zip downloaded once
    source.fetch(items["SoundBible/2219"])
    assert len(loopback.requests_to("/wc/Zip_files/SoundBible/SoundBible.zip")) == 1
    assert items["AudioSet_SL/YvfY_TJq7n_U.wav"].original_data["wavcaps_blacklist"] == "blacklist_exclude_test_ac.json"

    # audio=url: each entry's download_link (BBC zips its WAV; SoundBible's grab.php by id).
    wav = io.BytesIO()
    soundfile.write(wav, np.zeros(16_000, np.float32) + 0.1, 16_000, format="WAV")
    bbc_zip = io.BytesIO()
    with zipfile.ZipFile(bbc_zip, "w") as archive:
        archive.writestr("07066104.wav", wav.getvalue())
    loopback.add("/bbc/zip/07066104.wav.zip", bbc_zip.getvalue(), "application/zip")
    loopback.add_handler("/sb/grab.php", lambda request: Response(200, wav.getvalue(), "audio/wav")
                         if request.query.get("id") in ("2219", "2218") else Response(404))
    linked = tmp_path / "linked"
    shutil.copytree(wavcaps_copy / "json_files", linked / "json_files")
    for name, old, new in (("BBC_Sound_Effects/bbc_final.json", "https://sound-effects-media.bbcrewind.co.uk", "/bbc"),
                           ("SoundBible/sb_final.json", "http://soundbible.com", "/sb")):
        path = linked / "json_files" / name
        path.write_text(path.read_text().replace(old, loopback.url + new))
    by_url = _source(linked, tmp_path, audio="url", subsets="BBC_Sound_Effects,SoundBible,AudioSet_SL")
    items = {i.source_id: i for i in by_url.list_items()}
    assert by_url.fetch(items["BBC_Sound_Effects/07066104"]) == wav.getvalue()
    assert by_url.fetch(items["SoundBible/2219"]) == wav.getvalue()
    with pytest.raises(ItemError) as caught:
        by_url.fetch(items["AudioSet_SL/Yb0RFKhbpFJA.wav"])
    assert caught.value.reason == "no_download_link"


def test_a_split_zip_part_fails_the_source_with_how_to_merge(wavcaps_copy, tmp_path):
    """The hub's FreeSound.zip is the last part of a split archive: no zip reader opens it alone."""
    copy = tmp_path / "copy"
    shutil.copytree(wavcaps_copy / "json_files", copy / "json_files")
    (copy / "Zip_files" / "FreeSound").mkdir(parents=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(_member("FreeSound", "456440"), _flac(CLIPS[("FreeSound", "456440")]))
    data = bytearray(buffer.getvalue())
    entry = data.rindex(b"PK\x01\x02")  # the central directory entry: its member starts on disk 3 (.z03)
    data[entry + 34:entry + 36] = (3).to_bytes(2, "little")
    (copy / "Zip_files" / "FreeSound" / "FreeSound.zip").write_bytes(bytes(data))
    source = _source(copy, tmp_path, subsets="FreeSound")
    robin = next(i for i in source.list_items() if i.source_id == "FreeSound/456440")
    with pytest.raises(SourceError, match=r"last part of a split zip: merge the parts \(zip -FF FreeSound.zip"):
        source.fetch(robin)


def test_usage_mistakes(wavcaps_copy, tmp_path):
    with pytest.raises(UserError, match="unknown wavcaps option"):
        _source(wavcaps_copy, tmp_path, subset="FreeSound")
    with pytest.raises(UserError, match="unknown WavCaps subset"):
        _source(wavcaps_copy, tmp_path, subsets="Freesound").check()
    with pytest.raises(UserError, match="WavCaps FreeSound JSON not found"):
        list(_source(tmp_path, tmp_path, blacklist="none").list_items())
    with pytest.raises(UserError, match="blacklist nope.json not found"):
        list(_source(wavcaps_copy, tmp_path, blacklist="nope.json").list_items())


def test_reads_a_copy_behind_an_fsspec_url(wavcaps_copy, tmp_path):
    """s3://, hf:// and the like: JSON read through fsspec, the zip fetched once into the state folder."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in wavcaps_copy.rglob("*"):
        if path.is_file():
            memory.pipe(f"memory://wavcaps-copy/{path.relative_to(wavcaps_copy).as_posix()}", path.read_bytes())
    source = _source("memory://wavcaps-copy", tmp_path, subsets="SoundBible")
    items = [i for i in source.list_items()]
    assert [i.source_id for i in items] == ["SoundBible/2219", "SoundBible/2218"]
    assert source.fetch(items[0]) == _flac("198-209-0000")
    assert len(list((tmp_path / "state" / "archives").glob("*-SoundBible.zip"))) == 1
