"""Checkpoints: our training state, and LAION-CLAP's released weights (Microsoft CLAP's: `msclap_format`).

Ours: {'config', 'state_dict', 'optimizer', 'scheduler_step', 'epoch', 'step', 'rng', ...}.
LAION-CLAP's: {'state_dict' (keys prefixed 'module.' when saved from DDP), 'epoch', 'optimizer'}
or a bare state dict. Both use the same parameter names, so one loader serves both.

Files are checked and unpickled by `pickle_guard`, which admits exactly the data checkpoints hold,
arguments checked. torch's own `weights_only` loader cannot: it rejects pickle protocol 4
(LAION-CLAP's releases) and the NumPy scalars their optimizer state holds (the learning rate after
warm-up).
"""
from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from clap_model import files, hf_format
from clap_model import pickle_guard as guard
from clap_model import msclap_format
from clap_model.clap import CLAP
from clap_model.config import AudioConfig, ModelConfig, TextConfig, UsageError, get_preset, preset_text_models

# Older transformers saved this buffer; newer ones do not register it as state (LAION-CLAP drops it too).
OBSOLETE_KEYS = ("text_branch.embeddings.position_ids",)


MAX_CONFIG_INT = 1 << 22
# A config may describe a model larger than its weights by this much (buffers not saved, fp16 weights).
MODEL_SLACK_BYTES = 64 << 20


class CheckpointError(UsageError):
    pass


class FolderCheckpoint(dict):
    """What `read` makes of a Hugging Face folder or hub id the user named: its config's text tower
    is that folder, named by the user (an unpickled file is never of this type)."""


def _check_loaded(path: str | Path, loaded: Any) -> dict[str, Any]:
    """What the commands rely on, refused in one line: a dict with str keys, a dict `config`,
    a str-keyed dict `state_dict`."""
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict")
    for name, value in (("checkpoint", loaded), ("state_dict", loaded.get("state_dict", {})),
                        ("model", loaded.get("model", {}))):
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise CheckpointError(f"{path}: its {name} is not a dict with names (str) as keys")
    if "config" in loaded and not isinstance(loaded["config"], dict):
        raise CheckpointError(f"{path}: its config is a {type(loaded['config']).__name__}, not a dict")
    return loaded


def _load_file(path: str | Path, max_bytes: int | None) -> Any:
    """torch.load on a file whose container was checked first, unpickled by pickle_guard."""
    with guard.open_regular(str(path)) as handle:
        budget = guard.Budget(max_bytes if max_bytes is not None else guard.default_budget(handle.size))
        head = handle.read(4)
        # torch.save writes a zip archive; files from before torch 1.6 are a bare pickle.
        if head == b"PK\x03\x04":
            layout = guard.check_zip(handle, budget)
        elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
            if guard.is_legacy_tar(handle):
                raise guard.Refused("torch < 0.4's tar format, which torch would unpack to disk; "
                                    "refused (re-save it with a current torch)")
            layout = None
        else:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (torch.save file)")
        handle.seek(0)
        # Not torch's weights_only: the guard is the restriction (see the module docstring).
        return torch.load(handle, map_location="cpu", pickle_module=guard.guarded(budget, layout, handle.size),
                          weights_only=False)


def read(path: str | Path, max_bytes: int | None = None) -> dict[str, Any]:
    """A checkpoint file (or Hugging Face folder) as a dict, or a one-line CheckpointError. Loading
    may allocate at most `max_bytes` (default: pickle_guard.default_budget of the file's size)."""
    if hf_format.is_hf_model(str(path)):  # a Hugging Face ClapModel (clap-train --pretrained)
        model = hf_format.load_hf(str(path))
        return FolderCheckpoint(config=model.cfg.to_dict(), state_dict=model.state_dict())
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        loaded = _load_file(path, max_bytes)
    except guard.ForeignGlobal as exc:
        raise CheckpointError(f"{path} holds Python objects besides tensors and plain data (the first: "
                              f"{exc.name}); refused, for safety: unpickling them could run code") from None
    except guard.Refused as exc:
        raise CheckpointError(f"{path}: {one_line(exc)}") from None
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointError(f"cannot open checkpoint {path}: {exc.strerror or one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or damaged file: say so in one line
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or damaged ({one_line(exc)})") from None
    return _check_loaded(path, loaded)


def shown(value: Any) -> str:
    """A value read from a checkpoint, for a message: a plain scalar's repr, cut short; only the type
    of anything else (the repr of a crafted list that nests itself 40 times never ends)."""
    if type(value) is str:
        return repr(value[:40])
    if value is None or type(value) in (bool, float) or (type(value) is int and value.bit_length() <= 64):
        return repr(value)
    return f"a {type(value).__name__}"


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def clean_state_dict(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights of either layout, without DDP's 'module.' prefix and obsolete buffers."""
    if msclap_format.is_msclap_checkpoint(checkpoint):  # e.g. clap-train --pretrained CLAP_weights_2023.pth
        return msclap_format.state_dict_of(checkpoint)[1]
    state = checkpoint.get("state_dict", checkpoint)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in OBSOLETE_KEYS}


def load_weights(model: CLAP, checkpoint: dict[str, Any]) -> None:
    """Strict: any missing or unexpected name is an error naming the first few."""
    try:
        missing, unexpected = model.load_state_dict(clean_state_dict(checkpoint), strict=False)
    except (RuntimeError, TypeError, AttributeError) as exc:  # wrong shapes, or values that are no tensors
        raise CheckpointError(f"checkpoint weights do not fit model {model.cfg.audio.model_type}-"
                              f"{model.cfg.audio.model_name}: {one_line(exc)}") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not fit model {model.cfg.audio.model_type}-{model.cfg.audio.model_name}: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )


def _field_fits(annotation: str, value: Any) -> bool:
    """Whether `value` has the type of a config field (annotations are strings here)."""
    if value is None:
        return "None" in annotation
    if annotation.startswith("tuple"):  # depths, num_heads: a few stages of a few blocks
        return isinstance(value, (list, tuple)) and len(value) <= 8 and all(type(v) is int and 0 < v <= 256
                                                                           for v in value)
    kind = annotation.split("|")[0].strip()
    # Sizes and rates beyond 2^22 build no model we know, only a large allocation.
    return {"int": type(value) is int and 0 <= value <= MAX_CONFIG_INT, "float": type(value) in (int, float),
            "str": type(value) is str, "bool": type(value) is bool}.get(kind, isinstance(value, dict))


def _check_fields(cls: type, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise CheckpointError(f"checkpoint config: {where} is a {type(data).__name__}, not a dict")
    known = {f.name: str(f.type) for f in fields(cls)}
    for key, value in data.items():
        if key not in known:
            raise CheckpointError(f"checkpoint config: unknown key {where}{str(key)[:40]!r}")
        if not _field_fits(known[key], value):
            raise CheckpointError(f"checkpoint config: {where}{key} is {shown(value)}, not {known[key]} "
                                  f"(sizes at most {MAX_CONFIG_INT})")


def checked_config(data: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `config`, refused in one line unless ModelConfig.from_dict can take it: every
    key known, audio and text present, each value of its field's type."""
    _check_fields(ModelConfig, data, "")
    for part, cls in (("audio", AudioConfig), ("text", TextConfig)):
        if part not in data:
            raise CheckpointError(f"checkpoint config: the key {part!r} is missing")
        _check_fields(cls, data[part], f"{part}.")
    return data


def model_config_of(checkpoint: dict[str, Any], preset: str | None, text_model: str | None) -> ModelConfig:
    if msclap_format.is_msclap_checkpoint(checkpoint):  # the names tell 2022 from 2023
        return msclap_format.config_of(checkpoint)
    if "config" in checkpoint:
        cfg = ModelConfig.from_dict(checked_config(checkpoint["config"]))
        if text_model:
            return replace(cfg, text=replace(cfg.text, name_or_path=text_model))
        if not isinstance(checkpoint, FolderCheckpoint):
            check_text_source(cfg.text.name_or_path)
        return cfg
    if preset is None:
        raise CheckpointError("this checkpoint carries no model config (a LAION-CLAP release?): pass --model")
    return get_preset(preset, text_model)


def check_text_source(name: str | None) -> None:
    """A file's config names data, not what to load: its text model is followed only when it is one
    of the presets' hub ids (or None, built in code); a local path or any other id is refused, and
    the user names it with --text-model if they trust it."""
    if name is None or name in preset_text_models():
        return
    raise CheckpointError(f"checkpoint config: text.name_or_path is {shown(name)}, not a preset's hub id "
                          f"({', '.join(sorted(preset_text_models()))}); a checkpoint does not choose a path "
                          "or hub id to load: pass --text-model with the text model you trust")


def _check_model_size(cfg: ModelConfig, weights: dict[str, Any]) -> None:
    """The model a config describes, built on the meta device (no memory): refused when it is far
    larger than the weights the file holds, before it is built for real."""
    with torch.device("meta"):
        model = CLAP(cfg, pretrained_text=False)
    needed = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    held = sum(v.numel() * v.element_size() for v in weights.values() if isinstance(v, torch.Tensor))
    if needed > 2 * held + MODEL_SLACK_BYTES:
        raise CheckpointError(f"its config describes a model of {needed >> 20} MiB; its weights hold "
                              f"{held >> 20} MiB: refused")


def model_from(checkpoint: dict[str, Any], cfg: ModelConfig) -> CLAP:
    """The model of `cfg` with the checkpoint's weights, the text tower's too: built offline for
    the presets' towers (clap_model.text.known_text_config)."""
    try:
        _check_model_size(cfg, clean_state_dict(checkpoint))
        model = CLAP(cfg, pretrained_text=False)
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:  # a config no model has
        raise CheckpointError(f"checkpoint config builds no model: {one_line(exc)}") from None
    load_weights(model, checkpoint)
    return model


def load_model(path: str | Path, preset: str | None = None, text_model: str | None = None,
               max_bytes: int | None = None) -> CLAP:
    """A model built from a checkpoint's config (or `preset` for LAION-CLAP's) with its weights;
    or a Hugging Face ClapModel folder or hub id."""
    if hf_format.is_hf_model(str(path)):
        return hf_format.load_hf(str(path))
    checkpoint = read(path, max_bytes)
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
