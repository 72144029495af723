"""The README's curation loop (build -> clap-train -> embed -> dedup -> filter -> search) runs as written."""
from __future__ import annotations

import pytest
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from test_readme_tour import readme_commands  # tests/ is on sys.path

ROOT = Path(__file__).parent.parent


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_the_readme_curation_loop_runs_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    outputs = []
    for command in readme_commands("curate"):
        command = command.replace(".venv/bin/", f"{bin_dir}/").replace("tests/data/", f"{ROOT}/tests/data/")
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        outputs.append(result.stdout)
    assert "embed: 10 sample(s) (10 ok)" in outputs[3]
    assert "3 eval_overlap" in outputs[4]
    clusters = pq.read_table(tmp_path / "clips" / "dedup" / "clusters.parquet").to_pylist()
    assert len(clusters) == 3 and all(r["kind"] == "eval_overlap" and r["method"] == "exact" for r in clusters)
    manifest = pq.read_table(tmp_path / "clips-clean" / "filter_manifest.parquet").to_pylist()
    statuses = [r["status"] for r in manifest]
    assert statuses.count("eval_overlap") == 3 and "too_short" in statuses and len(manifest) == 10
    kept = json.loads((tmp_path / "clips-clean" / "train" / "sizes.json").read_text())
    assert sum(kept.values()) == statuses.count("kept")
    assert len([line for line in outputs[6].splitlines() if line.strip()]) == 3  # -k 3
