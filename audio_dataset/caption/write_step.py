"""The WRITE step as the stage runs it: cap-write's options and config (`add_writer_arguments`,
`writer_config_from_args`), its writer built by `make_writer` in each worker, on the worker's device."""
from __future__ import annotations

import argparse
import functools
from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audio_dataset.caption.stage import WriteStep
    from audio_dataset.caption.types import Writer
    from audio_dataset.caption.write import WriterConfig


def add_write_options(p: argparse.ArgumentParser) -> None:
    """The writer's options without the ones `audiodata caption` shares among its steps
    (--device, --dtype, --batch-size), and no default LLM: writing is a step one may leave out."""
    from audio_dataset.caption.write import add_writer_arguments

    add_writer_arguments(p, shared=False, llm_default=None)
    p.add_argument("--seed", type=int, default=0, help="seeds the writer's sampling; a retry derives its own")


def _build(config: "WriterConfig", device: str) -> "Writer":
    from audio_dataset.caption.write import make_writer

    return make_writer(replace(config, device=device))


def write_step(args: argparse.Namespace) -> "WriteStep | None":
    """The writer the options name, its model pinned here (in the driver); None without one."""
    from audio_dataset.caption.stage import WriteStep
    from audio_dataset.caption.write import writer_config_from_args

    if args.llm is None and args.llm_url is None:
        return None
    config = writer_config_from_args(args)
    return WriteStep(functools.partial(_build, config), config.settings())
