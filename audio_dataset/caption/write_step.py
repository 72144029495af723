"""The WRITE step's command-line options, and the writer the stage builds from them (cap-write's
`make_writer`, one per worker, on the worker's device)."""
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
    p.add_argument("--llm", help="causal LM that writes the captions: hub id or local folder "
                                 "(e.g. Qwen/Qwen2.5-7B-Instruct)")
    p.add_argument("--llm-revision", help="hub revision (branch, tag or commit) of --llm")
    p.add_argument("--llm-url", help="an OpenAI-compatible chat endpoint instead (a vLLM, SGLang or Ollama server)")
    p.add_argument("--llm-model", help="with --llm-url: the model name the server serves")
    p.add_argument("--llm-api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the endpoint's API key (never recorded)")
    p.add_argument("--llm-concurrency", type=int, default=8, help="requests in flight to --llm-url")
    p.add_argument("--llm-timeout", type=float, default=120.0, help="seconds one request may take")
    p.add_argument("--llm-retries", type=int, default=4, help="retries of a request on 429/5xx/timeouts")
    p.add_argument("--temperature", type=float, default=0.0, help="the writer's sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass of the writer")
    p.add_argument("--max-new-tokens", type=int, default=64, help="longest caption in tokens")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled captions (recorded)")
    p.add_argument("--language", default="en",
                   help="the captions' language (checked; a caption in another is dropped as wrong_language)")


def _build(config: "WriterConfig", device: str) -> "Writer":
    from audio_dataset.caption.write import make_writer

    return make_writer(replace(config, device=device))


def write_step(args: argparse.Namespace) -> "WriteStep | None":
    """The writer the options name, its model pinned here (in the driver); None without one."""
    from audio_dataset.caption.stage import WriteStep
    from audio_dataset.caption.write import Decoding, WriterConfig

    if args.llm is None and args.llm_url is None:
        return None
    config = WriterConfig(
        llm=args.llm, revision=args.llm_revision, url=args.llm_url, model_name=args.llm_model,
        api_key_env=args.llm_api_key_env, concurrency=args.llm_concurrency, timeout=args.llm_timeout,
        retries=args.llm_retries, language=args.language or None, dtype=args.dtype, batch_size=args.batch_size,
        decoding=Decoding(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                          seed=args.seed))
    config.check()
    config = config.resolve()
    return WriteStep(functools.partial(_build, config), config.settings())
