"""Checkpoints: our training state, and LAION-CLAP's released weights.

Ours: {'config', 'state_dict', 'optimizer', 'scheduler_step', 'epoch', 'step', 'rng', ...}.
LAION-CLAP's: {'state_dict' (keys prefixed 'module.' when saved from DDP), 'epoch', 'optimizer'}
or a bare state dict. Both use the same parameter names, so one loader serves both.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from clap_model import hf_format
from clap_model.clap import CLAP
from clap_model.config import ModelConfig, UsageError, get_preset

# Older transformers saved this buffer; newer ones do not register it as state (LAION-CLAP drops it too).
OBSOLETE_KEYS = ("text_branch.embeddings.position_ids",)


class CheckpointError(UsageError):
    pass


def read(path: str | Path) -> dict[str, Any]:
    if hf_format.is_hf_model(str(path)):  # a Hugging Face ClapModel (clap-train --pretrained)
        model = hf_format.load_hf(str(path))
        return {"config": model.cfg.to_dict(), "state_dict": model.state_dict()}
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive; files from before torch 1.6 are a bare pickle.
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refuses arbitrary objects: code could run
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" (the first: {found.group(1)})" if found else ""
        raise CheckpointError(f"{path} holds Python objects besides tensors{what}; they are not "
                              "unpickled, for safety (torch.load weights_only)") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file: say so in one line
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or damaged "
                              f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__})"
                              ) from None


def clean_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of either layout, without DDP's 'module.' prefix and obsolete buffers."""
    state = checkpoint.get("state_dict", checkpoint)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in OBSOLETE_KEYS}


def load_weights(model: CLAP, checkpoint: dict[str, Any]) -> None:
    """Strict: any missing or unexpected name is an error naming the first few."""
    missing, unexpected = model.load_state_dict(clean_state_dict(checkpoint), strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit model {model.cfg.audio.model_type}-{model.cfg.audio.model_name}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def model_config_of(checkpoint: dict[str, Any], preset: str | None, text_model: str | None) -> ModelConfig:
    if "config" in checkpoint:
        cfg = ModelConfig.from_dict(checkpoint["config"])
        if text_model:
            cfg = replace(cfg, text=replace(cfg.text, name_or_path=text_model))
        return cfg
    if preset is None:
        raise CheckpointError("this checkpoint carries no model config (a LAION-CLAP release?): pass --model")
    return get_preset(preset, text_model)


def load_model(path: str | Path, preset: str | None = None, text_model: str | None = None) -> CLAP:
    """A model built from a checkpoint's config (or `preset` for LAION-CLAP's) with its weights;
    or a Hugging Face ClapModel folder or hub id."""
    if hf_format.is_hf_model(str(path)):
        return hf_format.load_hf(str(path))
    checkpoint = read(path)
    cfg = model_config_of(checkpoint, preset, text_model)
    model = CLAP(cfg, pretrained_text=False)  # the checkpoint supplies the text weights too
    load_weights(model, checkpoint)
    return model


def save_atomic(state: dict[str, Any], path: Path, also: Path | None = None) -> None:
    """Write beside the target and rename: a crash never leaves a half-written checkpoint.
    `also` gets the same file (a hard link where the filesystem allows, else a second write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    if also is None:
        return
    tmp = also.with_name(f".{also.name}.tmp-{os.getpid()}")
    try:
        os.link(path, tmp)
    except OSError:
        torch.save(state, tmp)
    os.replace(tmp, also)
