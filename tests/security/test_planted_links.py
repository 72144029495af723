"""Every name the toolkit writes in an output folder refuses a planted link (issue 16, C3/C4).

The names are not listed by hand: a real `build`, a real `filter` stage and a real `clap-train`
run record every path they write (Python audit events in this process: opens for writing,
renames, mkdirs, removals) and every path they leave (a walk afterwards, which also catches what
Ray workers wrote). Then, for each name, a fresh output gets a symbolic link planted at it,
pointing outside, the same command runs again, and the test checks that the command failed with
one line naming that path and that nothing outside the output changed (content, mode, mtime).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from audio_dataset import storage
from audio_dataset.cli import main as audiodata
from conftest import REAL_AUDIO_DIR

# The temp-name scheme every audio_dataset writer uses (storage.temp_sibling): `.NAME.tmp-PID-RANDOM`.
TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<random>[0-9a-f]{16})$")
# clap_model.files: a private `tempfile.mkdtemp(prefix=".NAME.")` folder beside the target.
CLAP_PRIVATE = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}$")
VICTIM_TEXT = b"a file outside the output folder\n"
VICTIM_MTIME_NS = 1_600_000_000_000_000_000


# --------------------------------------------------------------------------- recording what is written

_recording: list[tuple[str, str]] = []
_active: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if not _active:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or \
                 (mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            _recording.append(("open", os.fsdecode(path)))
    elif event in ("os.rename", "os.mkdir", "os.remove", "os.link"):
        _recording.append((event, os.fsdecode(args[1] if event in ("os.rename", "os.link") else args[0])))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside `_recorded`


@contextmanager
def _recorded() -> Iterator[list[tuple[str, str]]]:
    _recording.clear()
    _active.append(True)
    try:
        yield _recording
    finally:
        _active.clear()


def _names_under(out: Path, events: list[tuple[str, str]],
                 temp: re.Pattern = TEMP_NAME) -> tuple[set[str], set[str], set[str]]:
    """(files, folders, temp names) the run used under `out`, relative to it."""
    files, folders, temps = set(), set(), set()
    for event, path in events:
        rel = os.path.relpath(os.path.abspath(path), out)
        if rel == "." or rel.startswith(".."):
            continue
        is_temp = any(temp.match(part) for part in Path(rel).parts)
        (temps if is_temp else folders if event == "os.mkdir" else files).add(rel)
    for folder, dirs, names in os.walk(out):
        rel = os.path.relpath(folder, out)
        folders |= {os.path.normpath(os.path.join(rel, d)) for d in dirs}
        files |= {os.path.normpath(os.path.join(rel, n)) for n in names}
    for name in files | folders:  # every folder above a written name is a name too
        parent = os.path.dirname(name)
        while parent:
            folders.add(parent)
            parent = os.path.dirname(parent)
    return files - folders, folders, temps


# --------------------------------------------------------------------------- victims outside the output


class Victims:
    """A file and a folder outside every output: the targets of the planted links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.file = root / "victim.txt"
        self.folder = root / "victim_dir"
        self.folder.mkdir(parents=True)
        for path in (self.file, self.folder / "inside.txt"):
            path.write_bytes(VICTIM_TEXT)
            os.chmod(path, 0o600)
            os.utime(path, ns=(VICTIM_MTIME_NS, VICTIM_MTIME_NS))
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[str, int, int]]:
        found = {}
        for folder, _dirs, names in os.walk(self.root):
            for name in names:
                path = Path(folder, name)
                info = path.lstat()
                found[str(path.relative_to(self.root))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                           info.st_mode, info.st_mtime_ns)
        return found

    def unchanged(self) -> bool:
        return self.snapshot() == self.before


def _plant(out: Path, name: str, target: Path) -> Path:
    link = out / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())
    return link


def _check_each(names: list[str], victims: Victims, run: Callable[[Path], tuple[int, list[str]]],
                outputs: Path, folder: bool, one_line: bool = True) -> list[str]:
    """Plant a link at each name in a fresh output under `outputs`, run, and return what went wrong.
    `one_line`: the command must fail with one line naming the link; else only nothing outside may change."""
    problems = []
    for name in names:
        out = outputs / f"{'folder' if folder else 'file'}-{name.replace('/', '_')}"
        link = _plant(out, name, victims.folder if folder else victims.file)
        code, errors = run(out)
        expected = f"refusing to write {link}: it is a symbolic link"
        if not victims.unchanged():
            problems.append(f"{name}: a file outside the output changed")
            victims.before = victims.snapshot()
        if one_line and (code == 0 or len(errors) != 1 or not errors[0].endswith(expected)):
            problems.append(f"{name}: exit {code}, errors {errors}")
        if one_line and not link.is_symlink():
            problems.append(f"{name}: the planted link was replaced or removed")
    return problems


# --------------------------------------------------------------------------- audiodata build and filter


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("input")
    for path in sorted(REAL_AUDIO_DIR.glob("*.ogg"))[:3]:
        shutil.copy(path, folder / path.name)
    return folder


def _audiodata(capsys, argv: list[str], one_line: bool = True) -> tuple[int | str, list[str]]:
    capsys.readouterr()
    try:
        code: int | str = audiodata(argv)
    except Exception as exc:  # noqa: BLE001 - only with the output scan off: a read of a planted file failed
        assert not one_line, exc
        code = type(exc).__name__
    err = capsys.readouterr().err
    assert "Traceback" not in err or not one_line
    return code, [line for line in err.splitlines() if line.startswith("audiodata:")]


def _build_argv(clips: Path, out: Path) -> list[str]:
    return ["build", "--source", "local", "--input", str(clips), "--out", str(out), "--no-progress",
            "--workers", "2", "--samples-per-shard", "2"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, clips, ray_local) -> tuple[Path, list[tuple[str, str]]]:
    out = tmp_path_factory.mktemp("recorded") / "out"
    with _recorded() as events:
        assert audiodata(_build_argv(clips, out)) == 0
        recorded = list(events)
    return out, recorded


def test_temp_names_cannot_be_predicted(built, clips, monkeypatch) -> None:
    out, events = built
    _files, _folders, temps = _names_under(out, events)
    assert temps, "the build wrote through temp names"
    randoms = [TEMP_NAME.match(Path(t).name)["random"] for t in temps]
    assert len(set(randoms)) == len(randoms), "each temp name has its own random part"
    # Every link a planter could aim at the old, guessable scheme (`.NAME.tmp-PID`) is now just a
    # stray file: with the start-of-run scan off (it would refuse them), the same command succeeds
    # and writes through none of them.
    monkeypatch.setattr("audio_dataset.lock.check_output_tree", lambda out: None)
    again = out.parent / "again"
    victim = out.parent / "victim.txt"
    victim.write_bytes(VICTIM_TEXT)
    guessable = {str(Path(t).parent / f".{TEMP_NAME.match(Path(t).name)['name']}.tmp-{os.getpid()}") for t in temps}
    for name in guessable:
        _plant(again, name, victim)
    assert audiodata(_build_argv(clips, again)) == 0
    assert victim.read_bytes() == VICTIM_TEXT


def test_a_guessed_temp_name_is_refused_not_written_through(tmp_path, monkeypatch) -> None:
    """Were a temp name guessed, the exclusive, no-follow create refuses it in one line."""
    monkeypatch.setattr(storage.secrets, "token_hex", lambda n: "0" * (2 * n))
    victims = Victims(tmp_path / "outside")
    out = storage.trust_output(tmp_path / "out")
    link = _plant(Path(out.path), f".stats.json.tmp-{os.getpid()}-{'0' * 16}", victims.file)
    refused = f"^refusing to write {re.escape(str(link))}: it is a symbolic link$"
    with pytest.raises(storage.UnsafeOutput, match=refused):
        storage.atomic_write_json(out / "stats.json", {})
    assert victims.unchanged() and not (Path(out.path) / "stats.json").exists()


def test_every_file_the_build_writes_refuses_a_planted_link(built, clips, tmp_path, capsys) -> None:
    out, events = built
    files, _folders, _temps = _names_under(out, events)
    assert {".audiodata.lock", "manifest.parquet", "train/000000.tar", "train/.000000.tar.sha256",
            "_work/config.json"} <= files, sorted(files)
    victims = Victims(tmp_path / "outside")
    problems = _check_each(sorted(files), victims, lambda o: _audiodata(capsys, _build_argv(clips, o)),
                           tmp_path / "scanned", folder=False)
    assert not problems, "\n".join(problems)


def test_the_writers_themselves_never_write_through_a_planted_link(built, clips, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    """As if each link appeared after the start-of-run scan of the output: every writer refuses it
    by itself (a name read before it is written may fail otherwise, but nothing outside changes)."""
    monkeypatch.setattr("audio_dataset.lock.check_output_tree", lambda out: None)
    out, events = built
    files, folders, _temps = _names_under(out, events)
    victims = Victims(tmp_path / "outside")
    run = lambda o: _audiodata(capsys, _build_argv(clips, o), one_line=False)  # noqa: E731
    problems = _check_each(sorted(files), victims, run, tmp_path, folder=False, one_line=False)
    problems += _check_each(sorted(folders), victims, run, tmp_path, folder=True, one_line=False)
    assert not problems, "\n".join(problems)


def test_every_folder_the_build_makes_refuses_a_planted_link(built, clips, tmp_path, capsys) -> None:
    out, events = built
    _files, folders, _temps = _names_under(out, events)
    assert {"train", "_work", "_work/parts"} <= folders, sorted(folders)
    victims = Victims(tmp_path / "outside")
    problems = _check_each(sorted(folders), victims, lambda o: _audiodata(capsys, _build_argv(clips, o)),
                           tmp_path, folder=True)
    assert not problems, "\n".join(problems)


def _filter_argv(dataset: Path, out: Path) -> list[str]:
    return ["filter", str(dataset), "--out", str(out), "--min-seconds", "1", "--no-progress", "--workers", "1"]


def test_every_name_a_stage_writes_refuses_a_planted_link(built, tmp_path, capsys) -> None:
    dataset, _events = built
    recorded = tmp_path / "recorded"
    with _recorded() as events:
        assert audiodata(_filter_argv(dataset, recorded)) == 0
        files, folders, temps = _names_under(recorded, list(events))
    assert {".audiodata.lock", "filter_manifest.parquet", ".filter/run.json"} <= files and temps, sorted(files)
    victims = Victims(tmp_path / "outside")
    run = lambda o: _audiodata(capsys, _filter_argv(dataset, o))  # noqa: E731
    problems = _check_each(sorted(files), victims, run, tmp_path, folder=False)
    problems += _check_each(sorted(folders), victims, run, tmp_path, folder=True)
    assert not problems, "\n".join(problems)


def test_a_lock_shared_by_a_hard_link_is_refused(built, clips, tmp_path, capsys) -> None:
    """A hard link is no symbolic link, but writing the holder into it would still change the victim."""
    victims = Victims(tmp_path / "outside")
    out = tmp_path / "out"
    out.mkdir()
    os.link(victims.file, out / ".audiodata.lock")
    code, errors = _audiodata(capsys, _build_argv(clips, out))
    assert code == 1 and errors == [f"audiodata: error: refusing to write {out / '.audiodata.lock'}: "
                                    "it has another hard link"]
    assert victims.unchanged()


def test_stale_temp_sweep_does_not_walk_into_a_linked_folder(tmp_path) -> None:
    victims = Victims(tmp_path / "outside")
    stale = victims.folder / ".inside.txt.tmp-1-0123456789abcdef"
    stale.write_bytes(b"not the toolkit's to delete")
    victims.before = victims.snapshot()
    out = tmp_path / "out"
    _plant(out, "train", victims.folder)
    (out / ".x.tmp-1-0123456789abcdef").write_bytes(b"a stale temp")
    storage.remove_stale_temps(storage.location(out))
    assert victims.unchanged() and not (out / ".x.tmp-1-0123456789abcdef").exists()


# --------------------------------------------------------------------------- clap-train, clap-eval, clap-export


@pytest.fixture(scope="module")
def clap_shards(tmp_path_factory) -> Path:
    from test_clap_data import build_clap_shards  # tests/ is on sys.path (conftest)

    out = tmp_path_factory.mktemp("clap_shards")
    build_clap_shards(out, clips=8, seconds=2.0, per_shard=4)
    return out


def _clap_train(capsys, shards: Path, run: Path) -> tuple[int, list[str]]:
    from clap_model import main as clap_main

    pattern = f"{shards}/{{000000..000001}}.tar"
    capsys.readouterr()
    code = clap_main.main(["--train-data", pattern, "--val-data", pattern, "--model", "tiny", "--batch-size", "8",
                           "--workers", "0", "--epochs", "1", "--train-num-samples", "8", "--out", str(run),
                           "--shuffle-buffer", "8", "--seed", "3"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.splitlines() if line.startswith("clap-train:")]


@pytest.mark.usefixtures("one_torch_thread")
def test_every_name_clap_train_writes_refuses_a_planted_link(clap_shards, tmp_path, capsys) -> None:
    recorded = tmp_path / "recorded"
    with _recorded() as events:
        assert _clap_train(capsys, clap_shards, recorded)[0] == 0
        files, folders, temps = _names_under(recorded, list(events), CLAP_PRIVATE)
    files = {name for name in files if not name.startswith("tensorboard/")}  # event files: named by tensorboard
    assert {"latest.pt", "epoch_1.pt", "results.jsonl"} <= files and "tensorboard" in folders, (files, folders)
    private = {Path(name).parts[0] for name in temps}
    assert len(private) >= 2 and len({CLAP_PRIVATE.match(p)[0][-8:] for p in private}) == len(private), temps
    victims = Victims(tmp_path / "outside")
    run = lambda o: _clap_train(capsys, clap_shards, o)  # noqa: E731
    problems = _check_each(sorted(files), victims, run, tmp_path, folder=False)
    problems += _check_each(sorted(folders), victims, run, tmp_path, folder=True)
    assert not problems, "\n".join(problems)


@pytest.mark.usefixtures("one_torch_thread")
def test_clap_eval_out_and_clap_export_refuse_a_planted_link(clap_shards, tmp_path, capsys) -> None:
    from clap_model import evaluate as clap_eval
    from clap_model import export as clap_export
    from test_hf_format import TINY, _saved

    victims = Victims(tmp_path / "outside")
    _saved(TINY, tmp_path / "run.pt")
    metrics = _plant(tmp_path, "metrics.json", victims.file)
    assert clap_eval.main(["--checkpoint", str(tmp_path / "run.pt"), "--val-data", f"{clap_shards}/000000.tar",
                           "--batch-size", "4", "--workers", "0", "--out", str(metrics)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"clap-eval: error: refusing to write {metrics}: it is a symbolic link"
    exported = _plant(tmp_path, "hf", victims.folder)
    assert clap_export.main(["--checkpoint", str(tmp_path / "run.pt"), "--format", "hf", "--out", str(exported)]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"clap-export: error: refusing to write {exported}: it is a symbolic link"
    assert victims.unchanged()
    # The export's own scratch folder is private (mkdtemp): an export beside planted links succeeds.
    for name in (f".hf2.tmp-{os.getpid()}", ".hf2.tmp"):
        _plant(tmp_path, name, victims.folder)
    assert clap_export.main(["--checkpoint", str(tmp_path / "run.pt"), "--format", "hf", "--out", str(tmp_path / "hf2")]) == 0
    assert victims.unchanged() and (tmp_path / "hf2" / "config.json").is_file()


def test_the_output_scan_leaves_links_that_stay_inside(tmp_path) -> None:
    """An extracted archive may hold links among its own members: a resume is not refused for them,
    but a link leading out, even through one that stays inside, is."""
    victims = Victims(tmp_path / "outside")
    out = tmp_path / "out"
    members = out / "_work" / "source_state" / "extracted" / "pack"
    members.mkdir(parents=True)
    (members / "a.wav").write_bytes(b"RIFF")
    (members / "alias.wav").symlink_to("a.wav")
    storage.check_output_tree(storage.location(out))
    (members / "hop").symlink_to(out / "escape")
    (out / "escape").symlink_to(victims.file)
    with pytest.raises(storage.UnsafeOutput, match="it is a symbolic link$"):
        storage.check_output_tree(storage.location(out))


# --------------------------------------------------------------------------- writers of web sources' state


def test_a_download_into_a_planted_link_is_refused(loopback, fast_http_config, tmp_path) -> None:
    from audio_dataset.http import HttpClient

    victims = Victims(tmp_path / "outside")
    out = storage.trust_output(tmp_path / "out")
    url = loopback.add("/a.ogg", (REAL_AUDIO_DIR / "198-209-0000.ogg").read_bytes(), "audio/ogg")
    archives = Path(out.path) / "_work" / "source_state" / "archives"
    for dest, target in ((archives / "a.ogg", victims.file), (archives, victims.folder)):
        shutil.rmtree(Path(out.path), ignore_errors=True)
        _plant(Path(out.path), str(dest.relative_to(out.path)), target)
        with pytest.raises(storage.UnsafeOutput, match=f"^refusing to write {re.escape(str(archives))}"):
            HttpClient(fast_http_config).download(url, archives / "a.ogg", expect="audio")
        assert victims.unchanged()


def test_listing_pages_are_never_appended_through_a_planted_link(tmp_path) -> None:
    from audio_dataset.listing import PagedListing

    victims = Victims(tmp_path / "outside")
    state = Path(storage.trust_output(tmp_path / "out").path) / "_work" / "source_state"
    link = _plant(state.parent.parent, "_work/source_state/site.pages.jsonl", victims.file)
    listing = PagedListing(state, "site")  # the unreadable "state" is dropped: the link, not its target
    listing.append([{"id": 1}], None)
    assert victims.unchanged() and not link.is_symlink() and listing.pages_done == 1
    os.unlink(link)
    link.symlink_to(victims.file)
    with pytest.raises(storage.UnsafeOutput, match="site.pages.jsonl: it is a symbolic link$"):
        listing._write_line({"page": 1, "records": [], "next": None})  # a link that appears mid-listing
    assert victims.unchanged()


def test_the_ffmpeg_link_folder_in_a_shared_tmp_must_be_ours(tmp_path, monkeypatch) -> None:
    """yt-dlp runs `ffmpeg` from a fixed folder in /tmp: one that others can write is refused."""
    import imageio_ffmpeg

    from audio_dataset import youtube
    from audio_dataset.source import SourceError

    monkeypatch.setattr(youtube.tempfile, "gettempdir", lambda: str(tmp_path))
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: "/opt/imageio/ffmpeg-linux-x86_64-v7.0")
    monkeypatch.setattr(youtube, "_ffmpeg_dir", None)
    folder = tmp_path / f"audiodata-ffmpeg-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    with pytest.raises(SourceError, match="is not a folder only this user can write"):
        youtube.ffmpeg_dir()
    folder.chmod(0o700)
    assert youtube.ffmpeg_dir() == str(folder)
    assert os.readlink(folder / "ffmpeg") == "/opt/imageio/ffmpeg-linux-x86_64-v7.0"
