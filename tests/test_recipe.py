"""Recipes (`audiodata build --recipe`) and `audiodata plan`: several sources into one dataset."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from audio_dataset import manifest
from audio_dataset.cli import main
from audio_dataset.plan import (AUDIO_SECONDS_PER_CORE_SECOND, Assumptions, CORES_PER_NODE, DOWNLOAD_CEILING_FRACTION,
                                MEASURED_K2C_CAPTIONS_PER_SECOND, MEASURED_K2C_CORES, plan_recipe)
from audio_dataset.recipe import load_recipe, shipped_recipes
from audio_dataset.shards import iter_shard, read_sizes, shard_paths
from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR
from conftest import BUCKET
from test_object_storage import _objects

ROOT = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-do-not-log-4711"
SHORT_CLIPS = {
    "a": ["198-209-0000", "456440__inspectorj__bird-whistling-robin-single-13", "sorohanro_-_solo-trumpet-06"],
    "b": ["3436-172162-0000", "5703-47212-0000"],
}


def _folder(root: Path, name: str) -> Path:
    folder = root / name
    folder.mkdir()
    for stem in SHORT_CLIPS[name]:
        for suffix in (".ogg", ".json"):
            shutil.copy(REAL_AUDIO_DIR / f"{stem}{suffix}", folder / f"{stem}{suffix}")
    return folder


RECIPE = """
name = "two-folders"
[build]
samples_per_shard = 2
splits = "train=0.5,valid=0.5"
[[sources]]
name = "a"
source = "local"
input = "./a"
env = ["AUDIODATA_TEST_TOKEN"]
[[sources]]
name = "b"
source = "local"
input = "./b"
[[sources]]
name = "broken"
source = "local"
input = "./not-there"
[[sources]]
name = "nocred"
source = "local"
input = "./b"
env = ["AUDIODATA_TEST_UNSET_TOKEN"]
[[sources]]
name = "captioned"
source = "local"
input = "./b"
k2c = { caption_model = "template" }
"""


@pytest.mark.usefixtures("ray_local")
def test_recipe_builds_sources_into_one_dataset_isolates_failures_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUDIODATA_TEST_TOKEN", SECRET)
    monkeypatch.delenv("AUDIODATA_TEST_UNSET_TOKEN", raising=False)
    _folder(tmp_path, "a"), _folder(tmp_path, "b")
    (tmp_path / "corpus.toml").write_text(RECIPE)
    out = tmp_path / "out"
    argv = ["build", "--recipe", str(tmp_path / "corpus.toml"), "--out", str(out), "--workers", "1", "--no-progress"]

    assert main(argv) == 1  # two sources failed as a whole: the run says so, the others are kept
    printed = capsys.readouterr()
    assert "a: done" in printed.out and "b: done" in printed.out and "captioned: done" in printed.out
    assert re.search(r"broken: failed: input not found: .*not-there", printed.out)
    assert "nocred: failed: needs $AUDIODATA_TEST_UNSET_TOKEN in the environment" in printed.out

    table = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    assert sorted((r["source"], r["source_id"]) for r in table) == sorted(
        [(name, f"{stem}.ogg") for name in "ab" for stem in SHORT_CLIPS[name]]
        + [("captioned", f"{stem}.ogg") for stem in SHORT_CLIPS["b"]])
    assert all(r["status"] == "ok" for r in table)
    # One folder per split for all sources, shards named by source, one sizes.json each.
    for split in ("train", "valid"):
        sizes = read_sizes(out / split)
        assert sizes == {p.name: sizes[p.name] for p in shard_paths(out / split)}
        assert {name.rsplit("-", 1)[0] for name in sizes} <= {"a", "b", "captioned"}
        assert sum(sizes.values()) == sum(r["n_samples"] for r in table if r["split"] == split)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["per_source"]["a"]["items"] == 3 and stats["per_source"]["b"]["items"] == 2
    # The failed sources are short from the dataset: verify says so (their shards are not there to check).
    problems = verify(out).problems
    assert [p.split(" (")[0] for p in problems] == ["source broken failed", "source nocred failed"], problems
    # The k2c step ran on that source's build: its shards gained the template captions.
    captioned = [json.loads(s["json"]) for split in ("train", "valid")
                 for p in shard_paths(out / split) if p.name.startswith("captioned-") for s in iter_shard(p)]
    assert len(captioned) == 2 and all(s["text_augment_t5"][0].startswith("The sound of") for s in captioned)
    assert not any(json.loads(s["json"]).get("text_augment_t5") for p in shard_paths(out / "train")
                   if p.name.startswith("b-") for s in iter_shard(p))

    # Credentials are named, never recorded.
    for path in [*out.rglob("*.json"), *out.rglob("*.parquet")]:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in printed.out + printed.err
    run = json.loads((out / "provenance.json").read_text())["runs"][-1]
    assert run["stage"] == "recipe" and run["options"]["env"]["a"] == ["AUDIODATA_TEST_TOKEN"]

    # A rerun skips the finished sources (their inputs are gone) and retries the failed ones.
    shutil.rmtree(tmp_path / "a")
    _folder(tmp_path, "a").rename(tmp_path / "not-there")
    before = {p.name: p.read_bytes() for p in shard_paths(out / "train")}
    monkeypatch.setenv("AUDIODATA_TEST_UNSET_TOKEN", "set-now")
    monkeypatch.chdir(tmp_path)  # the same OUT by another name: still a resume
    assert main([*argv[:3], "--out", "out", *argv[5:]]) == 0
    printed = capsys.readouterr().out
    assert "a: skipped" in printed and "b: skipped" in printed and "broken: done" in printed
    after = {p.name: p.read_bytes() for p in shard_paths(out / "train")}
    assert {k: v for k, v in after.items() if k in before} == before
    table = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    assert {r["source"] for r in table} == {"a", "b", "broken", "nocred", "captioned"}
    assert len(table) == 3 + 2 + 3 + 2 + 2
    assert verify(out).ok, verify(out).problems
    # A recipe that dropped a finished source would leave its shards undescribed: refused.
    (tmp_path / "corpus.toml").write_text(RECIPE.replace('name = "a"', 'name = "renamed"'))
    assert main(argv) == 2
    assert "holds source(s) a that recipe two-folders no longer has" in capsys.readouterr().err
    # Nor does a recipe write over the build of one source.
    assert main(["build", "--recipe", str(tmp_path / "corpus.toml"), "--out", str(out / "_sources" / "b")]) == 2
    assert "holds the build of one source" in capsys.readouterr().err


def test_recipe_mistakes_are_one_line_usage_errors(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "x"\nsource = "local"\noptions = { api_key = "abc" }\n')
    assert main(["build", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "look like credentials" in capsys.readouterr().err
    bad.write_text('[[sources]]\nname = "x"\nsource = "nosuch"\n')
    assert main(["plan", str(bad)]) == 2
    assert "unknown source 'nosuch'" in capsys.readouterr().err
    assert main(["build", "--recipe", "laion-audio-630k", "--out", str(tmp_path / "o"), "--sample-rate", "16000"]) == 2
    assert "--sample-rate: set by the recipe" in capsys.readouterr().err
    assert main(["build", "--recipe", "laion-audio-630k", "--out", str(tmp_path / "o"), "--only", "sonis"]) == 2
    assert "recipe laion-audio-630k has no source 'sonis'" in capsys.readouterr().err
    assert main(["build", "--source", "local", "--out", str(tmp_path / "o"), "--only", "x"]) == 2
    assert "--recipe-input and --only go with --recipe" in capsys.readouterr().err
    bad.write_text('[build]\nsample_rate = "fast"\n[[sources]]\nname = "x"\nsource = "local"\ninput = "/nowhere"\n')
    assert main(["build", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("audiodata: error: recipe source x: argument --sample-rate")
    bad.write_text('[build]\nlong_clips = "segment"\n[[sources]]\nname = "x"\nsource = "local"\n')
    assert main(["build", "--recipe", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "recipe source x: --long-clips segment needs" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_plan_figures_follow_the_benchmarks_and_the_definitions(tmp_path):
    # The plan's rates are the ones bench/RESULTS.md reports for bench/transcode.py and download.py.
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    plan_row = re.search(r"\| plan figure \([\d,]+ items\) \| \*\*(\d+) s of audio per build CPU second\*\* \|", results)
    assert float(plan_row.group(1)) == AUDIO_SECONDS_PER_CORE_SECOND
    default_rows = r"\| 16 \(default\) \| 50 ms \| [\d.]+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|"
    fractions = [float(f) for f in re.findall(default_rows, results)]
    assert fractions and min(fractions) >= DOWNLOAD_CEILING_FRACTION > min(fractions) - 0.01
    k2c_row = re.search(r"\| t5-base \(223M\) \| 16 \| ([\d.]+) \|", results)
    assert float(k2c_row.group(1)) == MEASURED_K2C_CAPTIONS_PER_SECOND

    path = tmp_path / "r.toml"
    path.write_text("""
name = "sized"
[build]
sample_rate = 16000
[[sources]]
name = "slow"
source = "local"
expect = { clips = 10000, hours = 100 }
plan = { media_kbps = 128, rate_limits = [{ host = "api.example.org", requests_per_item = 1, per_second = 2 }] }
[[sources]]
name = "fast"
source = "local"
expect = { clips = 100, hours = 1000 }
[[sources]]
name = "unknown"
source = "local"
[[sources]]
name = "captioned"
source = "local"
expect = { clips = 1000, hours = 1 }
k2c = { caption_model = "some/t5" }
[[sources]]
name = "plain"
source = "local"
expect = { clips = 1000, hours = 1 }
[[sources]]
name = "templated"
source = "local"
expect = { clips = 1000, hours = 1 }
k2c = { caption_model = "template" }
""")
    slow, fast, unknown, captioned, plain, templated = plan_recipe(load_recipe(str(path)))
    assert templated.wall == plain.wall  # the template captioner costs no model time
    assert slow.download_bytes == 100 * 3600 * 128_000 / 8
    assert slow.shard_bytes == pytest.approx(100 * 3600 * 16_000 * 2 * 0.6)
    assert slow.wall[1] == (5000.0, "api.example.org rate") == slow.wall[64]  # nodes do not raise a host's limit
    transcode = 1000 * 3600 / AUDIO_SECONDS_PER_CORE_SECOND
    assert fast.wall[1] == (pytest.approx(transcode / CORES_PER_NODE), "transcode")
    assert fast.wall[8][0] == pytest.approx(transcode / (8 * CORES_PER_NODE))
    faster = plan_recipe(load_recipe(str(path)), Assumptions(transcode_rate=2 * AUDIO_SECONDS_PER_CORE_SECOND))[1]
    assert faster.wall[1][0] == pytest.approx(fast.wall[1][0] / 2)
    assert unknown.wall == {} and unknown.items is None
    k2c = 1000 / (MEASURED_K2C_CAPTIONS_PER_SECOND / MEASURED_K2C_CORES) / CORES_PER_NODE
    assert captioned.wall[1][0] == pytest.approx(plain.wall[1][0] + k2c)
    assert captioned.wall[1][1] == f"{plain.wall[1][1]} + k2c on CPUs"


@pytest.mark.parametrize("name", ["laion-audio-630k", "laion-clap-train", "msclap-2023"])
def test_shipped_recipes_plan(name, capsys):
    assert name in shipped_recipes()
    assert main(["plan", name]) == 0
    printed = capsys.readouterr().out
    total = next(line for line in printed.splitlines() if line.startswith("total"))
    recipe = load_recipe(name)
    expected = sum(p.items for p in plan_recipe(recipe) if p.items)
    assert f"{expected:,.0f}" in total
    if recipe.missing:
        assert printed.count("missing: ") == len(recipe.missing)


@pytest.mark.slow
def test_recipe_into_object_storage(tmp_path, s3_env):
    """Shards move within the bucket (server-side) and the merged output reads back as one dataset."""
    import subprocess
    import sys

    _folder(tmp_path, "b")
    (tmp_path / "r.toml").write_text('name = "s3"\n[[sources]]\nname = "b"\nsource = "local"\ninput = "./b"\n')
    out = f"s3://{BUCKET}/recipe"
    command = [sys.executable, "-m", "audio_dataset.cli", "build", "--recipe", str(tmp_path / "r.toml"),
               "--out", out, "--workers", "1", "--no-progress"]
    run = subprocess.run(command, env=s3_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "b: done, 2 samples" in run.stdout
    report = verify(out)
    assert report.ok and report.samples == 2, report.problems
    keys = set(_objects("recipe/"))
    assert {k for k in keys if k.endswith(".tar")} <= {"train/b-000000.tar", "valid/b-000000.tar", "test/b-000000.tar"}
    assert not any(k.startswith("_sources/b/") and k.endswith(".tar") for k in keys)  # moved, not copied


def test_the_readme_plan_table_is_what_plan_prints(capsys):
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("$ audiodata plan laion-audio-630k\n", 1)[1].split("```", 1)[0]
    assert main(["plan", "laion-audio-630k"]) == 0
    assert capsys.readouterr().out == shown


def test_the_readme_recipe_example_loads_and_plans(tmp_path):
    readme = (ROOT / "README.md").read_text()
    example = readme.split("A recipe of your own:\n\n```toml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mine.toml").write_text(example)
    recipe = load_recipe(str(tmp_path / "mine.toml"))
    assert recipe.names == ["clotho", "my-clips", "freesound"]
    assert recipe.source("my-clips").input == str(tmp_path / "clips") and recipe.source("my-clips").k2c
    assert [p.items for p in plan_recipe(recipe)] == [3839, None, 50000]


def test_a_second_recipe_run_into_one_out_is_refused(tmp_path, capsys):
    from audio_dataset.lock import hold_output
    from audio_dataset.storage import location

    _folder(tmp_path, "b")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "one"\n[[sources]]\nname = "b"\nsource = "local"\ninput = "{tmp_path / "b"}"\n')
    out = tmp_path / "out"
    with hold_output(location(str(out)), "recipe"):  # another run is writing OUT
        assert main(["build", "--recipe", str(recipe), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "recipe" in err and "pid" in err and len(err.strip().splitlines()) == 1
    assert not (out / "_sources").exists()
