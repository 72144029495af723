"""What the benchmark sources (esc50, us8k, gtzan, fsd50k, vggsound) share: the sample fields the
benchmark suite reads, and an official distribution read as it ships, a folder or an archive.

Every benchmark sample carries, beside `text` (the labels as readable phrases, "air conditioner")
and `tag` (the labels as the dataset spells them, "air_conditioner"), these JSON fields:
- `class_labels`: list[str], the dataset's own label names;
- `class_ids`: list[int], where the dataset numbers its classes (ESC-50 `target`, US8K `classID`),
  absent otherwise;
- `fold`: int or null (ESC-50 1-5, US8K 1-10);
- `benchmark_split`: the dataset's own split name ("train", "val", "test", "eval", or "all").

A distribution is a folder (the archive extracted) or an archive, by path or URL; its files are
named by their path below the distribution's top folder ("meta/esc50.csv"), which is found wherever
the archive or folder puts it (ESC-50's zip wraps everything in `ESC-50-master/`). Archives are read
through `ArchiveStore` (downloaded once, checked extraction); names from the dataset's CSVs are held
to plain relative paths, and a folder's file is read only when it resolves inside the folder.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar

from audio_dataset.http import HttpClient, HttpConfig
from audio_dataset.source import Item, ItemError, Source, SourceConfig, SourceError, UserError
from pipelines._archives import MAX_MEMBER_BYTES, ArchiveStore, is_archive_name, safe_member_name
from pipelines._common import check_options, is_url

ALL = "all"  # benchmark_split of a dataset that has folds, not splits


def readable(label: str) -> str:
    """A label as a phrase: "air_conditioner" -> "air conditioner", "Accelerating_and_revving" ->
    "Accelerating and revving" (the label formatting every CLAP zero-shot protocol applies)."""
    return " ".join(label.replace("_", " ").split())


def benchmark_fields(labels: list[str], split: str, fold: int | None = None,
                     ids: list[int] | None = None) -> dict[str, Any]:
    """The sample fields above (`class_ids` only where the dataset has ids)."""
    fields: dict[str, Any] = {"class_labels": list(labels), "fold": fold, "benchmark_split": split}
    if ids is not None:
        fields["class_ids"] = list(ids)
    return fields


def label_text(labels: list[str]) -> list[str]:
    """`text` of a benchmark sample: one readable phrase per label, in the dataset's order."""
    return [readable(label) for label in labels]


class Distribution:
    """A dataset as distributed: a folder, or an archive at a path or URL (pickled to workers)."""

    def __init__(self, location: str, store: ArchiveStore, what: str) -> None:
        self.location = location
        self.store = store
        self.what = what
        self.is_folder = not is_url(location) and not is_archive_name(location) \
            and Path(location).expanduser().is_dir()
        self._names: list[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _names=None)  # workers read by name; the listing stays here

    def check(self) -> None:
        if self.is_folder or is_url(self.location):
            return
        path = Path(self.location).expanduser()
        if not path.exists():
            raise UserError(f"{self.what} not found: {path}")
        if not is_archive_name(path.name):
            raise UserError(f"{self.what} must be a folder or a .zip/.tar.gz archive, not {path.name}")

    def names(self) -> list[str]:
        """Every file's path (POSIX, relative to the folder; an archive's regular members)."""
        if self._names is None:
            if self.is_folder:
                root = Path(self.location).expanduser()
                self._names = sorted(
                    (Path(folder) / name).relative_to(root).as_posix()
                    for folder, _, files in os.walk(root) for name in files)  # links to folders not walked
            else:
                self._names = self.store.members(self.location)
        return self._names

    def top(self, tail: str) -> str:
        """The prefix ("" or "ESC-50-master/") under which the distribution keeps `tail`, the file that
        marks its top folder; the shallowest copy wins (a nested duplicate is not the dataset)."""
        tail = tail.strip("/")
        found = [name for name in self.names() if name == tail or name.endswith("/" + tail)]
        found = [name for name in found if "__MACOSX/" not in name]
        if not found:
            raise UserError(f"{self.location} holds no {tail}: is it the {self.what}?")
        best = min(found, key=lambda name: (name.count("/"), name))
        return best[: len(best) - len(tail)]

    def read_text(self, name: str) -> str:
        try:
            data = self.read(name)
        except ItemError as exc:
            raise SourceError(f"cannot read {name} from {self.location}: {exc}") from None
        return data.decode("utf-8-sig", errors="replace")

    def read(self, name: str) -> bytes:
        """A file's bytes; ItemError (`missing_file`, `bad_file_name`...) when it cannot be had."""
        plain = safe_member_name(name)
        if plain is None:
            raise ItemError("bad_file_name", f"{name!r} is not a plain relative path")
        if not self.is_folder:
            return self.store.read(self.location, plain)
        return _read_inside(Path(self.location).expanduser(), plain)


def _read_inside(root: Path, name: str) -> bytes:
    """A regular file below `root` (links allowed only when they stay inside it), size-capped."""
    path = root / name
    try:
        if not path.resolve().is_relative_to(root.resolve()):
            raise ItemError("bad_file_name", f"{name} leads outside {root}")
        # Non-blocking, so a FIFO put there cannot hang the worker; only a regular file is read.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(descriptor, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ItemError("not_a_file", f"{name} is not a regular file")
            data = handle.read(MAX_MEMBER_BYTES + 1)
    except FileNotFoundError:
        raise ItemError("missing_file", f"{name} is not in {root}") from None
    except OSError as exc:
        raise ItemError("read_error", f"{name}: {exc.strerror or exc}") from None
    if len(data) > MAX_MEMBER_BYTES:
        raise ItemError("too_large", f"{name}: over {MAX_MEMBER_BYTES:,} bytes")
    return data


def member_path(top: str, *parts: str) -> str:
    """`top` + the parts joined, as one POSIX path (the parts come from the dataset's CSV)."""
    return top + str(PurePosixPath(*parts))


class DistributionSource(Source):
    """A benchmark read from one distribution (`--input`: folder, archive path or URL; the official
    download by default). Items' locators are file names in the distribution."""

    fetch_concurrency: ClassVar[int] = 8  # local reads once the archive is in place
    default_location: ClassVar[str]
    title: ClassVar[str]  # "the ESC-50 archive", in messages
    options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: SourceConfig) -> None:
        super().__init__(config)
        self.client = HttpClient(HttpConfig.for_source(config, max_bytes=64 * 2**30))
        self.store = ArchiveStore(config.state_dir, self.client)
        self.distribution = Distribution(config.input or self.default_location, self.store, self.title)

    def check(self) -> None:
        check_options(self.name, self.config.options, set(self.options))
        self.distribution.check()

    def fetch(self, item: Item) -> bytes:
        return self.distribution.read(item.locator)


def int_field(row: dict[str, str], name: str) -> int:
    """A CSV cell as an int; ValueError names the column (the row then fails alone)."""
    try:
        return int(row.get(name, "").strip())
    except ValueError:
        raise ValueError(f"{name} {row.get(name)!r} is not a whole number") from None
