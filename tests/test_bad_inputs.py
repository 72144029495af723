"""A bad-input corpus made from the real clips: every case of issue 11 with its expected manifest outcome.

Overs are attenuated (or counted with --clipping clip), NaN audio is `non_finite`, surround keeps its
centre, a cancelling downmix is flagged, links are followed (each real file once, loops detected,
dangling ones a row), a bad sidecar fails only its item, and a worker that dies fails only its item.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.audio import FULL_SCALE, AudioConfig, decode, resample
from audio_dataset.build import WORK_DIR, WORKER_DIED, ShardTask, process_item, run_shard
from audio_dataset.cli import main
from audio_dataset.schema import MAX_CAPTION_CHARS
from audio_dataset.shards import iter_shard, shard_paths
from audio_dataset.source import Item, SourceConfig
from audio_dataset.storage import location
from conftest import REAL_AUDIO_DIR, ffmpeg_convert
from pipelines.local import LocalSource

ROBIN = REAL_AUDIO_DIR / "456440__inspectorj__bird-whistling-robin-single-13.ogg"
WHALE = REAL_AUDIO_DIR / "glacier-bay-humpback.ogg"
LONG_CAPTION = "a robin whistles " * 200

# source id -> (status, error) every input must end in; ids absent here must have no row.
EXPECTED = {
    "overs.wav": ("ok", None),
    "fullscale-16k.wav": ("ok", None),
    "nan.wav": ("failed", "non_finite"),
    "inf.wav": ("failed", "non_finite"),
    "surround.wav": ("ok", None),
    "inverted.wav": ("ok", None),
    "real.ogg": ("ok", None),
    "linked/whale.ogg": ("ok", None),
    "dangling.ogg": ("failed", "broken_link"),
    "loop-a.ogg": ("failed", "link_loop"),
    "loop-b.ogg": ("failed", "link_loop"),
    "malformed.ogg": ("failed", "bad_sidecar"),
    "latin1.ogg": ("failed", "bad_sidecar"),
    "not-object.ogg": ("failed", "bad_sidecar"),
    "deep.ogg": ("failed", "bad_sidecar"),
    "typed.ogg": ("ok", None),
    "blank.ogg": ("ok", None),
}


def _robin() -> tuple[np.ndarray, int]:
    decoded = decode(ROBIN.read_bytes())
    return decoded.samples[0], decoded.sample_rate


def _write_float_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    soundfile.write(path, samples.astype(np.float32), rate, subtype="FLOAT")


def _sidecar(folder: Path, name: str, payload: str | bytes, suffix: str = ".json") -> None:
    shutil.copy(ROBIN, folder / name)
    target = (folder / name).with_suffix(suffix)
    target.write_bytes(payload if isinstance(payload, bytes) else payload.encode("utf-8"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus") / "in"
    folder.mkdir()
    robin, rate = _robin()
    louder = resample(robin[None, :], rate, 48_000)[0]
    _write_float_wav(folder / "overs.wav", louder * (4.0 / np.abs(louder).max()), 48_000)
    # Normalised to full scale at 16 kHz (as ESC-50's clips are): it overshoots once resampled to 48 kHz.
    low = resample(robin[None, :], rate, 16_000)[0]
    soundfile.write(folder / "fullscale-16k.wav", low * (FULL_SCALE / np.abs(low).max()), 16_000, subtype="PCM_16")
    broken = robin.copy()
    broken[1000] = np.nan
    _write_float_wav(folder / "nan.wav", broken, rate)
    broken[1000] = np.inf
    _write_float_wav(folder / "inf.wav", broken, rate)
    # 5.1 with the robin only in the centre (where films keep dialogue), and phase-inverted stereo.
    ffmpeg_convert(ROBIN, folder / "surround.wav", "-af", "pan=5.1|FC=c0")
    ffmpeg_convert(ROBIN, folder / "inverted.wav", "-af", "pan=stereo|c0=c0|c1=-1*c0")
    # Links: a linked folder, a dangling link, a loop of links, a second link to one file, a folder loop.
    shutil.copy(ROBIN, folder / "real.ogg")
    elsewhere = folder.parent / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(WHALE, elsewhere / "whale.ogg")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "dangling.ogg").symlink_to(folder.parent / "gone.ogg")
    (folder / "loop-a.ogg").symlink_to(folder / "loop-b.ogg")
    (folder / "loop-b.ogg").symlink_to(folder / "loop-a.ogg")
    (folder / "same-again.ogg").symlink_to(folder / "real.ogg")
    (folder / "linked-too").symlink_to(elsewhere, target_is_directory=True)  # the same folder twice
    (elsewhere / "back").symlink_to(folder, target_is_directory=True)  # a loop through the tree
    # Sidecars.
    _sidecar(folder, "malformed.ogg", '{"text": ["a robin"')
    _sidecar(folder, "latin1.ogg", "caf\xe9".encode("latin-1"), ".txt")
    _sidecar(folder, "not-object.ogg", '["a caption list, not an object"]')
    _sidecar(folder, "deep.ogg", '{"text": "deep", "x": ' + "[" * 3000 + "]" * 3000 + "}")
    _sidecar(folder, "typed.ogg", json.dumps({"text": ["", "  ", "a robin", LONG_CAPTION],
                                              "author": ["a", "b"], "license": {"name": "CC0"}}))
    _sidecar(folder, "blank.ogg", json.dumps({"text": ["  ", ""]}))
    return folder


@pytest.fixture(scope="module")
def built(corpus: Path, tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("corpus-out") / "out"
    assert main(["build", "--source", "local", "--input", str(corpus), "--out", str(out), "--workers", "1",
                 "--splits", "train=1", "--no-progress"]) == 0
    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    return out, {row["source_id"]: row for row in rows}


def _samples(out: Path) -> dict[str, dict]:
    found = {}
    for path in shard_paths(out / "train"):
        for sample in iter_shard(path):
            meta = json.loads(sample["json"])
            found[meta["source_id"]] = {"meta": meta, "audio": soundfile.read(io.BytesIO(sample["flac"]))[0]}
    return found


def test_every_input_ends_in_its_expected_outcome(built: tuple[Path, dict[str, dict]]) -> None:
    _, rows = built
    assert {sid: (row["status"], row["error"]) for sid, row in rows.items()} == EXPECTED
    # One row per real file: the second link to real.ogg and the folder reached twice add none.
    assert not any(sid.startswith(("linked-too/", "linked/back/")) or sid == "same-again.ogg" for sid in rows)


def test_overs_are_attenuated_just_enough(built: tuple[Path, dict[str, dict]], corpus: Path) -> None:
    out, rows = built
    samples = _samples(out)
    row = rows["overs.wav"]
    assert row["gain_db"] == pytest.approx(20 * np.log10(FULL_SCALE / 4.0), abs=1e-3)
    assert row["clipped_samples"] == 0 and samples["overs.wav"]["meta"]["gain_db"] == row["gain_db"]
    audio = samples["overs.wav"]["audio"]
    source = soundfile.read(corpus / "overs.wav")[0]
    np.testing.assert_allclose(audio, source * 10 ** (row["gain_db"] / 20), atol=2 / 32768)
    # Full scale at 16 kHz overshoots once resampled: attenuated a little, never clipped.
    resampled = rows["fullscale-16k.wav"]
    assert -1.0 < resampled["gain_db"] < -0.1
    assert np.abs(samples["fullscale-16k.wav"]["audio"]).max() > 0.99


def _one_item_shard(corpus: Path, out: Path, source_id: str, config: AudioConfig) -> tuple[dict, np.ndarray]:
    source = LocalSource(SourceConfig(input=str(corpus)))
    items = [item for item in source.list_items() if item.source_id == source_id]
    run_shard(ShardTask("train", 0, items), source, location(str(out)), config)
    row = manifest.read_parquet(location(str(out)) / WORK_DIR / "parts" / "train-000000.parquet").to_pylist()[0]
    audio = [soundfile.read(io.BytesIO(s["flac"]))[0] for s in iter_shard(out / "train" / "000000.tar")]
    return row, audio[0]


def test_clip_policy_keeps_laions_clipping_and_counts_it(corpus: Path, tmp_path: Path,
                                                         built: tuple[Path, dict[str, dict]]) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(corpus / "overs.wav", folder / "overs.wav")
    out = tmp_path / "out"
    assert main(["build", "--source", "local", "--input", str(folder), "--out", str(out), "--workers", "1",
                 "--splits", "train=1", "--clipping", "clip", "--no-progress"]) == 0
    row = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()[0]
    original = soundfile.read(corpus / "overs.wav")[0]
    assert row["clipped_samples"] == np.count_nonzero((original > FULL_SCALE) | (original < -1.0)) > 1000
    assert row["gain_db"] == 0.0
    audio = _samples(out)["overs.wav"]["audio"]
    np.testing.assert_allclose(audio, np.clip(original, -1.0, FULL_SCALE), atol=1 / 32768)


def test_surround_keeps_its_centre_and_a_cancelling_downmix_is_flagged(built: tuple[Path, dict[str, dict]]) -> None:
    out, rows = built
    samples = _samples(out)
    robin = resample(_robin()[0][None, :], _robin()[1], 48_000)[0]
    centre = samples["surround.wav"]["audio"]
    assert rows["surround.wav"]["downmix"] == "5.1 -> mono"
    # BS.775: the centre goes in at -3 dB on each side; mono is their mean.
    level = np.dot(centre, robin[: len(centre)]) / np.dot(robin, robin)
    assert level == pytest.approx(np.sqrt(0.5), abs=0.01)
    assert not rows["surround.wav"]["downmix_cancels"]
    inverted = rows["inverted.wav"]
    assert inverted["downmix_cancels"] and inverted["downmix_db"] < -60
    assert samples["inverted.wav"]["meta"]["downmix_cancels"] is True
    assert rows["real.ogg"]["downmix"] is None and rows["real.ogg"]["downmix_cancels"] is False


def test_surround_to_stereo_keeps_the_centre_on_both_sides(corpus: Path, tmp_path: Path) -> None:
    row, audio = _one_item_shard(corpus, tmp_path / "out", "surround.wav", AudioConfig(channels=2))
    robin = resample(_robin()[0][None, :], _robin()[1], 48_000)[0][: len(audio)]
    assert row["downmix"] == "5.1 -> stereo" and audio.shape[1] == 2
    for side in audio.T:  # the old code kept FL and FR only: silence here
        assert np.dot(side, robin) / np.dot(robin, robin) == pytest.approx(np.sqrt(0.5), abs=0.01)


def test_links_and_sidecars_get_named_reasons(built: tuple[Path, dict[str, dict]]) -> None:
    _, rows = built
    assert "gone.ogg" in rows["dangling.ogg"]["error_detail"]
    assert "Expecting" in rows["malformed.ogg"]["error_detail"]  # the parser's own message
    assert "not UTF-8" in rows["latin1.ogg"]["error_detail"]
    assert "want an object" in rows["not-object.ogg"]["error_detail"]
    assert "nested" in rows["deep.ogg"]["error_detail"]


def test_sidecar_fields_of_the_wrong_type_become_json_text(built: tuple[Path, dict[str, dict]]) -> None:
    out, rows = built
    meta = _samples(out)["typed.ogg"]["meta"]
    assert meta["author"] == '["a", "b"]' and meta["license"] == '{"name": "CC0"}'
    assert meta["text"] == ["a robin", LONG_CAPTION[:MAX_CAPTION_CHARS].rstrip()]
    assert meta["captions_truncated"] == 1 and rows["typed.ogg"]["captions_truncated"] == 1
    assert _samples(out)["blank.ogg"]["meta"]["text"] == ["blank"]  # only blanks: the file name, as with none


def test_an_item_whose_captions_are_all_blank_fails_by_name() -> None:
    item = Item(source_id="x", locator="x", text=["", "   "])
    row, samples = process_item("web", item, ROBIN.read_bytes(), "train", "train/000000.tar", AudioConfig())
    assert (row.status, row.error, samples) == ("failed", "no_caption", [])


def test_out_equal_to_input_is_refused(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", "--source", "local", "--input", str(corpus), "--out", str(corpus) + "/"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is the --input folder" in err and len(err.splitlines()) == 1
    assert not (corpus / WORK_DIR).exists()


class _KillingSource(LocalSource):
    """A local folder whose item `killer.ogg` kills the worker process that fetches it."""

    def fetch(self, item):
        if item.source_id == "killer.ogg":
            os._exit(1)
        return super().fetch(item)


def test_a_worker_that_dies_fails_only_its_item(tmp_path: Path, ray_local: None) -> None:
    import ray.cloudpickle

    from audio_dataset.build import BuildOptions, _run_tasks

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.ogg", "killer.ogg", "b.ogg", "c.ogg"):
        shutil.copy(ROBIN, folder / name)
    source = _KillingSource(SourceConfig(input=str(folder)))
    items = {item.source_id: item for item in source.list_items()}
    # The killer's shard first, one worker: the shards after it must still run.
    tasks = [ShardTask("train", 0, [items["a.ogg"], items["killer.ogg"]]),
             ShardTask("train", 1, [items["b.ogg"]]), ShardTask("train", 2, [items["c.ogg"]])]
    out = location(str(tmp_path / "out"))
    options = BuildOptions(source="local", out=out, progress=False, workers=1)
    results = list(_run_tasks(tasks, source, out, options, workers=1))
    assert [r["shard"] for r in results] == ["train/000001.tar", "train/000002.tar", "train/000000.tar"]
    rows = manifest.concat([out / WORK_DIR / "parts" / t.part_name for t in tasks]).to_pylist()
    outcome = {row["source_id"]: row["error"] for row in rows}
    assert outcome == {"a.ogg": None, "b.ogg": None, "c.ogg": None, "killer.ogg": WORKER_DIED}
    written = [s["__key__"] for task in tasks for s in iter_shard(out / task.name)]
    assert len(written) == 3


def test_an_item_failing_mid_write_is_redone_alone_and_fails_alone(corpus: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Encoding runs as the shard is written: a failure there cannot become the item's row in a
    shard already holding its first samples, so the shard is redone one item per task."""
    import audio_dataset.audio as audio_module
    from audio_dataset.build import UNEXPECTED_ERROR, EncodeFailed, _item_worker

    def failing(*args):
        raise IndexError("an encoder corner case")
        yield  # a generator, like the real one

    source = LocalSource(SourceConfig(input=str(corpus)))
    item = next(item for item in source.list_items() if item.source_id == "real.ogg")
    monkeypatch.setattr(audio_module, "_segment_files", failing)
    out = location(str(tmp_path / "out"))
    with pytest.raises(EncodeFailed, match="real.ogg: IndexError: an encoder corner case"):
        run_shard(ShardTask("train", 0, [item]), source, out, AudioConfig())
    assert not (out / "train" / "000000.tar").exists() and not (out / WORK_DIR / "parts").exists()
    alone = _item_worker(item.to_json(), "train", "train/000000.tar", source, AudioConfig())
    assert (alone["row"]["error"], alone["samples"]) == (UNEXPECTED_ERROR, [])
    assert alone["row"]["error_detail"] == "IndexError: an encoder corner case"
