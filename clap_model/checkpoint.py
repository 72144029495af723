"""Checkpoints: our training state, and LAION-CLAP's released weights (Microsoft CLAP's: `msclap_format`).

Ours: {'config', 'state_dict', 'optimizer', 'scheduler_step', 'epoch', 'step', 'rng', ...}.
LAION-CLAP's: {'state_dict' (keys prefixed 'module.' when saved from DDP), 'epoch', 'optimizer'}
or a bare state dict. Both use the same parameter names, so one loader serves both.

Files are unpickled by `SafeUnpickler`, which admits exactly the globals checkpoints hold. torch's
own `weights_only` loader cannot: it rejects pickle protocol 4 (LAION-CLAP's releases) and the
NumPy scalars their optimizer state holds (the learning rate after warm-up).
"""
from __future__ import annotations

import codecs
import collections
import functools
import os
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from clap_model import files, hf_format
from clap_model import msclap_format
from clap_model.clap import CLAP
from clap_model.config import ModelConfig, UsageError, get_preset

# Older transformers saved this buffer; newer ones do not register it as state (LAION-CLAP drops it too).
OBSOLETE_KEYS = ("text_branch.embeddings.position_ids",)


class CheckpointError(UsageError):
    pass


class ForeignGlobal(pickle.UnpicklingError):
    """A pickle names a global that is not checkpoint data: unpickling it could run code."""

    def __init__(self, name: str) -> None:
        super().__init__(f"refused global {name}")
        self.name = name


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """NumPy scalars, dtypes and arrays under NumPy 2's module names and NumPy 1's (`numpy.core`)."""
    import numpy as np

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # NumPy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    found: dict[tuple[str, str], Any] = {("numpy", "dtype"): np.dtype, ("numpy", "ndarray"): np.ndarray}
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        found[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        found[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # arrays under protocol 5
    return found


def _torch_globals() -> dict[tuple[str, str], Any]:
    """Tensors, parameters and their storages, dtypes, sizes and devices."""
    found: dict[tuple[str, str], Any] = {
        ("torch", "Size"): torch.Size, ("torch", "device"): torch.device, ("torch", "Tensor"): torch.Tensor,
        ("torch", "UntypedStorage"): torch.UntypedStorage,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        found[("torch._utils", name)] = getattr(torch._utils, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            found[("torch", name)] = getattr(torch, name)
    return found


_PLAIN_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): codecs.encode,  # bytes under protocol 2
}


@functools.cache
def allowed_globals() -> dict[tuple[str, str], Any]:
    return {**_PLAIN_GLOBALS, **_torch_globals(), **_numpy_globals()}


class SafeUnpickler(pickle.Unpickler):
    """Every global a pickle names (the only way it can reach code) must be checkpoint data.
    torch.load subclasses this and resolves its storage types before asking here."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return allowed_globals()[(module, name)]
        except (KeyError, TypeError):
            raise ForeignGlobal(f"{module}.{name}") from None


class SafePickle:
    """The `pickle_module` torch.load unpickles with: the standard pickle (protocols 2 to 5)
    restricted to checkpoint data."""

    __name__ = "clap_model.checkpoint.SafePickle"
    Unpickler = SafeUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: BinaryIO, **kwargs: Any) -> Any:
        return SafeUnpickler(file, **kwargs).load()


def _is_torchscript(path: str | Path) -> bool:
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


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
        if head == b"PK\x03\x04" and _is_torchscript(path):  # torch.load would hand it to torch.jit.load
            raise CheckpointError(f"{path} is a TorchScript archive, not a checkpoint (torch.save file)")
        with open(path, "rb") as handle:
            # Not torch's weights_only: SafePickle is the restriction (see the module docstring).
            return torch.load(handle, map_location="cpu", pickle_module=SafePickle, weights_only=False)
    except ForeignGlobal as exc:
        raise CheckpointError(f"{path} holds Python objects besides tensors and plain data (the first: "
                              f"{exc.name}); refused, for safety: unpickling them could run code") from None
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file: say so in one line
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or damaged "
                              f"({str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__})"
                              ) from None


def clean_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of either layout, without DDP's 'module.' prefix and obsolete buffers."""
    if msclap_format.is_msclap_checkpoint(checkpoint):  # e.g. clap-train --pretrained CLAP_weights_2023.pth
        return msclap_format.state_dict_of(checkpoint)[1]
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
    if msclap_format.is_msclap_checkpoint(checkpoint):  # the names tell 2022 from 2023
        return msclap_format.config_of(checkpoint)
    if "config" in checkpoint:
        cfg = ModelConfig.from_dict(checkpoint["config"])
        if text_model:
            cfg = replace(cfg, text=replace(cfg.text, name_or_path=text_model))
        return cfg
    if preset is None:
        raise CheckpointError("this checkpoint carries no model config (a LAION-CLAP release?): pass --model")
    return get_preset(preset, text_model)


def model_from(checkpoint: dict[str, Any], cfg: ModelConfig) -> CLAP:
    """The model of `cfg` with the checkpoint's weights, the text tower's too: built offline for
    the presets' towers (clap_model.text.known_text_config)."""
    model = CLAP(cfg, pretrained_text=False)
    load_weights(model, checkpoint)
    return model


def load_model(path: str | Path, preset: str | None = None, text_model: str | None = None) -> CLAP:
    """A model built from a checkpoint's config (or `preset` for LAION-CLAP's) with its weights;
    or a Hugging Face ClapModel folder or hub id."""
    if hf_format.is_hf_model(str(path)):
        return hf_format.load_hf(str(path))
    checkpoint = read(path)
    if msclap_format.is_msclap_checkpoint(checkpoint):  # Microsoft CLAP's release: its own names and presets
        return msclap_format.load_msclap(checkpoint)
    return model_from(checkpoint, model_config_of(checkpoint, preset, text_model))


def save_atomic(state: dict[str, Any], path: Path, also: Path | None = None) -> None:
    """Written in a private folder beside the target and renamed (clap_model.files): a crash never
    leaves a half-written checkpoint, and no planted link is written through.
    `also` gets the same file (a hard link where the filesystem allows, else a second write)."""
    with files.replacing(path) as tmp:
        torch.save(state, tmp)
    if also is None:
        return
    with files.replacing(also) as tmp:
        try:
            os.link(path, tmp, follow_symlinks=False)
        except OSError:
            torch.save(state, tmp)
