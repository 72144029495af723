"""One writer per output folder: `build`, `k2c` and every stage hold `OUT/.audiodata.lock` while they run.

Locally the lock is `fcntl.flock` on that file: the kernel drops it when the holder exits or is
killed (`kill -9` too), so a dead holder never blocks a rerun. The holder's description is written
into the file so a refused command can say who holds it.

Object storage has no locks, so there the file is a lease: an object naming the holder (stage,
user, host, pid) with a heartbeat time that a thread refreshes every `LEASE_REFRESH_S` seconds. A
lease is stale, and is taken over, when its heartbeat is older than `LEASE_STALE_S` seconds, or at
once when its holder is a process on this host that no longer exists. Two commands that start
within the same moment can both see no lease; each writes its own, waits `LEASE_SETTLE_S` and reads
it back, and only the one whose lease is there goes on.
"""
from __future__ import annotations

import fcntl
import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from upath import UPath

from audio_dataset.schema import shown
from audio_dataset.source import UserError
from audio_dataset.storage import check_output_tree, is_local, make_dirs, open_own, trust_output

LOCK_FILE = ".audiodata.lock"
# Names only an audiodata output holds (with a stage's `.STAGE/run.json`): a folder that holds
# none of them but other files is someone else's, and no command writes into it.
OUR_NAMES = frozenset({LOCK_FILE, "_work", "manifest.parquet", "provenance.json", "recipe.json", "_sources"})
LEASE_REFRESH_S = 15.0
LEASE_STALE_S = 120.0
LEASE_SETTLE_S = 1.0
log = logging.getLogger("audiodata.lock")


class OutputLocked(Exception):
    """Another command is writing the same output: the run is refused (one line, exit 1)."""


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container uid with no passwd entry
        return str(os.getuid())


@dataclass
class Holder:
    stage: str
    user: str = field(default_factory=_user)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    heartbeat: float = field(default_factory=time.time)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8") + b"\n"

    @classmethod
    def parse(cls, data: bytes) -> "Holder | None":
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):  # empty (being written) or not ours
            return None

    def describe(self) -> str:
        return f"`{self.stage}` (pid {self.pid} on {self.host}, user {self.user}, since {self.started_at})"

    def is_dead_here(self) -> bool:
        """A holder on this host whose process is gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _refusal(out: UPath, holder: Holder | None) -> OutputLocked:
    who = holder.describe() if holder else "another command"
    return OutputLocked(f"{out} is being written by {who}; wait for it to finish or use another --out")


# --------------------------------------------------------------------------- local folders


def _flock(out: UPath, holder: Holder) -> int:
    folder = Path(out.path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    make_dirs(folder)
    path = folder / LOCK_FILE
    while True:
        fd = open_own(path, os.O_RDWR)  # never through a planted link or a hard link to another file
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = Holder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise _refusal(out, current) from None
        # The previous holder unlinks the file as it releases: if that happened between our open
        # and our flock, we hold a lock on a file nobody else will open. Start again on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_bytes(), 0)
            return fd
        os.close(fd)


def _unflock(out: UPath, fd: int) -> None:
    # Unlinked while still held, so no other process can lock this inode after it is gone.
    Path(out.path, LOCK_FILE).unlink(missing_ok=True)
    os.close(fd)


# --------------------------------------------------------------------------- object storage


def _read_lease(path: UPath) -> Holder | None:
    try:
        return Holder.parse(path.read_bytes())
    except FileNotFoundError:
        return None


def _is_stale(holder: Holder) -> bool:
    return time.time() - holder.heartbeat > LEASE_STALE_S or holder.is_dead_here()


def _take_lease(out: UPath, holder: Holder) -> None:
    path = out / LOCK_FILE
    current = _read_lease(path)
    if current is not None and not _is_stale(current):
        age = time.time() - current.heartbeat
        raise OutputLocked(f"{_refusal(out, current)} (lease refreshed {age:.0f}s ago; "
                           f"taken over once older than {LEASE_STALE_S:.0f}s)")
    if current is not None:
        log.warning("taking over the stale lease on %s from %s", out, current.describe())
    path.write_bytes(holder.to_bytes())
    time.sleep(LEASE_SETTLE_S)
    winner = _read_lease(path)
    if winner is None or winner.token != holder.token:
        raise _refusal(out, winner)


class _Heartbeat(threading.Thread):
    """Refreshes the lease until stopped; warns once if another command took it over."""

    def __init__(self, out: UPath, holder: Holder) -> None:
        super().__init__(name="audiodata-lease", daemon=True)
        self.path, self.holder, self.stop = out / LOCK_FILE, holder, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(LEASE_REFRESH_S):
            try:
                current = _read_lease(self.path)
                if current is not None and current.token != self.holder.token:
                    log.error("the lease on %s was taken over by %s", self.path.parent, current.describe())
                    return
                self.holder.heartbeat = time.time()
                self.path.write_bytes(self.holder.to_bytes())
            except OSError as exc:  # a network blip: the next beat tries again, well within LEASE_STALE_S
                log.warning("could not refresh the lease on %s: %s", self.path.parent, exc)

    def release(self) -> None:
        self.stop.set()
        self.join()
        try:
            current = _read_lease(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink()
        except OSError as exc:  # it goes stale on its own
            log.warning("could not remove the lease on %s: %s", self.path.parent, exc)


def current_holder(out: UPath) -> Holder | None:
    """Who is writing `out` now, as far as a reader can tell without taking the lock (which would
    refuse a writer starting that moment): a holder removes the file when it finishes, and one
    killed on this host is recognised by its pid. Readers warn with it: what they see may change."""
    if not is_local(out):
        lease = _read_lease(out / LOCK_FILE)
        return lease if lease is not None and not _is_stale(lease) else None
    try:
        holder = Holder.parse(Path(out.path, LOCK_FILE).read_bytes())
    except OSError:  # no lock file: nobody holds it
        return None
    return None if holder is None or holder.is_dead_here() else holder


def refuse_foreign(out: UPath) -> None:
    """A non-empty local folder no audiodata command wrote (`--out ./docs`) is refused in one line
    before anything is written into it; an empty one, or an earlier output, is fine."""
    path = Path(out.path)
    try:
        entries = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    if not entries or OUR_NAMES.intersection(entries) or any(
            name.startswith(".") and (path / name / "run.json").is_file() for name in entries):
        return
    check_output_tree(out)  # a planted link is named as one, not as a foreign file
    names = ", ".join(shown(name) for name in sorted(entries)[:3]) + (", ..." if len(entries) > 3 else "")
    raise UserError(f"--out {out} holds files audiodata did not write ({names}): name a new or empty "
                    "folder, or an earlier output of the same command")


@contextmanager
def hold_output(out: UPath, stage: str) -> Iterator[Holder]:
    """Hold the output for one writer for the duration of the block, or raise OutputLocked."""
    holder = Holder(stage)
    trust_output(out)
    if is_local(out):
        refuse_foreign(out)
        fd = _flock(out, holder)
        try:
            check_output_tree(out)  # held: no writer of ours is changing the tree under the walk
            yield holder
        finally:
            _unflock(out, fd)
        return
    _take_lease(out, holder)
    beat = _Heartbeat(out, holder)
    beat.start()
    try:
        yield holder
    finally:
        beat.release()
