"""clap-export: a CLAP checkpoint in another format.

    clap-export --checkpoint run/epoch_10.pt --format hf --out out/clap-hf   # transformers' ClapModel folder
    clap-export --checkpoint 630k-audioset-best.pt --model htsat-tiny-roberta --format hf --out out/clap-hf
    clap-export --checkpoint laion/clap-htsat-unfused --format laion --out out/clap.pt   # LAION-CLAP's load_ckpt
    clap-export --checkpoint run/epoch_10.pt --format msclap --out out/clap.pth   # Microsoft CLAP's layout

--checkpoint is anything `clap-eval --checkpoint` takes: ours, a LAION-CLAP release (with --model),
a Hugging Face ClapModel folder or hub id. What the target format cannot hold is refused in one
line (exit 2) before anything is written; the output appears whole or not at all. torch loads
after the arguments are parsed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from clap_model import files
from clap_model.cli_common import OneLineParser, Stop, load_modules, run_command
from clap_model.config import UsageError, error_line
from clap_model.flags import refuse_positionals
from clap_model.inputs import check_named
from clap_model.params import add_max_checkpoint_bytes, presets_help

if TYPE_CHECKING:
    from clap_model.clap import CLAP

PROG = "clap-export"

FORMATS = ("hf", "laion", "msclap")
# The HTSAT geometries LAION-CLAP's create_htsat_model builds: (embed_dim, depths), by model name.
LAION_HTSAT = {"tiny": (96, (2, 2, 6, 2)), "base": (128, (2, 2, 12, 2)), "large": (256, (2, 2, 12, 2))}
LAION_TEXT_WIDTH = 768  # LAION-CLAP's text projection takes 768 features, whatever the tower
POSITION_IDS = "text_branch.embeddings.position_ids"


def check_laion(model: CLAP) -> None:
    """One line on the first thing LAION-CLAP's CLAP class cannot build or load."""
    from clap_model.clap import CLAP

    if not isinstance(model, CLAP):
        raise UsageError(f"LAION-CLAP's CLAP class cannot hold a {type(model).__name__} model")
    cfg, audio = model.cfg, model.cfg.audio
    if audio.model_type == "HTSAT":
        geometry = (audio.embed_dim, tuple(audio.depths))
        if geometry not in LAION_HTSAT.values() or (audio.spec_size, audio.patch_size, audio.window) != (256, 4, 8):
            raise UsageError(f"LAION-CLAP builds HTSAT {'/'.join(LAION_HTSAT)} only; this model's HTSAT "
                             f"(embed_dim {audio.embed_dim}, depths {list(audio.depths)}) cannot be exported to --format laion")
    elif (audio.model_type, audio.model_name) != ("PANN", "Cnn14"):
        raise UsageError(f"LAION-CLAP has no {audio.model_type}-{audio.model_name} audio encoder")
    text_type = getattr(getattr(model.text_branch, "config", None), "model_type", None)
    if text_type not in ("roberta", "bert") or cfg.text.pooling != "pooler":
        raise UsageError("LAION-CLAP's text encoders are RoBERTa or BERT read through their pooler; this model's "
                         f"({text_type or 'another'} tower, {cfg.text.pooling} pooling) cannot be exported to --format laion")
    if cfg.text.hidden_size != LAION_TEXT_WIDTH or model.text_branch.config.hidden_size != LAION_TEXT_WIDTH:
        raise UsageError(f"LAION-CLAP's text projection takes {LAION_TEXT_WIDTH} features, this model's text "
                         f"tower gives {model.text_branch.config.hidden_size}: it cannot be exported to --format laion")


def laion_state(model: CLAP) -> dict[str, object]:
    """As LAION-CLAP's training saves: DDP's 'module.' prefix, and the text position_ids buffer that
    its load_state_dict deletes (so requires) under transformers >= 4.31."""
    import torch

    state = {f"module.{key}": value for key, value in model.state_dict().items()}
    positions = model.text_branch.config.max_position_embeddings
    state[f"module.{POSITION_IDS}"] = torch.arange(positions)[None]
    return {"epoch": 0, "state_dict": state}


def save_laion(model: CLAP, path: Path) -> None:
    from clap_model import checkpoint as ckpt

    check_laion(model)
    ckpt.save_atomic(laion_state(model), path)


def save_hf_folder(model: CLAP, out: Path) -> None:
    """save_hf into a private folder renamed into place: a failed export leaves no half folder."""
    from clap_model import hf_format

    files.check_target(out, folder=True)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty folder; remove it or name another")
    with files.replacing(out, folder=True) as tmp:
        hf_format.save_hf(model, tmp)
        if out.exists():
            out.rmdir()


def saver(fmt: str) -> Callable[[CLAP, Path], None]:
    if fmt == "msclap":
        from clap_model import msclap_format

        return msclap_format.save_msclap
    return {"hf": save_hf_folder, "laion": save_laion}[fmt]


def parser() -> argparse.ArgumentParser:
    parse = OneLineParser(prog=PROG, description="Write a CLAP checkpoint in another format.")
    parse.add_argument("--checkpoint", required=True, help="ours, a LAION-CLAP release (with --model), or a "
                                                          "Hugging Face ClapModel folder or hub id")
    parse.add_argument("--format", required=True, choices=FORMATS,
                       help="hf: a transformers ClapModel folder; laion: a file LAION-CLAP's load_ckpt reads; "
                            "msclap: Microsoft CLAP's checkpoint layout")
    parse.add_argument("--out", required=True, help="output folder (hf) or file (laion, msclap)")
    parse.add_argument("--model", default=None, help=f"architecture of a LAION-CLAP release: {presets_help()}")
    parse.add_argument("--text-model", default=None,
                       help="text encoder hub id or path: for a LAION-CLAP release, or a checkpoint whose config "
                            "names a text model no preset names (a checkpoint's own is not followed)")
    refuse_positionals(parse, "--checkpoint CHECKPOINT and --out OUT")
    add_max_checkpoint_bytes(parse)
    return parse


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda stop: _main(argv, stop))


def _main(argv: list[str] | None, stop: Stop) -> int:
    args = parser().parse_args(argv)
    try:
        check_named(args.model, checkpoints=(args.checkpoint,))  # before torch
        load_modules(stop, "clap_model.checkpoint")
        from clap_model import checkpoint as ckpt

        model = ckpt.load_model(args.checkpoint, args.model, args.text_model, args.max_checkpoint_bytes).eval()
        saver(args.format)(model, Path(args.out))
    except UsageError as exc:
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 2
    except (OSError, ImportError) as exc:
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {args.out} ({args.format})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
