"""`audiodata attribution` reads a dataset's shards and provenance as untrusted data and writes only
inside the folder it was given: a planted link is refused, hostile JSON is data, never a traceback."""
from __future__ import annotations

import json
import os
from pathlib import Path

from audio_dataset.cli import main
from audio_dataset.shards import ShardWriter


def _meta(source_id: str, **fields: object) -> bytes:
    meta = {"text": ["a sound"], "tag": [], "original_data": {}, "source": "local", "source_id": source_id,
            "license": "CC-BY 4.0", "author": "Ann", "url": "https://example.org/a", "duration": 1.0,
            "sample_rate": 16000, "channels": 1, "segment": None, **fields}
    return json.dumps(meta).encode()


def _dataset(root: Path, provenance: bytes | None = None) -> Path:
    out = root / "ds"
    with ShardWriter(out / "train" / "000000.tar") as writer:
        writer.write({"__key__": "a", "flac": b"not decoded here", "json": _meta("a.ogg")})
        writer.write({"__key__": "b", "flac": b"x", "json": _meta("b\x1b[31m.ogg", author="\x1b]0;pwned\x07",
                                                                  url="javascript:alert(1)")})
        writer.write({"__key__": "c", "flac": b"x", "json": b"[" * 5000})  # a hostile member: named, skipped
    (out / "manifest.parquet").write_bytes(b"")  # the command asks only that it exists
    if provenance is not None:
        (out / "provenance.json").write_bytes(provenance)
    return out


def test_a_planted_attribution_link_is_refused(tmp_path: Path, capsys) -> None:
    out = _dataset(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "attribution")
    assert main(["attribution", str(out)]) == 1
    assert "refusing to write" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []


def test_hostile_provenance_and_json_are_data(tmp_path: Path, capsys) -> None:
    deep = b'{"runs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    out = _dataset(tmp_path, provenance=deep)
    code = main(["attribution", str(out), "--out", str(tmp_path / "credits")])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert "damaged shard" in captured.err and "sample c" in captured.err
    tsv = (tmp_path / "credits" / "train.tsv").read_text()
    assert "\x1b" not in tsv and "\\x1b]0;pwned\\x07" in tsv and tsv.count("\n") == 3
    md = (tmp_path / "credits" / "train.md").read_text()
    assert "\x1b" not in md and "](javascript" not in md
    assert "changes: resampled to 16 kHz mono, FLAC." in md  # from the samples: provenance was not usable
