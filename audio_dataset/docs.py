"""docs/commands.md, generated from the argparse parsers so it cannot drift from them:

    python -m audio_dataset.docs            # rewrite docs/commands.md
    python -m audio_dataset.docs --check    # exit 1 if it is out of date (a test runs this)

One table of every command (what it reads, what it writes), then each command's options with their
defaults and help, for `audiodata`, `clap-train`, `clap-eval` and `clap-export`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DOCS_FILE = Path(__file__).resolve().parent.parent / "docs" / "commands.md"
# Defaults computed on the machine that runs the command (its cores): the help says how.
MACHINE_DEFAULTS = {("clap-train", "--workers"), ("clap-eval", "--workers")}
# Options naming what a command reads besides its positional arguments.
READS = {"--input", "--checkpoint", "--recipe", "--source", "--train-data", "--val-data", "--zeroshot-data",
         "--pretrained", "--resume", "--embeddings", "--against", "--audio"}


@dataclass
class Command:
    name: str
    help: str
    parser: argparse.ArgumentParser


def commands() -> list[Command]:
    """Every command of the four entry points, in the order `--help` lists them."""
    from audio_dataset.cli import make_parser
    from clap_model.export import parser as export_parser
    from clap_model.params import eval_parser, train_parser

    found = []
    main = make_parser()
    sub = next(a for a in main._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help or "" for a in sub._choices_actions}
    for name, parser in sub.choices.items():
        found.append(Command(f"audiodata {name}", helps.get(name, ""), parser))
    for name, parser in (("clap-train", train_parser()), ("clap-eval", eval_parser()),
                         ("clap-export", export_parser())):
        found.append(Command(name, parser.description or "", parser))
    return found


def _shown(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options a user types (renamed flags and --help/--version left out)."""
    return [a for a in parser._actions if a.help != argparse.SUPPRESS
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def _name(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return ", ".join(action.option_strings)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(command: str, action: argparse.Action) -> str:
    if (command, _name(action)) in MACHINE_DEFAULTS:
        return "(this machine's cores)"
    if action.required:
        return "required"
    if not action.option_strings:
        return "optional" if action.nargs in ("?", "*") else "required"
    if action.default in (None, False, [], argparse.SUPPRESS) or action.nargs == 0:
        return ""
    return f"`{action.default}`"


def _names(actions: list[argparse.Action], keep: Callable[[argparse.Action], bool]) -> str:
    return ", ".join(f"`{_name(a)}`" for a in actions if keep(a)) or "-"


def render() -> str:
    found = commands()
    lines = ["# Commands", "", "Generated from the parsers by `python -m audio_dataset.docs`; do not edit by hand.",
             "A dataset a command reads is its positional `DATASET`; `--out` is always what it writes.", "",
             "| command | reads | writes | what it does |", "| --- | --- | --- | --- |"]
    for c in found:
        shown = _shown(c.parser)
        reads = _names(shown, lambda a: not a.option_strings or a.option_strings[0] in READS)
        writes = _names(shown, lambda a: a.option_strings[:1] == ["--out"])
        lines.append(f"| `{c.name}` | {reads} | {writes} | {_cell(c.help)} |")
    for c in found:
        lines += ["", f"## `{c.name}`", "", _cell(c.help), "", "| option | default | help |", "| --- | --- | --- |"]
        for action in _shown(c.parser):
            lines.append(f"| `{_name(action)}` | {_default(c.name, action)} | {_cell(action.help or '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audio_dataset.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/commands.md is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOCS_FILE.read_text(encoding="utf-8") if DOCS_FILE.exists() else ""
        if current != text:
            print(f"{DOCS_FILE} is out of date: run python -m audio_dataset.docs", file=sys.stderr)
            return 1
        return 0
    DOCS_FILE.parent.mkdir(exist_ok=True)
    DOCS_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {DOCS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
