"""The WRITE step's command-line options, and the writer the stage runs built from them."""
from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audio_dataset.caption.stage import WriteStep


def add_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm-model", help="causal LM that writes the captions: hub id or local folder")
    p.add_argument("--llm-url", help="an OpenAI-compatible chat endpoint instead (vLLM, SGLang, Ollama)")


def write_step(args: argparse.Namespace) -> "WriteStep | None":
    if args.llm_model is None and args.llm_url is None:
        return None
    raise NotImplementedError
