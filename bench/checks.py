"""What every benchmark does before it reports a figure: check it did the work the figure is about.

A benchmark whose items were not built, whose samples were not decoded or whose requests did not
return the bytes served would print a speed of nothing; `require` stops it with one line instead.
"""
from __future__ import annotations

import sys
from pathlib import Path


class BenchFailed(SystemExit):
    """The benchmark did not do the work it reports: its figures would be meaningless."""

    def __init__(self, message: str) -> None:
        super().__init__(f"{Path(sys.argv[0]).name}: FAILED: {message}")


def require(done: bool, message: str) -> None:
    """Stop the benchmark (exit status 1, one line naming what is missing) unless `done`."""
    if not done:
        raise BenchFailed(message)
