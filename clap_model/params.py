"""Command-line arguments of clap-train and clap-eval (no torch: `--help` and mistakes come at once)."""
from __future__ import annotations

import argparse
import os

from clap_model.cli_common import OneLineParser
from clap_model.config import FILLING, PRESETS, TRUNCATING, hub_presets

DEFAULT_TEMPLATE = "This is a sound of {}."


def presets_help() -> str:
    """The presets, and which of them need the Hugging Face hub (or its cache) for their text tower."""
    offline = [name for name in PRESETS if name not in hub_presets()]
    return (f"{', '.join(PRESETS)}. {', '.join(offline)} need no download; the others load their text "
            "tower's tokenizer (and, to train from scratch, its weights) from the Hugging Face hub or its "
            "cache, or from --text-model PATH")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    # No argparse `choices`: an unknown name gets get_preset's one-line error, not the whole usage.
    group.add_argument("--model", default="htsat-tiny-roberta",
                       help=f"architecture preset: {presets_help()}. `tiny` trains on a CPU in minutes; "
                            "`tiny-roberta` too, and exports to Hugging Face (clap-export --format hf)")
    group.add_argument("--text-model", default=None,
                       help="text encoder: a transformers hub id or local path (overrides the preset's); a local "
                            "folder with the preset's tokenizer works offline")
    group.add_argument("--pretrained", default=None,
                       help="initial weights: a clap-train checkpoint or a LAION-CLAP release (.pt)")
    add_max_checkpoint_bytes(group)
    add_clip_args(group)


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--val-data", default=None, help="validation shards (brace pattern, or a folder: a split, or a build's output "
                            "for each of its splits) for retrieval")
    group.add_argument("--zeroshot-data", default=None, help="labelled shards (pattern or folder) for zero-shot classification")
    group.add_argument("--zeroshot-label-field", default="tag",
                       help="sample JSON field holding the class (its first entry when a list)")
    group.add_argument("--zeroshot-classes", default=None,
                       help="comma-separated class names (default: every label found in --zeroshot-data)")
    group.add_argument("--zeroshot-template", default=DEFAULT_TEMPLATE, help="prompt; {} is the class name")


def default_workers() -> int:
    """The cores this process may use, split over the node's ranks (torchrun's LOCAL_WORLD_SIZE),
    minus one for the training process itself."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 2
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, cores // ranks - 1)


def byte_count(text: str) -> int:
    """A positive number of bytes, optionally with a K, M, G or T suffix (powers of 1024)."""
    scale = 1024 ** (" KMGT".index(text[-1].upper()) if text and text[-1].upper() in "KMGT" else 0)
    try:
        value = int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def add_max_checkpoint_bytes(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--max-checkpoint-bytes: what loading a checkpoint file may allocate (clap_model.pickle_guard)."""
    parser.add_argument("--max-checkpoint-bytes", type=byte_count, default=None, metavar="BYTES",
                        help="refuse a checkpoint whose loading would allocate more (e.g. 8G; default: 4 x the "
                             "file's size + 64M)")


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--batch-size", type=int, default=64, help="per process")
    group.add_argument("--workers", type=int, default=default_workers(),
                       help="DataLoader workers per process (default: this process's share of the CPU cores, "
                            "less one for the process itself: FLAC decoding is what feeds the GPU)")
    group.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                       help="bf16 autocast (default on GPU) or fp32 (default on CPU)")
    group.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    group.add_argument("--seed", type=int, default=0, help="random seed (initial weights, data order, augmentation)")


def train_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clap-train", description="Train a CLAP model on audiodata shards.")
    data = parser.add_argument_group("data")
    data.add_argument("--train-data", required=True,
                      help="shards: a brace pattern, several datasets joined by '::', pipe: or fsspec URLs, or a "
                           "folder (a split; a build's output means its train split)")
    data.add_argument("--train-data-weights", default=None,
                      help="per-dataset sampling factors joined by '::' (with resampled shards)")
    data.add_argument("--train-num-samples", type=int, default=None,
                      help="samples per epoch (default: the sum of sizes.json over the shards)")
    data.add_argument("--no-resample", action="store_true",
                      help="split shards over ranks and workers instead of drawing them with replacement")
    data.add_argument("--shuffle-buffer", type=int, default=1000, help="samples held for shuffling")
    data.add_argument("--caption-fields", default="text",
                      help="comma-separated JSON fields to draw captions from, e.g. "
                           "text,text_augment_t5, text,text_augment_all or text,text_llm (audiodata caption)")
    add_model_args(parser)
    parser.add_argument("--mlp-loss", action="store_true", help="LAION-CLAP's extra MLP-transformed loss terms")
    parser.add_argument("--local-loss", action="store_true",
                        help="each rank computes its rows of the logits only (less memory, same gradient)")
    add_eval_args(parser)
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10, help="passes over --train-num-samples samples")
    optim.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW, cosine schedule)")
    optim.add_argument("--wd", type=float, default=0.0, help="weight decay (not on norms, biases, temperatures)")
    optim.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    optim.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2")
    optim.add_argument("--eps", type=float, default=1e-8, help="AdamW epsilon")
    optim.add_argument("--warmup", type=int, default=500, help="linear warm-up steps before the cosine decay")
    optim.add_argument("--grad-clip-norm", type=float, default=None,
                       help="clip the gradient's global norm to this (default: no clipping)")
    optim.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the audio encoder's Swin stages for training (HTSAT; default: on "
                            "with CUDA, off on CPU)")
    add_runtime_args(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--out", required=True,
                     help="run directory: checkpoints, TensorBoard logs, results; a new or empty folder unless "
                          "--resume continues the run in it")
    out.add_argument("--resume", default=None,
                     help="checkpoint path, or 'latest' for OUT/latest.pt (also written on SIGINT / SIGTERM)")
    out.add_argument("--save-frequency", type=int, default=1, help="keep OUT/epoch_N.pt every N epochs")
    out.add_argument("--save-every-steps", type=int, default=0,
                     help="also refresh OUT/latest.pt every N steps (mid-epoch resume)")
    out.add_argument("--val-frequency", type=int, default=1, help="evaluate every N epochs")
    out.add_argument("--log-every", type=int, default=10, help="log every N steps")
    out.add_argument("--max-steps", type=int, default=None,
                     help="stop (saving OUT/latest.pt) after N steps in total; the schedule stays that of --epochs")
    return parser


def add_clip_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """How clips are fitted to the model's input: the same options in clap-train and clap-eval."""
    parser.add_argument("--data-truncating", choices=TRUNCATING, default=None,
                        help="long clips: rand_trunc (random 10 s crop) or fusion; default from the model")
    parser.add_argument("--data-filling", choices=FILLING, default="repeatpad",
                        help="short clips: repeat then zero-pad, zero-pad, or repeat")
    parser.add_argument("--max-fusion-seconds", type=float, default=60.0,
                        help="fusion keeps long clips whole up to this length (random crop beyond)")


def eval_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="clap-eval", description="Evaluate a CLAP checkpoint.")
    parser.add_argument("--checkpoint", default=None,
                        help="a clap-train checkpoint, a LAION-CLAP release (with --model), a Microsoft "
                             "CLAP file, or a Hugging Face ClapModel folder or hub id (required, except "
                             "with --results)")
    parser.add_argument("--model", default=None,
                        help=f"architecture of a LAION-CLAP checkpoint (clap-train checkpoints carry theirs): "
                             f"{presets_help()}")
    parser.add_argument("--text-model", default=None,
                        help="text encoder hub id or path: for a LAION-CLAP checkpoint, or one whose config names a "
                             "text model no preset names (a checkpoint's own is not followed)")
    add_max_checkpoint_bytes(parser)
    add_clip_args(parser)
    add_eval_args(parser)
    add_suite_args(parser)
    add_runtime_args(parser)
    parser.add_argument("--out", default=None,
                        help="write the metrics as JSON here; with --suite, the folder for results.json, "
                             "results.md and results.csv (default: ./eval-SUITE)")
    return parser


def add_suite_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("benchmark suite")
    group.add_argument("--suite", default=None,
                       help="score the tasks of a benchmark suite, each under its reference's protocol: a "
                            "shipped suite (laion-clap, msclap-2022, msclap-2023) or a suite TOML file")
    group.add_argument("--data-root", default=None,
                       help="with --suite: the folder holding each benchmark's build as DATA_ROOT/<dataset>/ "
                            "(e.g. audiodata build esc50 ... --out DATA_ROOT/esc50); tasks without one are "
                            "skipped and named")
    group.add_argument("--crop", choices=("fixed", "random"), default="fixed",
                       help="fixed: the clip's start (centred local crops for fusion), the same every run; "
                            "random: a random crop per clip as the references drew, seeded by --seed (and "
                            "the clip), --repeats times for a mean and spread")
    group.add_argument("--repeats", type=int, default=1, help="with --crop random: runs, each with the next seed")
    group.add_argument("--templates", default=None, metavar="FILE",
                       help="prompt ensembles and class descriptions (TOML; see README), in place of the "
                            "suite's prompts: a class's text embedding is the mean over its prompts")
    group.add_argument("--reference", default=None, metavar="CHECKPOINT",
                       help="compare with the numbers published for this released checkpoint (default: the "
                            "ones published for a checkpoint of --checkpoint's file name)")
    group.add_argument("--table", choices=("text", "md", "csv"), default="text",
                       help="the table printed at the end (results.md and results.csv are written beside "
                            "results.json all the same)")
    group.add_argument("--results", default=None, metavar="RESULTS_JSON",
                       help="print the --table of a results.json written before, and exit (no model)")
