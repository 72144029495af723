"""What clap-train, clap-eval and clap-export share on the command line, as `audiodata` does it:
`--help` with the defaults, a mistake in one line (exit 2), `--version`, and SIGINT / SIGTERM as
one line with exit 128 + signal. Imports nothing heavy: the arguments are parsed before torch loads.
"""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn

from clap_model.config import RunFailure, error_line
from clap_model.flags import DefaultsHelpFormatter


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("audiodata")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0.0.0+local"


class OneLineParser(argparse.ArgumentParser):
    """Argument mistakes as one line, not the whole usage text: `clap-train: error: ...` (exit 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"{self.prog} {version()}",
                          help="print the version and exit")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command can say in one line what it leaves behind."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Stop:
    """SIGINT / SIGTERM: raised as `Interrupted` at once, or, inside `deferred()`, noted in `signum`
    for the caller to act on where its state is whole (a training step's end). A second signal
    while one is pending is raised at once: the user insists."""

    signum: int | None = None
    _deferring: int = 0

    def handle(self, signum: int, _frame: object) -> None:
        if self._deferring and self.signum is None:
            self.signum = signum
            return
        raise Interrupted(signum)

    @contextmanager
    def deferred(self) -> Iterator[None]:
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1

    def check(self) -> None:
        """Raise the pending signal, if any."""
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextmanager
def signals_to(stop: Stop) -> Iterator[None]:
    """SIGINT and SIGTERM go to `stop` while inside; the caller's handlers are back afterwards
    (main() called from Python). Signals reach only the main thread: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def load_modules(stop: Stop, *names: str) -> None:
    """Import the heavy modules (torch, transformers) with SIGINT / SIGTERM held until they are in,
    then acted on: a KeyboardInterrupt raised inside a C extension's initialisation leaves it half
    made, and the interpreter's exit may then crash (a segfault, not a line)."""
    with stop.deferred():
        for name in names:
            importlib.import_module(name)
    stop.check()


def interrupted_line(prog: str, exc: KeyboardInterrupt, what_is_left: str = "") -> int:
    """Print the one line of an interruption; the exit status is 128 + the signal's number."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    print(f"{prog}: interrupted ({signal.Signals(signum).name}){'; ' + what_is_left if what_is_left else ''}",
          file=sys.stderr, flush=True)
    return 128 + signum


def run_command(prog: str, body: Callable[[Stop], int], stop: Stop | None = None,
                what_is_left: Callable[[], str] = lambda: "") -> int:
    """`body(stop)` with SIGINT / SIGTERM and a run failure (exit 1) each as one line. The body maps
    its own usage errors (exit 2): which exceptions are the user's differs between commands."""
    stop = stop or Stop()
    with signals_to(stop):
        try:
            return body(stop)
        except RunFailure as exc:
            print(f"{prog}: error: {error_line(exc)}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt as exc:
            return interrupted_line(prog, exc, what_is_left())
