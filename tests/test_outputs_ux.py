"""What a user sees around outputs: failed recipe sources stay visible, a read-only dataset still
gets its figures, usage mistakes leave nothing behind and are said before anything heavy loads."""
from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

from audio_dataset import storage
from audio_dataset.cli import main
from audio_dataset.recipe import load_recipe
from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR  # tests/ is on sys.path

ROOT = Path(__file__).parent.parent

ALL_FAIL = """
name = "allfail"
[[sources]]
name = "sonniss"
[[sources]]
name = "broken"
source = "local"
input = "./not-there"
"""


@pytest.fixture
def failed_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, str]:
    """A recipe output whose every source failed as a whole (no input; an input that is not there)."""
    (tmp_path / "r.toml").write_text(ALL_FAIL)
    out = tmp_path / "out"
    assert main(["build", "--recipe", str(tmp_path / "r.toml"), "--out", str(out), "--no-progress"]) == 1
    return out, capsys.readouterr().out


def test_a_recipe_source_that_needs_files_names_recipe_input(failed_recipe):
    _, printed = failed_recipe
    assert "sonniss: failed: sonniss needs --recipe-input sonniss=PATH" in printed
    assert "needs --input" not in printed  # --input is refused with --recipe


def test_failed_recipe_sources_show_in_verify_stats_sources_and_report(failed_recipe, capsys):
    out, _ = failed_recipe
    problems = verify(out).problems
    assert len(problems) == 2 and all(re.match(r"source (sonniss|broken) failed", p) for p in problems), problems
    assert main(["verify", str(out)]) == 1
    assert "2 problem(s)" in capsys.readouterr().out
    assert main(["stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "source sonniss failed: sonniss needs --recipe-input" in printed and "source broken failed" in printed
    assert main(["stats", str(out), "--json"]) == 0
    assert '"broken": "input not found' in capsys.readouterr().out
    assert main(["sources", str(out)]) == 0
    assert f"{out}: source broken failed: input not found" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "2 source(s) of this recipe failed as a whole" in page and "Every listed item was kept" not in page


def test_failed_sources_read_from_a_planted_recipe_json_stay_one_line(tmp_path):
    from audio_dataset.recipe import failed_sources

    (tmp_path / "recipe.json").write_text('{"sources": {"x\\ny": {"status": "failed", "error": "' + "a" * 999
                                          + '"}, "ok": {"status": "done"}, "odd": [1]}}')
    assert failed_sources(tmp_path) == {"x y": "a" * 297 + "..."}
    (tmp_path / "recipe.json").write_text("[not json")
    assert list(failed_sources(tmp_path)) == ["recipe.json"]


@pytest.mark.usefixtures("ray_local")
def test_a_recipe_runs_hints_name_its_out_not_a_source_work_folder(tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    robin = next(REAL_AUDIO_DIR.glob("456440__*.ogg"))
    (clips / robin.name).write_bytes(robin.read_bytes())
    (clips / "broken.wav").write_bytes(b"RIFF not really audio")  # one item fails: the summary hints
    (tmp_path / "r.toml").write_text('name = "one"\n[[sources]]\nname = "clips"\nsource = "local"\n'
                                     'input = "./clips"\n[build]\nsplits = "train=1"\n')
    out = tmp_path / "out"
    assert main(["build", "--recipe", str(tmp_path / "r.toml"), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if line.startswith("list them:")]
    assert hints == [f"list them: audiodata failures {out} [--reason REASON]"], hints


def _read_only(monkeypatch: pytest.MonkeyPatch, dataset: Path) -> None:
    """Writes into `dataset` fail as on a read-only folder (the tests run as root, which chmod does not stop)."""
    real = storage.atomic_write_bytes

    def write(dest, data):
        if str(dest).startswith(str(dataset)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dataset / ".stats.png.tmp-1"))
        real(dest, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", write)


def test_stats_and_report_on_a_read_only_dataset(failed_recipe, monkeypatch, capsys, tmp_path):
    out, _ = failed_recipe
    _read_only(monkeypatch, out)
    assert main(["stats", str(out)]) == 0  # the figures are printed; the plot could not be saved
    captured = capsys.readouterr()
    assert "total" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "could not save the plot" in err[0] and "--out FILE" in err[0], err
    assert ".tmp" not in err[0]
    assert main(["stats", str(out), "--out", str(tmp_path / "plot.png")]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0 and "plot.png" in capsys.readouterr().err
    assert main(["report", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not save the report" in err[0] and ".tmp" not in err[0], err
    assert main(["report", str(out), "--out", str(tmp_path / "page.html")]) == 0
    assert (tmp_path / "page.html").read_text().startswith("<!doctype html>")
    capsys.readouterr()
    # An --out the user named that cannot be written is a usage error naming that file, not a temp file.
    assert main(["report", str(out), "--out", str(out / "elsewhere.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"audiodata: error: Permission denied: {out / 'elsewhere.html'}"], err


def test_a_usage_error_leaves_no_new_out_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    assert main(["build", "--source", "local", "--input", str(tmp_path / "empty"), "--out", str(out),
                 "--no-progress"]) == 2
    assert "no audio files" in capsys.readouterr().err and not out.exists()
    out.mkdir()  # a folder that was there before is the user's: left as it was
    assert main(["build", "--source", "local", "--input", str(tmp_path / "empty"), "--out", str(out),
                 "--no-progress"]) == 2
    assert out.is_dir()


def test_split_ratios_must_sum_to_one(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--source", "local", "--input", str(tmp_path), "--out", str(tmp_path / "o"),
              "--splits", "train=0.6,valid=0.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "must sum to 1, these sum to 1.1" in err[0], err
    from audio_dataset.cli import make_parser

    parsed = make_parser().parse_args(["build", "--source", "local", "--out", "o",
                                       "--splits", "train=0.9,valid=0.05,test=0.05"])
    assert sum(parsed.splits.values()) == pytest.approx(1)


@pytest.mark.parametrize("command", ["verify", "stats", "report", "failures"])
def test_a_dataset_that_does_not_exist_is_named_so(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip() == f"audiodata: error: {tmp_path / 'nope'} does not exist"


@pytest.mark.parametrize("argv, message", [
    (["embed", "DS", "--checkpoint", "missing.pt"], "--checkpoint missing.pt: not found"),
    (["search", "DS", "--audio", "missing.wav"], "--audio missing.wav: not found"),
])
def test_a_missing_file_is_named_before_torch_or_ray_load(argv, message, tmp_path):
    """Said in a second, not after torch, faiss and Ray have loaded (9 s on a laptop)."""
    (tmp_path / "ds").mkdir()
    argv = [str(tmp_path / "ds") if a == "DS" else a for a in argv]
    code = ("import sys; from audio_dataset.cli import main; code = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'ray', 'faiss') if m in sys.modules)); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout.strip() == "[]"


def _readme_bash_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"<!-- (?!/)[\w:]+ -->\s*```bash\n(.*?)```", readme, re.S)


def test_gitignore_covers_every_folder_the_readme_blocks_create():
    ignored = {line.strip() for line in (ROOT / ".gitignore").read_text().splitlines()}
    made = {m for block in _readme_bash_blocks() for m in re.findall(r"--out \./([\w.-]+)", block)}
    assert made >= {"out", "tour", "clips", "evalset", "clips-clean"}, made
    assert {f"/{name}/" for name in made} <= ignored


def test_the_readmes_own_recipe_loads_and_its_exclusion_lists_exist(tmp_path):
    readme = (ROOT / "README.md").read_text()
    toml = re.search(r'```toml\n(name = "my-corpus".*?)```', readme, re.S).group(1)
    (tmp_path / "my-corpus.toml").write_text(toml)
    recipe = load_recipe(str(tmp_path / "my-corpus.toml"))
    excludes = [path for entry in recipe.sources for path in entry.exclude]
    assert excludes and all(Path(path).is_file() for path in excludes), excludes


def test_only_failed_tests_keep_their_temp_folders(pytestconfig):
    """A passing suite leaves no model-sized files behind in the temp folder."""
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
