"""The manifest: one row per input item with its outcome. The one place its schema is defined.

`status` is `ok`, `dropped` (a length/quality policy removed it), `failed` (it could not be fetched
or decoded) or `excluded` (an exclusion list named it: reason `excluded`; or its site opts out of
such use: reason `opted_out`, the signal in `error_detail`); `error` holds the named reason otherwise.
A curation stage that drops samples (filter, dedup --apply) writes its output's manifest from its
input's: an item it dropped whole becomes `dropped` with the reason `STAGE:REASON` (`filter:too_short`,
`dedup:duplicate`) and the detail in `error_detail`; an item it dropped in part keeps its other samples.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from audio_dataset.licenses import classify
from audio_dataset.storage import Location, StagedFile, atomic_write_bytes, location

STATUS_OK = "ok"
STATUS_DROPPED = "dropped"
STATUS_FAILED = "failed"
STATUS_EXCLUDED = "excluded"
STATUSES = (STATUS_OK, STATUS_DROPPED, STATUS_FAILED, STATUS_EXCLUDED)

# Reasons that come from a policy (the item was fine, we chose not to keep it).
DROP_REASONS = frozenset({"too_short", "too_long", "silent", "low_source_rate"})
# The reason of an item whose site opts out (robots.txt, X-Robots-Tag, TDM-Rep: audio_dataset.optout).
OPTED_OUT = "opted_out"
# Reasons an item is left out before it is used: an exclusion list, or the site's opt-out.
EXCLUDE_REASONS = frozenset({STATUS_EXCLUDED, OPTED_OUT})
# Reasons that say more about the moment than the item (a server error, a slow or broken
# connection, a worker that died): what `build --retry-failed` retries when given no reasons.
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_5xx", "http_429", "stalled",
                               "truncated_body", "too_slow", "worker_died"})

MANIFEST_FILE = "manifest.parquet"

SCHEMA = pa.schema([
    pa.field("source", pa.string(), nullable=False),
    pa.field("source_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("shard", pa.string()),  # "<split>/NNNNNN.tar" the item was assigned to
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("error_detail", pa.string()),
    pa.field("sample_keys", pa.list_(pa.string()), nullable=False),
    pa.field("n_samples", pa.int32(), nullable=False),
    pa.field("source_duration", pa.float64()),  # seconds, as decoded
    pa.field("output_duration", pa.float64(), nullable=False),  # seconds written
    pa.field("source_sample_rate", pa.int32()),
    pa.field("source_channels", pa.int32()),
    pa.field("source_codec", pa.string()),
    pa.field("source_bytes", pa.int64()),
    pa.field("sha256", pa.string()),  # of the source bytes
    pa.field("url", pa.string()),
    pa.field("license", pa.string()),
    # The licence normalised (audio_dataset/licenses.py): SPDX or named id, and its class. Manifests
    # written before these columns are read with them derived from `license` (see `_conform`).
    pa.field("license_id", pa.string()),
    pa.field("license_class", pa.string()),
    # Level and channels (see README "What a build writes"): the gain that fitted the peak under
    # full scale, samples clipped (--clipping clip), how channels were combined and whether it cancelled.
    pa.field("gain_db", pa.float64()),
    pa.field("clipped_samples", pa.int64()),
    pa.field("downmix", pa.string()),
    pa.field("downmix_db", pa.float64()),
    pa.field("downmix_cancels", pa.bool_()),
    pa.field("captions_truncated", pa.int32()),  # captions cut at schema.MAX_CAPTION_CHARS
])


@dataclass
class ManifestRow:
    source: str
    source_id: str
    split: str
    shard: str | None
    status: str
    error: str | None = None
    error_detail: str | None = None
    sample_keys: list[str] = field(default_factory=list)
    n_samples: int = 0
    source_duration: float | None = None
    output_duration: float = 0.0
    source_sample_rate: int | None = None
    source_channels: int | None = None
    source_codec: str | None = None
    source_bytes: int | None = None
    sha256: str | None = None
    url: str | None = None
    license: str | None = None
    license_id: str | None = None  # both derived from `license` when neither is given
    license_class: str | None = None
    gain_db: float | None = None
    clipped_samples: int | None = None
    downmix: str | None = None
    downmix_db: float | None = None
    downmix_cancels: bool | None = None
    captions_truncated: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if (self.status == STATUS_OK) != (self.error is None):
            raise ValueError("error is set exactly when status is not ok")
        if self.license_id is None and self.license_class is None:
            self.license_id, self.license_class = classify(self.license)


assert [f.name for f in fields(ManifestRow)] == SCHEMA.names, "ManifestRow and SCHEMA disagree"


def stage_reason(stage: str, reason: str) -> str:
    """The manifest reason of a sample a curation stage chose not to keep."""
    return f"{stage}:{reason}"


def status_for_reason(reason: str) -> str:
    if reason in EXCLUDE_REASONS:
        return STATUS_EXCLUDED
    # A build's reasons have no colon; a stage's (`filter:too_short`) are all its own choices.
    return STATUS_DROPPED if reason in DROP_REASONS or ":" in reason else STATUS_FAILED


def rows_to_table(rows: list[ManifestRow]) -> pa.Table:
    return pa.Table.from_pylist([asdict(row) for row in rows], schema=SCHEMA)


def write_parquet(table: pa.Table, path: Location) -> None:
    """Atomic parquet write (temp + rename locally, one PUT on object storage)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_parquet(path: Location) -> pa.Table:
    # ParquetFile, not pq.read_table: pyarrow 26's dataset reader over an in-memory or Python file
    # leaves a thread that aborts the interpreter at exit about half the time. One thread, because
    # Arrow's CPU pool, once started, still aborts an exit now and then (apache/arrow#34314:
    # "terminate called without an active exception", exit 134, seen 1 in 30 `verify` runs).
    return pq.ParquetFile(pa.BufferReader(location(path).read_bytes())).read(use_threads=False)


def write_table(table: pa.Table, path: Location) -> None:
    write_parquet(table.cast(SCHEMA), path)


# Columns added after manifests were first written: an older manifest gets them derived on read.
_LICENSE_COLUMNS = ("license_id", "license_class")


def _conform(table: pa.Table) -> pa.Table:
    """A manifest table in SCHEMA; one written before license_id/license_class gets them from `license`."""
    missing = [name for name in _LICENSE_COLUMNS if name not in table.schema.names]
    if missing and "license" in table.schema.names:
        pairs = [classify(text) for text in table.column("license").to_pylist()]
        derived = {"license_id": [p[0] for p in pairs], "license_class": [p[1] for p in pairs]}
        for name in missing:
            table = table.append_column(pa.field(name, pa.string()), pa.array(derived[name], pa.string()))
        table = table.select([name for name in SCHEMA.names if name in table.schema.names])
    return table.cast(SCHEMA)


def read_table(path: Location) -> pa.Table:
    return _conform(read_parquet(path))


def concat(paths: list[Location]) -> pa.Table:
    tables = [read_table(p) for p in paths]
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table()


# --------------------------------------------------------------------------- streaming
# Files of any length go through these a batch at a time: the driver never holds a whole manifest.

BATCH_ROWS = 65_536


def iter_batches(path: Location, columns: list[str] | None = None,
                 batch_rows: int | None = None) -> Iterator[pa.RecordBatch]:
    """A parquet file as record batches, read as they are used (from object storage too)."""
    with location(path).open("rb") as handle:
        # One thread: see read_parquet on pyarrow's readers over a Python file.
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows or BATCH_ROWS, columns=columns,
                                                       use_threads=False)


def iter_tables(path: Location) -> Iterator[pa.Table]:
    """A manifest file as tables of at most BATCH_ROWS rows, in the manifest schema."""
    for batch in iter_batches(path):
        yield _conform(pa.Table.from_batches([batch]))


def read_rows(path: Location, start: int, stop: int, column: str) -> list[Any]:
    """Rows [start, stop) of one column, reading only the row groups that hold them."""
    with location(path).open("rb") as handle:
        parquet = pq.ParquetFile(handle)
        groups, first, offset = [], None, 0
        for number in range(parquet.num_row_groups):
            rows = parquet.metadata.row_group(number).num_rows
            if offset < stop and offset + rows > start:
                groups.append(number)
                first = offset if first is None else first
            offset += rows
        if not groups:
            return []
        table = parquet.read_row_groups(groups, columns=[column], use_threads=False)
    return table.column(column).slice(start - first, stop - start).to_pylist()


class StagedParquet:
    """A parquet file written a batch at a time and published whole (atomically) by `commit()`.

    Batches are gathered into row groups of `row_group_rows` (default BATCH_ROWS): the writer keeps
    metadata per row group until it closes, so a merge of 10,000 small parts must not make 10,000.
    """

    def __init__(self, dest: Location, schema: pa.Schema, row_group_rows: int | None = None) -> None:
        self.dest, self.schema = location(dest), schema
        self.group_rows = row_group_rows or BATCH_ROWS
        self.staged = StagedFile(dest)
        self.writer = pq.ParquetWriter(self.staged.handle, schema)
        self.rows = 0
        self._held: list[pa.Table] = []
        self._held_rows = 0

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        self._held.append(table.cast(self.schema))
        self._held_rows += len(table)
        self.rows += len(table)
        if self._held_rows >= self.group_rows:
            self._write_groups(whole_only=True)

    def _write_groups(self, whole_only: bool) -> None:
        table = pa.concat_tables(self._held)
        cut = len(table) - len(table) % self.group_rows if whole_only else len(table)
        if cut:
            self.writer.write_table(table.slice(0, cut), row_group_size=self.group_rows)
        self._held = [table.slice(cut)]
        self._held_rows = len(table) - cut

    def commit(self) -> int:
        if self._held_rows:
            self._write_groups(whole_only=False)
        self.writer.close()
        self.staged.commit()
        return self.rows

    def abort(self) -> None:
        self.writer.close()
        self.staged.abort()


def write_batches(batches: Iterable[pa.RecordBatch | pa.Table], schema: pa.Schema, dest: Location) -> int:
    """A parquet file written batch by batch and published whole (atomically); returns its rows."""
    sink = StagedParquet(dest, schema)
    try:
        for batch in batches:
            sink.write(batch)
    except BaseException:
        sink.abort()
        raise
    return sink.commit()
