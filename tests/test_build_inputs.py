"""`audiodata build --source local` on the inputs and mistakes users really make: one line, exit 2,
nothing written outside --out, no output folder pinned by a mistaken command, counts that add up."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig, plan_segments
from audio_dataset.build import CONFIG_FILE, WORK_DIR, BuildOptions, build, process_item
from audio_dataset.cli import main
from audio_dataset.source import Item, ItemError, SourceConfig, UserError
from conftest import REAL_AUDIO_DIR
from pipelines.local import LocalSource

ROBIN = "456440__inspectorj__bird-whistling-robin-single-13.ogg"


def _options(out: Path, input_path: Path | str, **kwargs) -> BuildOptions:
    return BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(input_path)),
                        progress=False, workers=1, **kwargs)


def _one_error_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def robin_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "robin"
    folder.mkdir()
    shutil.copy(REAL_AUDIO_DIR / ROBIN, folder / ROBIN)
    return folder


def _table(tmp_path: Path, name: str, text: str) -> Path:
    shutil.copy(REAL_AUDIO_DIR / ROBIN, tmp_path / ROBIN)
    (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / name


def test_a_split_from_the_table_cannot_write_outside_out(tmp_path: Path) -> None:
    table = _table(tmp_path, "items.csv", f"path,caption,split\n{ROBIN},a robin,../../escaped\n")
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(UserError, match="not a plain name"):
        build(_options(out, table))
    assert not list(tmp_path.rglob("escaped"))
    assert not (out / WORK_DIR / CONFIG_FILE).exists()


@pytest.mark.parametrize("ratios", ["a/b=1", "_work=1", "train=0.5,../x=0.5"])
def test_split_names_on_the_command_line_are_plain_names(tmp_path: Path, robin_folder: Path,
                                                         capsys: pytest.CaptureFixture[str], ratios: str) -> None:
    err = _one_error_line(capsys, ["build", "--source", "local", "--input", str(robin_folder),
                                   "--out", str(tmp_path / "out"), "--splits", ratios])
    assert "not a plain name" in err


def test_split_ratios_must_be_finite(tmp_path: Path, robin_folder: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--source", "local", "--input", str(robin_folder), "--out", str(tmp_path / "o"),
              "--splits", "train=nan"])
    assert exit_.value.code == 2


def test_out_that_is_a_file_or_cannot_be_made_is_one_line(tmp_path: Path, robin_folder: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a-file").write_text("x")
    base = ["build", "--source", "local", "--input", str(robin_folder), "--out"]
    assert "is a file" in _one_error_line(capsys, [*base, str(tmp_path / "a-file")])
    assert "cannot create --out" in _one_error_line(capsys, [*base, str(tmp_path / "a-file" / "sub")])


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.csv", "", "cannot read"),
        ("bad.csv", 'path,caption\nx.ogg,"never closed\n', "cannot read"),
        ("nocaption.csv", f"path,description\n{ROBIN},a robin\n", "no 'caption' or 'text' column"),
        ("header-only.csv", "path,caption\n", "no rows"),
    ],
)
def test_table_mistakes_are_one_line_and_pin_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     name: str, text: str, message: str) -> None:
    table = _table(tmp_path, name, text)
    out = tmp_path / "out"
    err = _one_error_line(capsys, ["build", "--source", "local", "--input", str(table), "--out", str(out),
                                   "--no-progress"])
    assert message in err
    # The corrected command (another --input) must not be refused as "other options".
    assert not (out / WORK_DIR / CONFIG_FILE).exists()


def test_an_empty_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # (A bad sidecar fails only its own item: tests/test_bad_inputs.py.)
    base = ["build", "--source", "local", "--out", str(tmp_path / "out"), "--input"]
    (tmp_path / "nothing").mkdir()
    assert "no audio files" in _one_error_line(capsys, [*base, str(tmp_path / "nothing")])


def test_segments_shorter_than_min_seconds_are_refused(tmp_path: Path, robin_folder: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    base = ["build", "--source", "local", "--input", str(robin_folder), "--out", str(tmp_path / "out")]
    assert "--segment-seconds 0.3 is below --min-seconds 0.5" in _one_error_line(
        capsys, [*base, "--segment-seconds", "0.3"])
    assert "--max-seconds 0.2 is below" in _one_error_line(
        capsys, [*base, "--max-seconds", "0.2", "--long-clips", "truncate"])
    # And the core never writes an `ok` row without a sample, whatever the config says.
    with pytest.raises(ItemError, match="too_short"):
        plan_segments(3.0, AudioConfig(long_clips="segment", segment_seconds=0.3, min_seconds=0.5))


def test_sample_rate_beyond_flac_is_a_usage_error(tmp_path: Path, robin_folder: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--source", "local", "--input", str(robin_folder), "--out", str(tmp_path / "o"),
              "--sample-rate", "700000"])
    assert exit_.value.code == 2 and "655350" in capsys.readouterr().err


def test_sources_with_a_missing_dataset_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "nope does not exist" in _one_error_line(capsys, ["sources", str(tmp_path / "nope")])


def test_table_rows_of_one_clip_are_one_item_with_every_caption(tmp_path: Path) -> None:
    table = _table(tmp_path, "captions.csv",
                   f"path,caption,tags\n{ROBIN},a robin sings,bird\n{ROBIN},a bird chirps,bird;robin\n"
                   f"{ROBIN},a robin sings,\n")
    items = list(LocalSource(SourceConfig(input=str(table))).list_items())
    assert [(i.source_id, i.text, i.tag) for i in items] == [
        (ROBIN, ["a robin sings", "a bird chirps"], ["bird", "robin"])]


def test_dropped_clips_count_in_hours_in(tmp_path: Path) -> None:
    data = (REAL_AUDIO_DIR / ROBIN).read_bytes()
    item = Item(source_id=ROBIN, locator=ROBIN, text=["a robin"])
    row, samples = process_item("local", item, data, "train", "train/000000.tar", AudioConfig(max_seconds=1.0))
    assert (row.status, row.error, samples) == ("dropped", "too_long", [])
    assert row.source_duration == pytest.approx(2.7, abs=0.05)
    assert (row.source_sample_rate, row.source_codec) == (22_050, "vorbis")


@pytest.mark.usefixtures("ray_local")
def test_resume_is_keyed_on_the_input_not_how_it_was_typed(tmp_path: Path, robin_folder: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    build(_options(out, "robin"))
    summary = build(_options(out, robin_folder.resolve()))  # the same folder, spelled absolute
    assert summary.shards_skipped == summary.shards_total == 1


@pytest.mark.usefixtures("ray_local")
def test_rerun_with_other_exclusions_is_refused(tmp_path: Path, robin_folder: Path) -> None:
    shutil.copy(REAL_AUDIO_DIR / "pibble.ogg", robin_folder / "pibble.ogg")
    soundfile.write(robin_folder / "tone.wav", 0.1 * np.sin(np.arange(48_000) / 10).astype(np.float32), 48_000)
    out = tmp_path / "out"
    build(_options(out, robin_folder, samples_per_shard=1, split_ratios={"train": 1.0}))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("pibble.ogg\n")
    # Excluding an item re-plans every shard after it: resuming would mix two plans.
    with pytest.raises(UserError, match=r"other options \(exclusions was none, now \"1 ids, sha256 [0-9a-f]{16}\"\)"):
        build(_options(out, robin_folder, samples_per_shard=1, split_ratios={"train": 1.0},
                       exclude_files=[exclude]))
    fresh = tmp_path / "fresh"
    build(_options(fresh, robin_folder, samples_per_shard=1, split_ratios={"train": 1.0}, exclude_files=[exclude]))
    build(_options(fresh, robin_folder, samples_per_shard=1, split_ratios={"train": 1.0}, exclude_files=[exclude]))
    rows = manifest.read_table(fresh / manifest.MANIFEST_FILE).to_pylist()
    assert sorted((r["source_id"], r["status"]) for r in rows) == [
        (ROBIN, "ok"), ("pibble.ogg", "excluded"), ("tone.wav", "ok")]
    stats = json.loads((fresh / "stats.json").read_text())
    assert stats["by_status"] == {"ok": 2, "dropped": 0, "failed": 0, "excluded": 1}


def test_parquet_table_with_lists_and_missing_values(tmp_path: Path) -> None:
    shutil.copy(REAL_AUDIO_DIR / ROBIN, tmp_path / ROBIN)
    shutil.copy(REAL_AUDIO_DIR / "pibble.ogg", tmp_path / "pibble.ogg")
    pd.DataFrame({"path": [ROBIN, "pibble.ogg"], "text": [["a robin", "a bird"], None],
                  "split": ["valid", None], "license": ["CC0", None], "labels": [["bird"], None],
                  "score": [0.5, np.nan]}).to_parquet(tmp_path / "items.parquet")
    items = list(LocalSource(SourceConfig(input=str(tmp_path / "items.parquet"))).list_items())
    robin, pibble = items
    assert (robin.split, robin.license, robin.text, robin.original_data) == (
        "valid", "CC0", ["a robin", "a bird"], {"labels": ["bird"], "score": 0.5})
    # A missing cell is empty, never the text "nan" (which would be a split folder named nan).
    assert (pibble.split, pibble.license, pibble.text) == (None, "", ["pibble"])
    assert json.loads(pibble.to_json())["original_data"] == {"labels": None, "score": None}


@pytest.mark.parametrize("argv, message", [
    (["buidl"], "invalid choice: 'buidl'"),
    (["build", "--source", "local", "--input", "x"], "required: --out"),
    (["build", "--source", "local", "--input", "x", "--out", "o", "--long-clips", "nope"], "invalid choice: 'nope'"),
    (["k2c", "x", "--out", "o", "--dtype", "float16"], "invalid choice: 'float16'"),
])
def test_argument_mistakes_are_one_line_not_the_usage_text(capsys: pytest.CaptureFixture[str], argv: list[str],
                                                           message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("audiodata"), err


def test_the_same_ratios_in_another_order_are_other_options(tmp_path: Path, robin_folder: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The order of --splits decides which hash range goes to which split: a reordered rerun would mix."""
    out = tmp_path / "out"
    argv = ["build", "--source", "local", "--input", str(robin_folder), "--out", str(out), "--no-progress"]
    assert main([*argv, "--splits", "train=0.5,valid=0.5"]) == 0
    assert main([*argv, "--splits", "train=0.5,valid=0.5"]) == 0  # the same command resumes
    err = _one_error_line(capsys, [*argv, "--splits", "valid=0.5,train=0.5"])
    assert ('other options (split_ratios was [["train", 0.5], ["valid", 0.5]], '
            'now [["valid", 0.5], ["train", 0.5]])') in err


def test_an_unexpected_error_on_one_item_fails_that_item_not_the_build(tmp_path: Path, monkeypatch) -> None:
    """Every input ends in one outcome: an exception no check names is that item's `unexpected_error`."""
    import audio_dataset.build as build_module
    from audio_dataset.build import UNEXPECTED_ERROR, ShardTask, run_shard
    from audio_dataset.storage import location

    folder = tmp_path / "in"
    folder.mkdir()
    for name in sorted(p.name for p in REAL_AUDIO_DIR.glob("*.ogg"))[:3]:
        shutil.copy(REAL_AUDIO_DIR / name, folder / name)
    source = LocalSource(SourceConfig(input=str(folder)))
    items = list(source.list_items())
    real = build_module.encode
    calls = []

    def flaky(found, config):
        calls.append(1)
        if len(calls) == 2:
            raise IndexError("a decoder corner case")
        return real(found, config)

    monkeypatch.setattr(build_module, "encode", flaky)
    out = location(str(tmp_path / "out"))
    result = run_shard(ShardTask("train", 0, items), source, out, AudioConfig())
    assert result["items"] == 3 and result["ok"] == 2
    rows = manifest.read_parquet(out / WORK_DIR / "parts" / "train-000000.parquet").to_pylist()
    failed = [r for r in rows if r["status"] != manifest.STATUS_OK]
    assert len(failed) == 1 and failed[0]["error"] == UNEXPECTED_ERROR
    assert failed[0]["error_detail"] == "IndexError: a decoder corner case"


def test_a_plot_or_page_path_that_cannot_be_written_is_one_line(tmp_path: Path, robin_folder: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["build", "--source", "local", "--input", str(robin_folder), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    err = _one_error_line(capsys, ["stats", str(out), "--out", str(blocker / "stats.png")])
    assert str(blocker) in err
