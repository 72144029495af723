"""The README's tour (build -> k2c -> clap-train -> clap-eval -> clap-export on the bundled clips,
then transformers loading the export) runs as written, offline."""
from __future__ import annotations

import pytest
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_block(marker: str, language: str = "bash") -> str:
    """The README's `language` block between `<!-- marker -->` and `<!-- /marker -->`."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- {marker} -->\s*```{language}\n(.*?)```\s*<!-- /{marker} -->", readme, re.S)
    assert block, f"README has no {marker} block"
    return block.group(1)


def readme_commands(marker: str) -> list[str]:
    """The command lines of the README's bash block between `<!-- marker -->` and `<!-- /marker -->`."""
    return [line for line in readme_block(marker).splitlines() if line.strip()]


def _tour_commands() -> list[str]:
    return readme_commands("tour")


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_the_readme_tour_runs_as_written(tmp_path):
    bin_dir = Path(sys.executable).parent
    commands = _tour_commands()
    assert [c.split()[0] for c in commands] == [".venv/bin/audiodata", ".venv/bin/audiodata", ".venv/bin/clap-train",
                                                ".venv/bin/clap-eval", ".venv/bin/clap-export"]
    outputs = []
    for command in commands:
        # The venv this test runs in, and the repository's sample data, wherever they are.
        command = command.replace(".venv/bin/", f"{bin_dir}/").replace("tests/data/", f"{ROOT}/tests/data/")
        result = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr[-2000:])
        outputs.append(result.stdout)
    assert "k2c: 10 sample(s) (10 generated)" in outputs[1]
    assert outputs[2].count("eval epoch") == 3
    assert "eval latest.pt: audio_to_text_mean_rank" in outputs[3] and "num_samples 6.0000" in outputs[3]
    assert (tmp_path / "runs" / "tiny" / "epoch_3.pt").is_file()
    assert "clap-export: wrote ./tiny-hf (hf)" in outputs[4]
    # transformers loads the export, tokenizer included, with the hub offline (tests/conftest.py).
    load = subprocess.run([sys.executable, "-c", readme_block("tour-python", "python")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert load.returncode == 0, load.stderr[-2000:]
    assert "torch.Size([1, " in load.stdout  # the text embedding's shape
