"""Hostile build inputs (issue 16, build side; issue 17 item 3): each is bounded before it is read,
ends in a named reason for its own item (or one line for a whole table), and the run goes on with
exactly one manifest row per input. Memory findings run in a child under an RLIMIT_AS cap."""
from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile

from audio_dataset import manifest
from audio_dataset.cli import main
from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import ItemError, SourceConfig, load_source
from conftest import REAL_AUDIO_DIR
from pipelines import _archives
from pipelines._archives import MAX_MEMBER_BYTES, MAX_RATIO, ArchiveStore
from pipelines.local import MAX_SIDECAR_BYTES, MAX_TABLE_COLUMNS, MAX_TABLE_ROW_CHARS

ROOT = Path(__file__).resolve().parents[2]
ROBIN = REAL_AUDIO_DIR / "456440__inspectorj__bird-whistling-robin-single-13.ogg"
BAD_NAME = b"caf\xe9-latin1.ogg"  # a Latin-1 name: not UTF-8
ESCAPE_NAME = "\x1b[2Jclear.ogg"  # a terminal escape in a file name


def _one_hz_wav() -> bytes:
    """400 KB of 16-bit noise declared at 1 Hz: resampled to 48 kHz it would be ~38 GB of float32."""
    buffer = io.BytesIO()
    noise = (np.random.default_rng(0).random(200_000, dtype=np.float32) - 0.5) * 0.5
    soundfile.write(buffer, noise, 1, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _run_capped(code: str, headroom_mb: int) -> subprocess.CompletedProcess:
    """`code` in a child whose address space is capped at what its imports took plus `headroom_mb`
    (measured in the child after the imports, so the cap is the same on every machine)."""
    prelude = textwrap.dedent(f"""
        import resource
        import audio_dataset.audio, pipelines.local, pipelines._archives, pipelines.wavcaps
        with open("/proc/self/statm") as handle:
            used = int(handle.read().split()[0]) * resource.getpagesize()
        cap = used + {headroom_mb} * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    """)
    paths = [str(ROOT), str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=240, env=env)


# --------------------------------------------------------------------------- one local build

@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "in"
    folder.mkdir()
    shutil.copy(ROBIN, folder / "ok.ogg")
    (folder / "one-hz.wav").write_bytes(_one_hz_wav())
    shutil.copy(ROBIN, folder / "big-sidecar.ogg")  # a valid sidecar, just over the cap
    pad = "a" * (MAX_SIDECAR_BYTES + 10)
    (folder / "big-sidecar.json").write_text(json.dumps({"text": "a robin", "pad": pad}), encoding="utf-8")
    shutil.copy(ROBIN, folder / "climb.ogg")
    (folder / "climb.json").write_text(json.dumps({"text": "a robin", "split": "../../etc"}), encoding="utf-8")
    shutil.copy(ROBIN, os.path.join(os.fsencode(folder), BAD_NAME))
    os.mkfifo(folder / "fifo.wav")
    (folder / "zero.wav").symlink_to("/dev/zero")
    (folder / "=HYPERLINK(1).ogg").write_bytes(b"not audio at all")
    (folder / ESCAPE_NAME).write_bytes(b"not audio either")
    return folder


EXPECTED = {
    "ok.ogg": ("ok", None),
    "one-hz.wav": ("dropped", "low_source_rate"),
    "big-sidecar.ogg": ("failed", "bad_sidecar"),
    "climb.ogg": ("failed", "bad_split"),
    "caf\\xe9-latin1.ogg": ("failed", "bad_file_name"),
    "fifo.wav": ("failed", "not_a_file"),
    "zero.wav": ("failed", "not_a_file"),
    "=HYPERLINK(1).ogg": ("failed", "not_audio"),
    ESCAPE_NAME: ("failed", "not_audio"),
}


@pytest.fixture(scope="module")
def hostile_build(hostile_folder: Path) -> tuple[Path, dict[str, dict]]:
    out = hostile_folder.parent / "out"
    assert main(["build", "--source", "local", "--input", str(hostile_folder), "--out", str(out),
                 "--workers", "1", "--splits", "train=1", "--no-progress"]) == 0
    rows = manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()
    assert len(rows) == len({row["source_id"] for row in rows})
    return out, {row["source_id"]: row for row in rows}


def test_every_hostile_file_gets_one_row_with_a_named_reason(hostile_build) -> None:
    out, rows = hostile_build
    assert {sid: (row["status"], row["error"]) for sid, row in rows.items()} == EXPECTED
    assert "1 Hz" in rows["one-hz.wav"]["error_detail"]
    assert "over 1,048,576 bytes" in rows["big-sidecar.ogg"]["error_detail"]
    assert "FIFO" in rows["fifo.wav"]["error_detail"] and "device" in rows["zero.wav"]["error_detail"]
    # Nothing written outside OUT by the climbing split, and no sample holds the big sidecar.
    assert not list(out.parent.parent.rglob("etc")) and not (out.parent / "etc").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["_work", "train"]
    assert max(p.stat().st_size for p in (out / "train").glob("*.tar")) < MAX_SIDECAR_BYTES


def test_the_failures_tsv_is_inert_in_spreadsheets_and_terminals(hostile_build, capfd) -> None:
    out, _ = hostile_build
    capfd.readouterr()
    assert main(["failures", str(out)]) == 0
    text = capfd.readouterr().out
    assert "\x1b" not in text and "\\x1b[2Jclear.ogg" in text
    cells = [cell for line in text.splitlines()[1:] for cell in line.split("\t")]
    assert "'=HYPERLINK(1).ogg" in cells
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells)
    assert all(len(line.split("\t")) == 7 for line in text.splitlines())


def test_a_one_hz_wav_is_dropped_from_its_header_under_a_memory_cap(tmp_path: Path) -> None:
    wav = tmp_path / "one-hz.wav"
    wav.write_bytes(_one_hz_wav())
    result = _run_capped(f"""
        from pathlib import Path
        from audio_dataset.audio import AudioConfig, scan
        from audio_dataset.source import ItemError
        for config in (AudioConfig(), AudioConfig(min_source_rate=0)):
            try:
                scan(Path({str(wav)!r}), config)
            except ItemError as exc:
                print(exc.reason)
    """, headroom_mb=512)
    assert result.returncode == 0, result.stderr[-2000:]
    # The minimum rate drops it unread; with no minimum, 1 Hz is still no audio header we decode.
    assert result.stdout.split() == ["low_source_rate", "bad_audio_header"]


def test_a_header_with_too_many_channels_is_refused_before_decoding() -> None:
    from audio_dataset.audio import MAX_HEADER_CHANNELS, AudioConfig, scan

    buffer = io.BytesIO()
    noise = np.random.default_rng(1).random((4800, 100), dtype=np.float32) * 0.1
    soundfile.write(buffer, noise, 48_000, format="WAV", subtype="PCM_16")
    with pytest.raises(ItemError) as info:
        scan(buffer.getvalue(), AudioConfig())
    assert info.value.reason == "bad_audio_header" and f"over {MAX_HEADER_CHANNELS}" in info.value.detail


# --------------------------------------------------------------------------- tables

def _table_error(capsys, table: Path, out: Path) -> str:
    capsys.readouterr()
    assert main(["build", "--source", "local", "--input", str(table), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_a_csv_row_over_the_cap_is_one_line(tmp_path: Path, capsys) -> None:
    shutil.copy(ROBIN, tmp_path / "robin.ogg")
    table = tmp_path / "items.csv"
    table.write_text(f"path,caption\nrobin.ogg,a robin\nrobin.ogg,{'x' * (MAX_TABLE_ROW_CHARS + 1)}\n")
    assert f"over {MAX_TABLE_ROW_CHARS:,} characters" in _table_error(capsys, table, tmp_path / "out")
    # Quoted fields spread over many short lines are one row: the cap counts the row, not a line.
    field = '"' + "\n".join(["y" * 1000] * 120) + '"'  # each under the field limit, nine together over the row cap
    header = ",".join(["path", "caption", *(f"c{i}" for i in range(8))])
    table.write_text(f"{header}\nrobin.ogg," + ",".join([field] * 9) + "\n")
    assert "characters" in _table_error(capsys, table, tmp_path / "out2")


def test_a_csv_field_over_the_cap_and_too_many_columns_are_one_line(tmp_path: Path, capsys) -> None:
    shutil.copy(ROBIN, tmp_path / "robin.ogg")
    table = tmp_path / "items.tsv"
    table.write_text(f"path\tcaption\nrobin.ogg\t{'x' * 200_000}\n")
    err = _table_error(capsys, table, tmp_path / "out")
    assert "field" in err and ("131072" in err or "131,072" in err)
    wide = tmp_path / "wide.csv"
    extra = [f"c{i}" for i in range(MAX_TABLE_COLUMNS)]
    wide.write_text(",".join(["path", "caption", *extra]) + "\n" + ",".join(["robin.ogg", "a robin", *extra]) + "\n")
    assert f"over {MAX_TABLE_COLUMNS:,}" in _table_error(capsys, wide, tmp_path / "out2")


def test_a_one_gigabyte_csv_line_is_refused_within_a_memory_cap(tmp_path: Path) -> None:
    table = tmp_path / "items.csv"
    with open(table, "w") as handle:
        handle.write("path,caption\nrobin.ogg,")
        for _ in range(64):  # 64 MiB here stands for the 1 GB line: the cap is 256 MiB of headroom
            handle.write("x" * 2**20)
        handle.write("\n")
    result = _run_capped(f"""
        from pipelines.local import LocalSource
        from audio_dataset.source import SourceConfig, UserError
        try:
            LocalSource(SourceConfig(input={str(table)!r})).list_batches()
        except UserError as exc:
            print("refused:", exc)
    """, headroom_mb=256)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("refused:") and "characters" in result.stdout


def test_a_parquet_table_with_a_binary_column_is_one_line(tmp_path: Path, capsys) -> None:
    shutil.copy(ROBIN, tmp_path / "robin.ogg")
    table = tmp_path / "items.parquet"
    pq.write_table(pa.table({"path": ["robin.ogg"], "caption": ["a robin"], "blob": pa.array([b"\xff\x00"])}), table)
    assert "column 'blob' holds bytes" in _table_error(capsys, table, tmp_path / "out")


# --------------------------------------------------------------------------- archives

def _store(tmp_path: Path) -> ArchiveStore:
    return ArchiveStore(tmp_path / "state", HttpClient(HttpConfig()))


def _bomb_zip(path: Path, good: bytes, bomb_bytes: int) -> None:
    """A zip holding a real clip and a member of `bomb_bytes` zeros (deflated ~1000x)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("clips/2219.flac", good)
        with archive.open("clips/2218.flac", "w", force_zip64=True) as member:
            block = bytes(2**20)
            for _ in range(bomb_bytes // 2**20):
                member.write(block)


def test_a_wavcaps_zip_bomb_fails_its_item_and_the_build_goes_on(tmp_path: Path) -> None:
    fixture = ROOT / "tests" / "fixtures" / "wavcaps" / "json_files"
    root = tmp_path / "wavcaps"
    shutil.copytree(fixture, root / "json_files")
    (root / "Zip_files" / "SoundBible").mkdir(parents=True)
    buffer = io.BytesIO()
    audio, rate = soundfile.read(ROBIN, dtype="float32")
    soundfile.write(buffer, audio[: rate * 2], rate, format="FLAC")
    bomb = root / "Zip_files" / "SoundBible" / "SoundBible.zip"
    _bomb_zip(bomb, buffer.getvalue(), 256 * 2**20)
    assert bomb.stat().st_size < 2 * 2**20  # 256 MiB unpacked from under 2 MiB
    out = tmp_path / "out"
    assert main(["build", "--source", "wavcaps", "--input", str(root), "--out", str(out), "--workers", "1",
                 "--splits", "train=1", "--no-progress", "--source-option", "subsets=SoundBible",
                 "--source-option", "blacklist=none"]) == 0
    rows = {row["source_id"]: row for row in manifest.read_table(out / manifest.MANIFEST_FILE).to_pylist()}
    assert {sid: (row["status"], row["error"]) for sid, row in rows.items()} == {
        "SoundBible/2219": ("ok", None), "SoundBible/2218": ("failed", "bad_archive_member")}
    assert f"over {MAX_RATIO}x" in rows["SoundBible/2218"]["error_detail"]

    # The same member read in a child with 128 MiB of headroom: refused before anything is inflated.
    result = _run_capped(f"""
        from pathlib import Path
        from audio_dataset.http import HttpClient, HttpConfig
        from audio_dataset.source import ItemError
        from pipelines._archives import ArchiveStore
        try:
            ArchiveStore(Path({str(tmp_path / 'state')!r}), HttpClient(HttpConfig())).read(
                {str(bomb)!r}, "clips/2218.flac")
        except ItemError as exc:
            print(exc.reason)
    """, headroom_mb=128)
    assert result.returncode == 0 and result.stdout.split() == ["bad_archive_member"], result.stderr[-2000:]


def test_a_zip_member_declared_over_the_size_cap_is_too_large(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("a.flac", os.urandom(4096))
    monkeypatch.setattr(_archives, "MAX_MEMBER_BYTES", 1024)  # rather than writing a 1 GiB member
    with pytest.raises(ItemError) as info:
        _store(tmp_path).read(str(path), "a.flac")
    assert info.value.reason == "too_large"
    assert MAX_MEMBER_BYTES == 2**30


def _hostile_tar(path: Path, mode: str = "w:gz") -> None:
    """One good member among a climbing name, an absolute one, links, a FIFO, a device, a setuid file."""
    good = ROBIN.read_bytes()
    with tarfile.open(path, mode) as archive:
        def add(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", **fields) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            for key, value in fields.items():
                setattr(info, key, value)
            archive.addfile(info, io.BytesIO(data) if data else None)

        add("pack/", tarfile.DIRTYPE, mode=0o777)
        add("pack/robin.ogg", data=good, mode=0o6777)
        add("../escaped.ogg", data=good)
        add("/tmp/absolute-from-tar.ogg", data=good)
        add("pack/passwd.ogg", tarfile.SYMTYPE, linkname="/etc/passwd")
        add("pack/hard.ogg", tarfile.LNKTYPE, linkname="/etc/passwd")
        add("pack/fifo.ogg", tarfile.FIFOTYPE)
        add("pack/null.ogg", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("pack/./robin-again.ogg", data=good)


def _check_extracted(store: ArchiveStore, tar: Path, tmp_path: Path) -> None:
    assert store.read(str(tar), "pack/robin.ogg") == ROBIN.read_bytes()
    assert store.read(str(tar), "pack/./robin-again.ogg") == ROBIN.read_bytes()
    for member in ("pack/passwd.ogg", "pack/hard.ogg", "pack/fifo.ogg", "pack/null.ogg", "../escaped.ogg",
                   "/tmp/absolute-from-tar.ogg"):
        with pytest.raises(ItemError) as info:
            store.read(str(tar), member)
        assert info.value.reason == "missing_member"
    assert store.members(str(tar)) == ["pack/robin.ogg", "pack/robin-again.ogg"]
    extracted = next((tmp_path / "state" / "extracted").glob("*-hostile"))
    files = sorted(p.relative_to(extracted).as_posix() for p in extracted.rglob("*"))
    assert files == ["pack", "pack/robin-again.ogg", "pack/robin.ogg"]
    assert stat.S_IMODE((extracted / "pack" / "robin.ogg").stat().st_mode) & 0o7022 == 0
    assert not (tmp_path / "state" / "escaped.ogg").exists() and not (tmp_path / "escaped.ogg").exists()


def test_tar_members_are_checked_by_us_even_where_extractall_has_no_filter(tmp_path: Path, monkeypatch) -> None:
    """Python 3.11.0-3.11.3 (Debian 12) has no extractall(filter=): simulate that tarfile."""
    def old_extractall(self, path=".", members=None, *, numeric_owner=False):  # 3.11.2's signature
        raise AssertionError("extraction must not depend on tarfile.extractall")

    monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    tar = tmp_path / "hostile.tar.gz"
    _hostile_tar(tar)
    _check_extracted(_store(tmp_path), tar, tmp_path)
    assert not Path("/tmp/absolute-from-tar.ogg").exists()


def test_a_tar_member_over_the_size_cap_fails_alone(tmp_path: Path, monkeypatch) -> None:
    tar = tmp_path / "pack.tar"
    with tarfile.open(tar, "w") as archive:
        for name, data in (("big.ogg", os.urandom(8192)), ("robin.ogg", ROBIN.read_bytes()[:4096])):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(_archives, "MAX_MEMBER_BYTES", 6000)
    store = _store(tmp_path)
    with pytest.raises(ItemError) as info:
        store.read(str(tar), "big.ogg")
    assert info.value.reason == "too_large"
    assert store.read(str(tar), "robin.ogg") == ROBIN.read_bytes()[:4096]


def test_a_tar_that_would_expand_past_the_ratio_is_bad_archive(tmp_path: Path) -> None:
    tar = tmp_path / "bomb.tar.xz"
    with tarfile.open(tar, "w:xz") as archive:
        info = tarfile.TarInfo("zeros.ogg")
        info.size = 64 * 2**20
        archive.addfile(info, io.BytesIO(bytes(info.size)))
    assert tar.stat().st_size * MAX_RATIO < info.size
    with pytest.raises(ItemError) as raised:
        _store(tmp_path).read(str(tar), "zeros.ogg")
    assert raised.value.reason == "bad_archive" and "compression bomb" in raised.value.detail
    assert not list((tmp_path / "state" / "extracted").glob("*zeros*"))


def test_a_tar_gz_whose_pax_header_declares_hundreds_of_megabytes_is_refused_unread(tmp_path: Path) -> None:
    """tarfile reads a pax header whole: 384 MiB of zeros in ~400 KB of gzip, under 128 MiB of headroom."""
    import gzip

    tar = tmp_path / "pax-bomb.tar.gz"
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type, pax.size = tarfile.XHDTYPE, 384 * 2**20
    good = tarfile.TarInfo("robin.ogg")
    good.size = 512
    with gzip.open(tar, "wb", compresslevel=1) as stream:
        stream.write(pax.tobuf(tarfile.USTAR_FORMAT))
        for _ in range(pax.size // 2**20):
            stream.write(bytes(2**20))
        stream.write(good.tobuf(tarfile.USTAR_FORMAT) + bytes(512) + bytes(1024))
    result = _run_capped(f"""
        from pathlib import Path
        from audio_dataset.http import HttpClient, HttpConfig
        from audio_dataset.source import SourceError
        from pipelines._archives import ArchiveStore
        try:
            ArchiveStore(Path({str(tmp_path / 'state')!r}), HttpClient(HttpConfig())).members({str(tar)!r})
        except SourceError as exc:
            print("refused:", exc)
    """, headroom_mb=128)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("refused:") and "metadata header" in result.stdout


# --------------------------------------------------------------------------- Freesound

def test_a_403_from_a_redirect_target_fails_that_item_not_the_credentials(loopback, real_clips, tmp_path,
                                                                         monkeypatch) -> None:
    from test_source_freesound import API_KEY, FAST, OAUTH, FakeFreesound

    monkeypatch.setenv("FREESOUND_API_KEY", API_KEY)
    monkeypatch.setenv("FREESOUND_OAUTH_TOKEN", OAUTH)
    api = FakeFreesound(loopback, real_clips)
    loopback.fault("/media/originals/456440.ogg", "403", times=None)
    config = SourceConfig(base_url=api.api, options={**FAST, "query": "robin", "download": "original"},
                          state_dir=tmp_path)
    source = load_source("freesound", config)
    item = next(source.list_items())
    with pytest.raises(ItemError) as info:
        source.fetch(item)
    assert info.value.reason == "http_4xx" and "redirected from" in info.value.detail
    assert OAUTH not in info.value.detail
