"""One vocabulary across commands: the dataset a command reads is its positional DATASET, `--out` is
what it writes, `--model` is a CLAP architecture preset and `--checkpoint` CLAP weights; an old name
is a one-line usage error naming the new one; metric names are the same on screen and in files;
docs/commands.md is generated from the parsers."""
from __future__ import annotations

import argparse

import pytest
import torch

from audio_dataset.cli import main, make_parser
from audio_dataset.docs import DOCS_FILE, commands, render


@pytest.mark.parametrize("argv, old, new", [
    (["k2c", "--input", "x", "--out", "y"], "--input", "positional DATASET"),
    (["k2c", "x", "--out", "y", "--model", "template"], "--model", "--caption-model"),
    (["keywords", "x", "--out", "y", "--model", "m"], "--model", "--keybert-model"),
    (["sources", "--out", "x"], "--out", "positional DATASET"),
    (["report", "x", "--out-html", "y.html"], "--out-html", "--out"),
    (["stats", "x", "--plot", "y.png"], "--plot", "--out"),
])
def test_an_old_flag_is_one_usage_line_naming_the_new(argv, old, new, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert f"{old} is now" in err[0] and new in err[0], err


def test_clap_export_takes_checkpoint_and_out_as_flags(tmp_path, capsys):
    from clap_model.export import main as export_main

    with pytest.raises(SystemExit) as exit_:
        export_main(["run.pt", "--format", "hf", str(tmp_path / "hf")])
    assert exit_.value.code == 2 and "--checkpoint CHECKPOINT and --out OUT" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path / "missing.pt"), "--format", "hf",
                        "--out", str(tmp_path / "hf")]) == 2
    assert "missing.pt" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions if a.help != argparse.SUPPRESS for s in a.option_strings}


def test_the_dataset_a_command_reads_is_positional_everywhere():
    for name, parser in _subcommands().items():
        positionals = [a.dest for a in parser._actions if not a.option_strings and a.help != argparse.SUPPRESS]
        if name in ("build", "plan"):  # build reads a source's raw files (--input); plan a recipe
            continue
        assert positionals[:1] in (["dataset"], ["datasets"]), (name, positionals)
        assert "--input" not in _flags(parser), name


def test_model_means_a_clap_preset_and_checkpoint_clap_weights():
    from clap_model.export import parser as export_parser
    from clap_model.params import eval_parser, train_parser

    with_model = {name for name, parser in _subcommands().items() if "--model" in _flags(parser)}
    assert with_model == {"embed"}  # k2c's and keywords' models are --caption-model and --keybert-model
    for parser in (train_parser(), eval_parser(), export_parser(), _subcommands()["embed"]):
        model = next(a for a in parser._actions if "--model" in a.option_strings)
        assert "preset" in model.help or "architecture" in model.help, model.help
    for parser in (eval_parser(), export_parser(), _subcommands()["embed"], _subcommands()["search"]):
        assert "--checkpoint" in _flags(parser)


def test_metrics_on_screen_carry_the_names_results_jsonl_and_clap_eval_out_use():
    from clap_model.metrics import format_metrics, retrieval_metrics, zeroshot_metrics

    audio, text = torch.randn(4, 8), torch.randn(4, 8)
    metrics = {**retrieval_metrics(audio, text), **zeroshot_metrics(audio, text, torch.tensor([0, 1, 2, 3]))}
    line = format_metrics(metrics)
    assert [part.rsplit(" ", 1)[0] for part in line.split(" | ")] == list(metrics)


def test_commands_doc_is_generated_from_the_parsers():
    """docs/commands.md is what `python -m audio_dataset.docs` writes from today's parsers."""
    assert DOCS_FILE.read_text(encoding="utf-8") == render(), "run: python -m audio_dataset.docs"
    text = render()
    for command in commands():
        assert f"## `{command.name}`" in text
        for action in command.parser._actions:
            if action.help != argparse.SUPPRESS and action.option_strings \
                    and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                assert f"`{', '.join(action.option_strings)}`" in text, (command.name, action.option_strings)
