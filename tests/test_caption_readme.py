"""The README's "Recaption a corpus" block runs as written (tiny models from the shipped script)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from test_readme_tour import readme_commands  # tests/ is on sys.path

ROOT = Path(__file__).parent.parent


@pytest.mark.slow  # the same plumbing is tested in-process by test_caption_stage.py
@pytest.mark.timeout(1200)  # five commands, each its own process (and Ray); minutes on a busy machine
def test_the_readme_recaption_block_runs_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    commands = readme_commands("caption")
    assert [c.split()[1] for c in commands] == ["build", "-m", "caption", "verify", "--train-data"]
    outputs = []
    for command in commands:
        command = command.replace(".venv/bin/", f"{bin_dir}/").replace("tests/data/", f"{ROOT}/tests/data/")
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        outputs.append(result.stdout)
    assert "caption: 4 sample(s) (" in outputs[2]
    rows = pq.read_table(tmp_path / "speak-captioned" / "caption_manifest.parquet").to_pylist()
    assert len(rows) == 4 and all(len(r["candidates"]) >= 1 for r in rows)
    assert "OK" in outputs[3]
    assert (tmp_path / "runs" / "recaptioned" / "latest.pt").is_file()
    settings = json.loads((tmp_path / "speak-captioned" / ".caption" / "run.json").read_text())["settings"]
    assert settings["steps"] == ["listen", "write", "check"]


def test_the_readme_recaption_block_names_the_shipped_script_and_flags():
    """Fast: the block's flags are the CLI's (a renamed flag would fail here before the slow run)."""
    from audio_dataset.cli import make_parser

    caption = next(c for c in readme_commands("caption") if " caption " in c)
    args = make_parser().parse_args(caption.split()[1:])
    assert args.alm_model == "./tiny-models/alm" and args.llm == "./tiny-models/llm"
    assert str(args.clap_checkpoint) == "tiny-models/clap.pt"


def test_plan_prices_recaptioning_in_gpu_hours_from_the_rate(capsys):
    from audio_dataset.cli import main
    from audio_dataset.plan import ESTIMATED_CAPTION_WINDOWS_PER_GPU_SECOND, caption_windows, plan_recipe
    from audio_dataset.recipe import load_recipe

    plans = plan_recipe(load_recipe("laion-audio-630k"))
    windows = caption_windows(plans)
    # At least one window a clip; more where the clips run longer than 30 s on average.
    assert sum(p.items for p in plans) <= windows <= sum(p.items for p in plans) + sum(p.hours for p in plans) * 120
    assert main(["plan", "laion-audio-630k"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("recaption"))
    hours = windows / ESTIMATED_CAPTION_WINDOWS_PER_GPU_SECOND / 3600
    assert f"{hours:,.0f} GPU-h" in line and "(estimate)" in line
    assert main(["plan", "laion-audio-630k", "--caption-rate", str(2 * ESTIMATED_CAPTION_WINDOWS_PER_GPU_SECOND)]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("recaption"))
    assert f"{hours / 2:,.0f} GPU-h" in line and "(--caption-rate)" in line
