"""Command-line pieces shared by `audiodata` and the clap-* commands (argparse only): the help
formatter that shows defaults, and renamed flags (the old name is no alias, one way to do each
thing, but a one-line usage error naming the new one)."""
from __future__ import annotations

import argparse
from typing import Any


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's default, unless it has none or its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


class _Refused(argparse.Action):
    """An argument hidden from --help that only stops the parse with a line naming `new`."""

    takes = "?"  # how many values argparse hands it

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        kwargs.pop("nargs", None)
        super().__init__(option_strings, dest=argparse.SUPPRESS, nargs=self.takes, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, **kwargs)
        self.new = new


class _Renamed(_Refused):
    """An old flag: `OLD is now NEW`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is now {self.new}")


class _OldPositionals(_Refused):
    """Positional arguments a command no longer takes (they became flags): one line naming the flags."""

    takes = "*"

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if values:
            parser.error(f"{' '.join(map(str, values))}: positional arguments are now {self.new}")


def add_renamed(parser: argparse.ArgumentParser, renamed: dict[str, str]) -> None:
    """`{old flag: what to use instead}`, e.g. {"--input": "the positional DATASET"}."""
    for old, new in renamed.items():
        parser.add_argument(old, action=_Renamed, new=new)


def refuse_positionals(parser: argparse.ArgumentParser, new: str) -> None:
    """For a command whose positional arguments became flags (`new` names them)."""
    parser.add_argument("old_positionals", action=_OldPositionals, new=new)

