"""The shipped evaluation-overlap lists and the tool that makes them from the sets' metadata."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from audio_dataset.build import read_exclusions
from pipelines._exclusions import collect_ids, render

EXCLUSIONS = Path(__file__).parent.parent / "manifests" / "exclusions"
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("path", sorted(EXCLUSIONS.glob("*.txt")), ids=lambda p: p.name)
def test_shipped_lists_say_where_their_ids_come_from_and_parse(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# ") and "Source" in "\n".join(lines[:4])
    ids = [line for line in lines if line and not line.startswith("#")]
    assert len(ids) == len(set(ids)) > 0
    assert read_exclusions([path]) == set(ids)


def test_esc50_list_holds_freesound_ids_of_esc50_clips():
    ids = read_exclusions([EXCLUSIONS / "esc50_freesound_ids.txt"])
    assert all(i.isdigit() for i in ids)
    # ESC-50 clips dog_1-100032-A-0, vacuum_cleaner_5-263902-A-36, keyboard_typing_1-137-A-32.
    assert {"100032", "263902", "137"} <= ids


def test_lists_are_made_from_the_sets_metadata(tmp_path):
    esc = tmp_path / "esc50.csv"
    esc.write_text("filename,fold,target,category,esc10,src_file,take\n"
                   "dog_1-100032-A-0.wav,1,0,dog,True,100032,A\n"
                   "vacuum_cleaner_1-100210-A-36.wav,1,36,x,False,100210,A\n"
                   "vacuum_cleaner_1-100210-B-36.wav,1,36,x,False,100210,B\n"
                   "keyboard_typing_1-137-A-32.wav,1,32,y,False,137,A\n")
    assert collect_ids("esc50", [esc]) == ["137", "100032", "100210"]
    assert collect_ids("audiocaps-test", [FIXTURES / "audiocaps" / "test.csv"]) == ["MiSsInG0002", "OrChEsTrA01"]
    text = render("clotho", sorted((FIXTURES / "clotho").glob("clotho_metadata_*.csv")))
    assert text.splitlines()[0].startswith("# Freesound ids of Clotho")
    assert read_exclusions([_write(tmp_path / "c.txt", text)]) == {"456440"}


def test_command_line_errors_are_one_line(tmp_path):
    bad = _write(tmp_path / "bad.csv", "a,b\n1,2\n")
    result = subprocess.run([sys.executable, "-m", "pipelines._exclusions", "esc50", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no 'src_file' column" in result.stderr
    assert "Traceback" not in result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
