"""`audiodata card DATASET`: a Hugging Face dataset card the Hub's own parser reads as we wrote it."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from huggingface_hub import DatasetCard
from huggingface_hub.repocard import metadata_load

from audio_dataset import manifest
from audio_dataset.audio import AudioConfig
from audio_dataset.build import BuildOptions, build
from audio_dataset.card import MARK, format_hours
from audio_dataset.cli import main
from audio_dataset.source import SourceConfig
from conftest import REAL_AUDIO_DIR


@pytest.fixture(scope="module")
def built(tmp_path_factory, ray_local) -> Path:
    """The real recordings built once (ten items, six licence texts); each test works on a copy."""
    out = tmp_path_factory.mktemp("card") / "built"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(REAL_AUDIO_DIR)),
                       audio=AudioConfig(), progress=False, workers=2))
    return out


@pytest.fixture
def dataset(built: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "corpus"
    shutil.copytree(built, copy)
    return copy


def _card(dataset: Path, *extra: str) -> DatasetCard:
    assert main(["card", str(dataset), *extra]) == 0
    return DatasetCard.load(dataset / "README.md")


def _rewrite_manifest(dataset: Path, **columns: list) -> pa.Table:
    """The manifest with columns replaced or added (as a later tool, or a hostile file, would hold)."""
    path = dataset / manifest.MANIFEST_FILE
    table = manifest.read_table(path)
    for name, values in columns.items():
        array = pa.array(values, pa.string())
        table = (table.set_column(table.schema.get_field_index(name), name, array) if name in table.schema.names
                 else table.append_column(name, array))
    manifest.write_parquet(table, path)
    return table


def test_header_parses_with_the_hub_parser(dataset: Path) -> None:
    card = _card(dataset)
    data = card.data.to_dict()
    assert data == metadata_load(dataset / "README.md")
    # The clips' CC licences as the Hub's ids; the public-domain ones have none, so `other`, named.
    assert data["license"] == ["cc-by-3.0", "cc-by-4.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "other"]
    assert data["license_name"] == "per-item-licences"
    assert data["size_categories"] == ["n<1K"]
    assert data["task_categories"] == ["audio-classification", "text-to-audio"]
    assert data["source_datasets"] == ["original"]
    splits = {entry["split"]: entry["path"] for entry in data["configs"][0]["data_files"]}
    assert splits == {s: f"{s}/*.tar" for s in splits} and "train" in splits
    assert MARK in card.text.splitlines()


def test_licence_ids_become_hub_licences_and_classes(dataset: Path) -> None:
    table = manifest.read_table(dataset / manifest.MANIFEST_FILE)
    n = len(table)
    ids = ["CC-BY-4.0", "CC0-1.0", "CC-BY-NC-3.0", "LicenseRef-BBC-RemArc"] * n
    classes = ["open", "open", "noncommercial", "restricted"] * n
    _rewrite_manifest(dataset, license_id=ids[:n], license_class=classes[:n])
    card = _card(dataset)
    assert card.data.license == ["cc-by-4.0", "cc-by-nc-3.0", "cc0-1.0", "other"]
    kept = pc.equal(table["status"], "ok").to_pylist()
    noncommercial = sum(1 for k, c in zip(kept, classes[:n]) if k and c == "noncommercial")
    assert f"- {noncommercial:,} kept item(s) are under non-commercial use only" in card.text
    assert "| noncommercial |" in card.text and "| LicenseRef\\-BBC\\-RemArc | restricted |" in card.text


def test_body_counts_and_hours_are_the_manifests(dataset: Path) -> None:
    table = manifest.read_table(dataset / manifest.MANIFEST_FILE)
    kept = table.filter(pc.equal(table["status"], "ok"))
    text = _card(dataset).text
    seconds = pc.sum(kept["output_duration"]).as_py()
    samples = pc.sum(kept["n_samples"]).as_py()
    assert f"kept: {len(kept):,}; not kept: {len(table) - len(kept):,}" in text
    assert f"- hours kept: {format_hours(seconds)}" in text
    assert f"| local | {len(kept):,} | {samples:,} | {format_hours(seconds)} | 0 |" in text
    cc_by_4 = kept.filter(pc.equal(kept["license"], "CC-BY 4.0"))
    assert cc_by_4.num_rows and (f"| CC\\-BY\\-4\\.0 | open | {cc_by_4.num_rows} | {cc_by_4.num_rows} | "
                                 f"{format_hours(pc.sum(cc_by_4['output_duration']).as_py())} |") in text


HOSTILE = "x\n---\nlicense: mit\n---\n<script>alert(1)</script> [click](javascript:alert(1)) ```\n# Owned"


def test_hostile_records_cannot_change_the_header(dataset: Path) -> None:
    clean = _card(dataset).data.to_dict()
    (dataset / "README.md").unlink()
    n = len(manifest.read_table(dataset / manifest.MANIFEST_FILE))
    _rewrite_manifest(dataset, license=[HOSTILE] * n, error_detail=[HOSTILE] * n, source=[HOSTILE] * n)
    runs = json.loads((dataset / "provenance.json").read_text())["runs"]
    runs.append({**runs[0], "stage": HOSTILE, "tool_version": HOSTILE,
                 "command": f"audiodata build --hf-token hf_secretvalue123 --title '{HOSTILE}'"})
    (dataset / "provenance.json").write_text(json.dumps({"runs": runs}))
    (dataset / "recipe.json").write_text(json.dumps({"recipe": HOSTILE, "sources": {
        HOSTILE: {"status": "failed", "error": HOSTILE}}}))
    card = _card(dataset)
    data = card.data.to_dict()
    assert data == metadata_load(dataset / "README.md")
    assert data == {**clean, "source_datasets": data["source_datasets"]}  # the source's name, as a slug:
    assert re.fullmatch(r"extended\|[a-z0-9._-]+", data["source_datasets"][0])
    # As a CommonMark renderer with raw HTML on (as the Hub's) shows the body: all of it text.
    markdown_it = pytest.importorskip("markdown_it")
    page = markdown_it.MarkdownIt("commonmark", {"html": True}).enable("table").render(card.text)
    assert "<script" not in page and 'href="javascript' not in page and "<h1>Owned" not in page
    assert "&lt;script&gt;" in page and page.count("<h1>") == 1
    assert "hf_secretvalue123" not in card.text
    assert "--hf-token '***'" in card.text or "--hf-token ***" in card.text


def test_recipe_papers_commands_and_failed_sources(dataset: Path) -> None:
    (dataset / "recipe.json").write_text(json.dumps({"recipe": "laion-audio-630k", "sources": {
        "wavcaps": {"status": "failed", "error": "needs --recipe-input wavcaps=PATH"}}}))
    runs = json.loads((dataset / "provenance.json").read_text())["runs"]
    step = "build --source clotho --out /data/_sources/clotho --api-key=abcd1234secret"
    runs.append({**runs[0], "stage": "recipe", "command": "audiodata build --recipe laion-audio-630k --out /data",
                 "options": {"recipe": "laion-audio-630k", "sources": {"clotho": [step]}}})
    (dataset / "provenance.json").write_text(json.dumps({"runs": runs}))
    text = _card(dataset).text
    assert "build --source clotho --out /data/_sources/clotho '--api-key=***'" in text
    assert "abcd1234secret" not in text
    assert "eprint = {2211.06687}" in text and "eprint = {2303.17395}" in text
    assert "2309.05767" not in text
    assert "- source wavcaps failed as a whole" in text


def test_a_foreign_readme_is_kept_unless_forced(dataset: Path, capsys) -> None:
    readme = dataset / "README.md"
    readme.write_text("# My notes\n")
    assert main(["card", str(dataset)]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and len(err.strip().splitlines()) == 1
    assert readme.read_text() == "# My notes\n"
    assert main(["card", str(dataset), "--force"]) == 0
    assert MARK in readme.read_text().splitlines()
    assert main(["card", str(dataset)]) == 0  # our own card: rewritten without --force


def test_out_writes_elsewhere(dataset: Path, tmp_path: Path) -> None:
    dest = tmp_path / "cards" / "corpus.md"
    assert main(["card", str(dataset), "--out", str(dest)]) == 0
    assert not (dataset / "README.md").exists()
    assert "cc-by-4.0" in DatasetCard.load(dest).data.license


def test_missing_dataset_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["card", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"audiodata: error: {tmp_path / 'nowhere'} does not exist"]


@pytest.mark.usefixtures("one_torch_thread")
def test_a_curated_output_gets_its_own_card_not_the_inputs(dataset: Path, tmp_path: Path) -> None:
    assert main(["card", str(dataset)]) == 0
    out = tmp_path / "filtered"
    assert main(["filter", str(dataset), "--out", str(out), "--min-seconds", "5", "--no-progress"]) == 0
    assert not (out / "README.md").exists()  # the input's card describes other samples
    table = manifest.read_table(out / manifest.MANIFEST_FILE)
    dropped = pc.sum(pc.equal(table["error"], "filter:too_short")).as_py()
    assert dropped and f"- not kept, by reason: filter\\:too\\_short {dropped}" in _card(out).text


def test_a_manifest_read_in_small_batches_gives_the_same_card(dataset: Path, monkeypatch) -> None:
    whole = _card(dataset).text
    monkeypatch.setattr(manifest, "BATCH_ROWS", 3)  # ten items: four batches, tallies added up
    assert _card(dataset).text == whole
