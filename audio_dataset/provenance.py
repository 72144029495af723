"""Provenance: what made an output (tool version, exact command, options, definition checksums,
start and end times), so a dataset can be rebuilt. Each run, resumed ones too, appends a record."""
from __future__ import annotations

import hashlib
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from upath import UPath

from audio_dataset import __version__
from audio_dataset.redaction import SECRET_NAME, mask_userinfo
from audio_dataset.source import UserError
from audio_dataset.storage import atomic_write_json, read_json

PROVENANCE_FILE = "provenance.json"
def mask_urls(value: Any) -> Any:
    """`s3://key:secret@host/x` -> `s3://***@host/x`, in strings and inside lists and dicts."""
    if isinstance(value, str):
        return mask_userinfo(value)
    if isinstance(value, dict):
        return {k: mask_urls(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_urls(v) for v in value]
    return value


def redact(args: list[str]) -> list[str]:
    """Blank the value of any secret-looking option (`--x-token V`, `token=V`, `--api-key=V`)."""
    clean: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            clean.append("***")
            hide_next = False
        elif "=" in arg and SECRET_NAME.search(arg.split("=", 1)[0]):
            clean.append(arg.split("=", 1)[0] + "=***")
        else:
            clean.append(mask_urls(arg))
            hide_next = arg.startswith("--") and bool(SECRET_NAME.search(arg))
    return clean


def redact_mapping(values: dict[str, Any]) -> dict[str, Any]:
    return {k: ("***" if SECRET_NAME.search(k) else mask_urls(v)) for k, v in values.items()}


def definition_checksums(names: list[str]) -> dict[str, str]:
    """sha256 of each shipped definition file (`manifests/<name>.toml`) the run used."""
    sums = {}
    for name in names:
        path = resources.files("manifests") / f"{name}.toml"
        if path.is_file():
            sums[f"{name}.toml"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return sums


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RunRecord:
    stage: str  # "build", "k2c", "keywords"
    options: dict[str, Any]
    command: list[str] = field(default_factory=lambda: redact(sys.argv))
    definitions: dict[str, str] = field(default_factory=dict)
    tool_version: str = __version__
    python: str = platform.python_version()
    started_at: str = field(default_factory=_now)
    finished_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "audiodata", "tool_version": self.tool_version, "stage": self.stage,
            "command": shlex.join(self.command), "options": redact_mapping(self.options),
            "definitions": self.definitions,
            "python": self.python, "started_at": self.started_at, "finished_at": self.finished_at,
        }


def read_runs(folder: UPath) -> list[dict[str, Any]]:
    """FOLDER/provenance.json's run records (none when it has no such file); one UserError line
    when the file is not a {"runs": [{...}, ...]} (it is data anyone may have edited)."""
    path = folder / PROVENANCE_FILE
    if not path.exists():
        return []
    runs = read_json(path).get("runs")
    if not isinstance(runs, list) or not all(isinstance(run, dict) for run in runs):
        raise UserError(f"{path}: unreadable (its runs are not a list of records)")
    return runs


def record_run(out: UPath, record: RunRecord) -> None:
    """Append the finished run to OUT/provenance.json (atomically rewritten)."""
    record.finished_at = _now()
    runs = read_runs(out)
    runs.append(record.to_dict())
    atomic_write_json(out / PROVENANCE_FILE, {"runs": runs})
