"""`audiodata caption`, registered on the main parser by `add_cli`."""
from __future__ import annotations

import argparse
from pathlib import Path

from audio_dataset.caption.listen import DEFAULT_ALM, DTYPES, ENGINES
from audio_dataset.stage_cli import add_run_options, report, run_options


def _steps(value: str) -> tuple[str, ...]:
    return tuple(step.strip() for step in value.split(",") if step.strip())


def run_caption_command(args: argparse.Namespace) -> int:
    from audio_dataset.caption.check import CheckOptions
    from audio_dataset.caption.listen import DEFAULT_QUESTIONS, ListenOptions, read_questions
    from audio_dataset.caption.stage import CaptionOptions, STEPS, run_caption
    from audio_dataset.caption.write_step import write_step

    steps = args.steps or STEPS
    questions = read_questions(args.questions) if args.questions else DEFAULT_QUESTIONS
    listen = ListenOptions(model=args.alm_model, revision=args.alm_revision, questions=questions,
                           batch_size=args.batch_size, dtype=args.dtype, max_new_tokens=args.alm_max_new_tokens,
                           engine=args.engine)
    check = CheckOptions(args.clap_checkpoint, args.clap_preset, args.retries, args.min_score, args.batch_size) \
        if args.clap_checkpoint is not None else None
    write = write_step(args) if "write" in steps else None
    options = CaptionOptions(steps=steps, listen=listen, write=write, check=check, num_captions=args.num_captions)
    report("caption", run_caption(options, run_options(args, args.dataset, args.out)))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    from audio_dataset.caption.write_step import add_write_options

    p = subparsers.add_parser("caption", help="recaption shards: an audio-language model listens, an LLM writes, "
                                              "CLAP checks (text_llm, alm_answers, caption_scores)")
    add_run_options(p)
    p.add_argument("--steps", type=_steps,
                   help="comma-separated: listen, write, check (default all three; write needs --llm or "
                        "--llm-url, check needs --clap-checkpoint)")
    p.add_argument("--alm-model", default=DEFAULT_ALM,
                   help=f"audio-language model: hub id or local folder (Qwen2-Audio, Qwen2.5-Omni; "
                        f"default {DEFAULT_ALM})")
    p.add_argument("--alm-revision", help="hub revision (branch, tag or commit) of --alm-model")
    p.add_argument("--questions", type=Path,
                   help="questions the listening model answers: one a line, or a JSON list "
                        "(default: AudioSetCaps' three: sound events and scene, speech, music)")
    p.add_argument("--alm-max-new-tokens", type=int, default=128, help="longest answer in tokens (greedy)")
    p.add_argument("--engine", choices=ENGINES, default="transformers",
                   help="vllm runs the listening model through vLLM's offline engine (where vllm is installed); "
                        "for the writer, serve it with vLLM and pass --llm-url")
    p.add_argument("--batch-size", type=int, default=8,
                   help="prompts per generate call, and clips or captions per CLAP batch in the check "
                        "(raise it on a GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model weights; auto: bfloat16 on CUDA, "
                                                                  "float32 on CPU")
    p.add_argument("--num-captions", type=int, default=1, help="distinct captions kept per sample")
    p.add_argument("--clap-checkpoint", type=Path,
                   help="CLAP model that checks each caption: a clap-train checkpoint, a LAION-CLAP release "
                        "(with --clap-preset), msclap or an HF ClapModel, as `audiodata embed` loads them")
    p.add_argument("--clap-preset", help="the preset a LAION-CLAP release was trained as (htsat-tiny-roberta, ...)")
    p.add_argument("--retries", type=int, default=2,
                   help="rewrites of a sample none of whose captions passed the check (AudioSetCaps: 2)")
    p.add_argument("--min-score", type=float,
                   help="keep captions scoring at least this (default: at least the score of the sample's text)")
    add_write_options(p)
    p.set_defaults(func=run_caption_command)
