"""GTZAN from marsyas' genres.tar.gz and from the Kaggle-style genres_original/ folder."""
from __future__ import annotations

import pytest
from benchmark_helpers import AUDIO, tar_gz_of, tone, write_tree
from web_source_helpers import run_build, samples, status_counts

from audio_dataset.source import ItemError, SourceConfig, UserError
from pipelines.gtzan import GTZAN

DAMAGED = b"RIFF\x24\x08\x00\x00WAVEfmt " + bytes(range(256)) * 4  # a header, then no audio that decodes


def marsyas_files() -> dict[str, bytes | str]:
    files: dict[str, bytes | str] = {"genres/input.mf": "genres/blues/blues.00000.au\tblues\n",
                                     "genres/bextract_single.mf": "x\n"}
    for number, (genre, index) in enumerate([("blues", 0), ("blues", 1), ("jazz", 53), ("hiphop", 7), ("rock", 99)]):
        files[f"genres/{genre}/{genre}.{index:05d}.au"] = tone(number, fmt="AU")
    files["genres/jazz/jazz.00054.au"] = DAMAGED
    return files


def test_kaggle_folder_lists_genres_from_the_folders(tmp_path):
    files = {f"Data/genres_original/{genre}/{genre}.0000{i}.wav": tone(i) for i, genre in
             enumerate(["blues", "classical", "disco"])}
    files["Data/genres_original/jazz/jazz.00054.wav"] = DAMAGED
    files["Data/images_original/blues/blues00000.png"] = b"\x89PNG"
    files["Data/features_30_sec.csv"] = "filename,label\n"
    source = GTZAN(SourceConfig(input=str(write_tree(tmp_path / "kaggle", files))))
    source.check()
    items = {item.source_id: item for item in source.list_items()}
    assert sorted(items) == ["blues.00000", "classical.00001", "disco.00002", "jazz.00054"]
    disco = items["disco.00002"]
    assert (disco.text, disco.tag, disco.split) == (["disco"], ["disco"], "test")
    assert disco.sample_fields == {"class_labels": ["disco"], "fold": None, "benchmark_split": "all"}
    assert source.fetch(disco)[:4] == b"RIFF"
    with pytest.raises(ItemError) as error:
        source.fetch(items["jazz.00054"])
    assert error.value.reason == "damaged_file" and "jazz.00054" in error.value.detail


def test_the_damaged_name_with_good_audio_builds(tmp_path):
    """A repaired copy of jazz.00054 is used: the name alone fails nothing."""
    source = GTZAN(SourceConfig(input=str(write_tree(tmp_path / "g", {"genres/jazz/jazz.00054.au": tone(3, fmt="AU")}))))
    [item] = source.list_items()
    assert source.fetch(item)[:4] == b".snd"


def test_a_folder_without_genres_is_refused(tmp_path):
    write_tree(tmp_path / "music", {"songs/a.wav": tone(1)})
    with pytest.raises(UserError, match="is it GTZAN"):
        list(GTZAN(SourceConfig(input=str(tmp_path / "music"))).list_items())


@pytest.mark.usefixtures("ray_local")
def test_genres_tar_gz_over_http_names_the_damaged_clip(loopback, tmp_path):
    url = loopback.add("/sound/genres.tar.gz", tar_gz_of(marsyas_files()), "application/gzip")
    out = tmp_path / "out"
    rows = run_build("gtzan", out, input=url, audio=AUDIO)
    assert status_counts(rows) == {"ok": 5, "failed": 1}
    assert rows["jazz.00054"]["error"] == "damaged_file"
    built = samples(out)
    assert sorted(built) == ["blues.00000", "blues.00001", "hiphop.00007", "jazz.00053", "rock.00099"]
    assert (built["hiphop.00007"]["class_labels"], built["hiphop.00007"]["benchmark_split"]) == (["hiphop"], "all")
    assert built["rock.00099"]["license_class"] == "unknown"
