"""Licences: one table maps every string our sources emit to (license_id, license_class); builds record
both in the manifest and the sample JSON; stats, report and sources count hours per class; `filter
--license-class` writes the publishable subset; `attribution` writes the credit lines; `verify` names a
clip whose licence asks for credit that it cannot give."""
from __future__ import annotations

import csv
import html
import importlib
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audio_dataset import manifest
from audio_dataset.attribution import Credit, describe_changes, to_markdown, to_tsv
from audio_dataset.cli import main
from audio_dataset.licenses import (CLASSES, classify, is_known, license_url, needs_attribution, parse_classes,
                                    parse_ids)
from audio_dataset.shards import iter_shard
from audio_dataset.source import available_sources, read_definition
from conftest import REAL_AUDIO_DIR

FIXTURES = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------- the table
def _emitted_strings() -> set[str]:
    """Every licence string an item of ours can carry: pipelines' constants, the fixtures' records,
    the bundled clips' sidecars."""
    found: set[str] = set()
    for name in ("audiocaps", "audioset", "audiostock", "bbc_sound_effects", "epidemic_sound", "esc50", "us8k", "vggsound"):
        found.add(importlib.import_module(f"pipelines.{name}").LICENSE)
    found.update(importlib.import_module("pipelines.wavcaps").LICENSES.values())
    for name in ("free_to_use_sounds", "paramount_motion", "sonniss", "wesoundeffects"):
        found.add(importlib.import_module(f"pipelines.{name}").SOURCE.license)
    found.update(r["license"] for r in json.loads((FIXTURES / "freesound" / "sounds.json").read_text())["sounds"])
    for path in (FIXTURES / "clotho").glob("clotho_metadata_*.csv"):
        with path.open(newline="") as handle:
            found.update(row["license"] for row in csv.DictReader(handle))
    found.update(json.loads(p.read_text())["license"] for p in REAL_AUDIO_DIR.glob("*.json"))
    return found


def test_every_licence_string_our_sources_emit_is_mapped() -> None:
    emitted = _emitted_strings()
    assert len(emitted) >= 25
    unmapped = sorted(s for s in emitted if classify(s)[0] is None)
    assert unmapped == [], unmapped
    assert {classify(s)[1] for s in emitted} <= set(CLASSES) - {"unknown"}


def test_every_source_definition_licence_is_in_the_table() -> None:
    """A definition names one licence (a class) or says each item records its own (known, no id)."""
    for name in available_sources():
        text = read_definition(name).get("license")
        assert is_known(text), (name, text)
    assert classify(read_definition("bbc_sound_effects")["license"]) == ("BBC-RemArc", "restricted")
    assert classify(read_definition("wavcaps")["license"]) == ("WavCaps-academic", "restricted")
    assert classify(read_definition("sonniss")["license"]) == ("Sonniss-GDC", "restricted")


@pytest.mark.parametrize("text, expected", [
    ("http://creativecommons.org/licenses/by/3.0/", ("CC-BY-3.0", "open")),
    ("https://creativecommons.org/licenses/by/3.0", ("CC-BY-3.0", "open")),
    ("https://creativecommons.org/licenses/by/4.0/deed.en", ("CC-BY-4.0", "open")),
    ("https://www.creativecommons.org/licenses/by-nc/4.0/legalcode", ("CC-BY-NC-4.0", "noncommercial")),
    ("http://creativecommons.org/licenses/by-sa/4.0/", ("CC-BY-SA-4.0", "sharealike")),
    ("http://creativecommons.org/licenses/by-nc-nd/3.0/", ("CC-BY-NC-ND-3.0", "restricted")),
    ("http://creativecommons.org/publicdomain/zero/1.0/", ("CC0-1.0", "open")),
    ("https://creativecommons.org/licenses/sampling+/1.0/", ("Freesound-Sampling-Plus", "noncommercial")),
    ("CC-BY 3.0", ("CC-BY-3.0", "open")),
    ("CC BY-NC 4.0", ("CC-BY-NC-4.0", "noncommercial")),
    ("cc-by-4.0", ("CC-BY-4.0", "open")),
    ("CC-BY-SA-4.0", ("CC-BY-SA-4.0", "sharealike")),
    ("CC0 1.0", ("CC0-1.0", "open")),
    ("Public domain", ("public-domain", "open")),
    ("Public Domain Mark 1.0", ("PDM-1.0", "open")),
    ("  RemArc Licence:  personal, educational and research use only ", ("BBC-RemArc", "restricted")),
])
def test_strings_normalise_to_ids_and_classes(text: str, expected: tuple[str, str]) -> None:
    assert classify(text) == expected


@pytest.mark.parametrize("text", [
    None, "", "   ", "MIT", "Attribution", "CC BY-XY 4.0", "CC BY", "creativecommons.org/licenses/by/9/",
    "https://evil.example/licenses/by/4.0/", "CC-BY-4.0 " + "x" * 2000, "per clip",
])
def test_an_odd_string_is_unknown_never_guessed(text: str | None) -> None:
    assert classify(text) == (None, "unknown")


def test_attribution_need_and_licence_urls() -> None:
    assert needs_attribution("CC-BY-4.0") and needs_attribution("CC-BY-NC-SA-3.0")
    assert needs_attribution("Freesound-Sampling-Plus")
    assert not needs_attribution("CC0-1.0") and not needs_attribution(None) and not needs_attribution("BBC-RemArc")
    assert license_url("CC-BY-NC-4.0") == "https://creativecommons.org/licenses/by-nc/4.0/"
    assert license_url("CC0-1.0") == "https://creativecommons.org/publicdomain/zero/1.0/"


def test_class_and_id_lists_are_checked() -> None:
    assert parse_classes("open, sharealike") == ("open", "sharealike")
    with pytest.raises(ValueError, match="unknown licence class free"):
        parse_classes("open,free")
    assert parse_ids("CC-BY-4.0,CC0-1.0") == ("CC-BY-4.0", "CC0-1.0")
    with pytest.raises(ValueError, match="unknown licence id cc-by"):
        parse_ids("cc-by")


def test_a_manifest_without_the_licence_columns_is_read_with_them_derived(tmp_path: Path) -> None:
    row = manifest.ManifestRow(source="local", source_id="a", split="train", shard=None, status="failed",
                               error="empty", license="CC BY-NC 3.0")
    assert (row.license_id, row.license_class) == ("CC-BY-NC-3.0", "noncommercial")
    old = manifest.rows_to_table([row]).drop_columns(["license_id", "license_class"])
    pq.write_table(old, tmp_path / "manifest.parquet")
    table = manifest.read_table(tmp_path / "manifest.parquet")
    assert table.schema == manifest.SCHEMA
    assert table.select(["license_id", "license_class"]).to_pylist() == [
        {"license_id": "CC-BY-NC-3.0", "license_class": "noncommercial"}]
    assert [t.column("license_class").to_pylist() for t in manifest.iter_tables(tmp_path / "manifest.parquet")] \
        == [["noncommercial"]]


# --------------------------------------------------------------------------- credit lines, inert
def test_credit_lines_are_inert_in_tsv_and_markdown() -> None:
    credit = Credit(source="local", source_id="x", title="=cmd|' /C calc'!A0 *bold* [x](javascript:alert(1))",
                    author="Eve\tMallory\n<script>", url="javascript:alert(1)", license="CC BY 4.0",
                    license_id="CC-BY-4.0", changes="FLAC", samples=["k1", "k2"])
    tsv = to_tsv([credit]).splitlines()
    assert len(tsv) == 2 and len(tsv[1].split("\t")) == len(tsv[0].split("\t"))
    assert tsv[1].startswith("'=cmd") and "Eve Mallory <script>" in tsv[1] and tsv[1].endswith("k1 k2")
    md = to_markdown("train", [credit])
    assert "](javascript" not in md and "<script>" not in md and "\\*bold\\*" in md
    assert "\\[x\\]\\(javascript:alert\\(1\\)\\)" in md
    assert "[CC-BY-4.0](<https://creativecommons.org/licenses/by/4.0/>)" in md


def test_changes_come_from_typed_recorded_options_only() -> None:
    audio = {"sample_rate": 48000, "channels": 1, "long_clips": "truncate", "max_seconds": 10.0}
    assert describe_changes(audio) == "resampled to 48 kHz mono, trimmed to 10 s, FLAC"
    assert describe_changes(audio, cut=False) == "resampled to 48 kHz mono, FLAC"
    assert describe_changes({"sample_rate": 16000, "channels": 2, "long_clips": "segment",
                             "segment_seconds": 5}) == "resampled to 16 kHz stereo, cut into 5 s segments, FLAC"
    hostile = {"sample_rate": "48000; rm -rf", "channels": True, "long_clips": "<b>", "max_seconds": 1e400}
    assert describe_changes(hostile) == "FLAC"


# --------------------------------------------------------------------------- a real build
BUILD = ["--source", "local", "--sample-rate", "16000", "--max-seconds", "3", "--long-clips", "truncate",
         "--workers", "1", "--no-progress", "--splits", "train=1"]
ROBIN = "456440__inspectorj__bird-whistling-robin-single-13"


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> Path:
    """The bundled clips (their sidecars carry CC BY, BY-NC and public-domain licences) plus two copies:
    one CC BY clip with neither author nor URL, one under a licence no table knows."""
    root = tmp_path_factory.mktemp("licences")
    folder = root / "input"
    shutil.copytree(REAL_AUDIO_DIR, folder)
    for name, changes in (("uncredited", {"author": "", "url": "", "license": "CC-BY 4.0"}),
                          ("oddlicence", {"license": "Grandpa's Tapes Licence v2"})):
        shutil.copy(folder / "pibble.ogg", folder / f"{name}.ogg")
        sidecar = json.loads((folder / "pibble.json").read_text())
        (folder / f"{name}.json").write_text(json.dumps({**sidecar, **changes}))
    out = root / "out"
    assert main(["build", *BUILD, "--input", str(folder), "--out", str(out)]) == 0
    return out


EXPECTED_IDS = {
    f"{ROBIN}.ogg": ("CC-BY-3.0", "open"), "pibble.ogg": ("CC-BY-NC-3.0", "noncommercial"),
    "glacier-bay-humpback.ogg": ("public-domain", "open"), "uncredited.ogg": ("CC-BY-4.0", "open"),
    "oddlicence.ogg": (None, "unknown"), "admiralbob77_-_Choice_-_Drum-bass.ogg": ("CC-BY-NC-4.0", "noncommercial"),
}


def _samples(out: Path) -> dict[str, dict]:
    return {json.loads(s["json"])["source_id"]: json.loads(s["json"])
            for tar in sorted((out / "train").glob("*.tar")) for s in iter_shard(tar)}


def test_a_build_records_licence_id_and_class_in_manifest_and_sample_json(built: Path) -> None:
    rows = {r["source_id"]: r for r in pq.read_table(built / "manifest.parquet").to_pylist()}
    samples = _samples(built)
    assert len(rows) == 12 and set(samples) == set(rows)
    for source_id, expected in EXPECTED_IDS.items():
        assert (rows[source_id]["license_id"], rows[source_id]["license_class"]) == expected
        assert (samples[source_id]["license_id"], samples[source_id]["license_class"]) == expected
    assert all(r["license_class"] in CLASSES for r in rows.values())


def test_stats_report_and_sources_show_licence_classes(built: Path, capsys) -> None:
    rows = pq.read_table(built / "manifest.parquet").to_pylist()
    capsys.readouterr()
    assert main(["stats", str(built), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    classes = stats["per_license_class"]
    assert list(classes) == ["open", "noncommercial", "unknown"]  # in CLASSES' order, only those present
    for name, group in classes.items():
        assert group["items"] == sum(r["license_class"] == name for r in rows)
    hours = stats["license_class_hours"]["local"]
    assert hours["unknown"] == classes["unknown"]["hours_out"] > 0
    assert sum(hours.values()) == pytest.approx(stats["hours_out"], abs=1e-3)
    assert main(["stats", str(built)]) == 0
    text = capsys.readouterr().out
    assert f"licences: open {classes['open']['items']} (" in text and "unknown 1 (" in text
    assert main(["report", str(built)]) == 0
    page = (built / "report.html").read_text()
    section = page[page.index("<section id=licences>"):]
    section = section[:section.index("</section>")]
    assert "<th>open</th><th>noncommercial</th><th>unknown</th>" in section
    assert f"<td>local</td><td>{hours['open']:.3f}</td>" in section
    assert html.escape("CC-BY-NC-3.0 (noncommercial)") in page or html.escape("CC-BY-3.0 (open)") in page
    assert main(["sources", str(built)]) == 0
    listing = capsys.readouterr().out
    local = next(line for line in listing.splitlines() if line.startswith("local "))
    assert "per item" in local
    assert next(line for line in listing.splitlines() if line.startswith("bbc_sound_effects")).count("restricted")
    assert f"  local: open {classes['open']['items']} (" in listing and "unknown 1 (" in listing


def test_filter_by_licence_class_writes_a_subset_verify_passes(built: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "publishable"
    assert main(["filter", str(built), "--out", str(out), "--license-class", "open,sharealike", "--workers", "1",
                 "--no-progress"]) == 0
    kept = _samples(out)
    assert kept and all(meta["license_class"] == "open" for meta in kept.values())
    assert {"pibble.ogg", "oddlicence.ogg"}.isdisjoint(kept) and f"{ROBIN}.ogg" in kept
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0, capsys.readouterr().out
    rows = {r["source_id"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    dropped = {k: (r["status"], r["error"], r["error_detail"]) for k, r in rows.items() if r["status"] != "ok"}
    assert dropped["pibble.ogg"] == ("dropped", "filter:license", "licence CC-BY-NC-3.0 (noncommercial)")
    assert dropped["oddlicence.ogg"] == ("dropped", "filter:license", "licence unmapped (unknown)")
    assert set(dropped) == {k for k, (_, cls) in _classes(built).items() if cls not in ("open", "sharealike")}
    # --license-id adds ids to what passes
    more = tmp_path / "with-nc3"
    assert main(["filter", str(built), "--out", str(more), "--license-class", "open", "--license-id",
                 "CC-BY-NC-3.0", "--workers", "1", "--no-progress"]) == 0
    assert "pibble.ogg" in _samples(more) and "admiralbob77_-_Choice_-_Drum-bass.ogg" not in _samples(more)


def _classes(out: Path) -> dict[str, tuple[str | None, str]]:
    return {r["source_id"]: (r["license_id"], r["license_class"])
            for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def test_filter_refuses_an_unknown_class(built: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["filter", str(built), "--out", str(tmp_path / "x"), "--license-class", "free"])
    assert exit_.value.code == 2
    assert "unknown licence class free" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_attribution_writes_credit_lines_and_names_a_clip_without_credit(built: Path, tmp_path: Path,
                                                                            capsys) -> None:
    capsys.readouterr()
    assert main(["attribution", str(built), "--out", str(tmp_path / "credits")]) == 1  # one clip lacks credit
    out, err = capsys.readouterr()
    assert "uncredited.ogg (CC-BY-4.0) has no author or URL" in err and "train: " in out
    lines = (tmp_path / "credits" / "train.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    rows = {row["source_id"]: row for row in (dict(zip(header, line.split("\t"))) for line in lines[1:])}
    robin = rows[f"{ROBIN}.ogg"]
    assert robin["author"] == "InspectorJ"
    assert robin["url"] == "https://freesound.org/people/InspectorJ/sounds/456440/"
    assert (robin["license_id"], robin["license_url"]) == ("CC-BY-3.0", "https://creativecommons.org/licenses/by/3.0/")
    assert robin["changes"] == "resampled to 16 kHz mono, FLAC"  # 2.7 s: under --max-seconds, kept whole
    assert rows["sorohanro_-_solo-trumpet-06.ogg"]["changes"] == "resampled to 16 kHz mono, trimmed to 3 s, FLAC"
    assert robin["title"] == f"{ROBIN}.ogg" and robin["samples"].startswith("local-")
    # BY and BY-NC clips are listed; public domain, the unknown licence are not
    assert "pibble.ogg" in rows and "glacier-bay-humpback.ogg" not in rows and "oddlicence.ogg" not in rows
    md = (tmp_path / "credits" / "train.md").read_text()
    assert ("by InspectorJ, [https://freesound.org/people/InspectorJ/sounds/456440/](<https://freesound.org/people/"
            "InspectorJ/sounds/456440/>), licensed under [CC-BY-3.0](<https://creativecommons.org/licenses/by/3.0/>); "
            "changes: resampled to 16 kHz mono, FLAC.") in md
    assert "456440\\_\\_inspectorj\\_\\_bird" in md  # Markdown syntax in titles escaped
    # the default place is DATASET/attribution
    assert main(["attribution", str(built)]) == 1
    assert (built / "attribution" / "train.tsv").read_text() == (tmp_path / "credits" / "train.tsv").read_text()


def test_verify_names_a_credit_licence_clip_without_author_or_url(built: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["verify", str(built)]) == 0  # a warning: the dataset is whole, not yet publishable
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("warning:")]
    assert len(warnings) == 1
    assert "licence CC-BY-4.0 asks for attribution, but the clip has no author or url" in warnings[0]
    assert "uncredited" in warnings[0] and out[-1].endswith("1 clip(s) without the credit their licence asks for")


def test_attribution_on_a_missing_dataset_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["attribution", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_dataset_built_before_the_columns_still_counts_classes(built: Path, tmp_path: Path, capsys) -> None:
    """A manifest without license_id/license_class: stats and verify read it with them derived."""
    old = tmp_path / "old"
    shutil.copytree(built, old, ignore=shutil.ignore_patterns("attribution", "report.html", "stats.png"))
    table = pq.read_table(old / "manifest.parquet").drop_columns(["license_id", "license_class"])
    pq.write_table(table, old / "manifest.parquet")
    assert manifest.read_table(old / "manifest.parquet").column("license_class").to_pylist() == \
        pq.read_table(built / "manifest.parquet").column("license_class").to_pylist()
    capsys.readouterr()
    assert main(["stats", str(old), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["per_license_class"]["unknown"]["items"] == 1
    assert main(["verify", str(old)]) == 0


def test_dedup_keeps_the_most_permissive_licence_by_the_same_table() -> None:
    from audio_dataset.curate.dedup import licence_rank

    ranked = ["CC0 1.0", "CC-BY 3.0", "CC BY-SA 4.0", "http://creativecommons.org/licenses/by-nc/3.0/",
              "CC BY-NC-ND 4.0", "RemArc Licence: personal, educational and research use only"]
    assert [licence_rank(text) for text in ranked] == sorted(licence_rank(text) for text in ranked)
    assert len({licence_rank(text) for text in ranked}) == len(ranked)
    # a label licence is not the audio's: the YouTube clip ranks with the unknowns, not as CC BY
    assert licence_rank("CC BY 4.0 (labels); audio: the YouTube uploader's terms") == licence_rank(None) == 7
