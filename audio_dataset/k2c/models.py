"""Pinning models for reproduction: a local folder by a digest of its files, a hub id by the commit
it resolved to. Hub models are fetched once, in the driver, so every worker loads the same files."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from audio_dataset.source import UserError

# Configs, tokenizer files and safetensors weights; PyTorch pickles only when a repo has no safetensors
# (k2t-base carries both, 892 MB each). Never other frameworks' weights.
_HUB_FILES = ["*.json", "*.model", "*.txt", "*.safetensors"]
_HUB_FALLBACK = ["pytorch_model.bin", "*/pytorch_model.bin"]


@dataclass(frozen=True)
class ResolvedModel:
    """What the user named, where it loads from, and which revision that is."""

    spec: str
    path: str
    # The hub commit hash, or for a local folder "sha256:" + a digest of its files.
    revision: str


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def resolve_model(spec: str, flag: str, revision: str | None = None, hub_owner: str | None = None) -> ResolvedModel:
    """`spec` is a local folder or a hub id; `hub_owner` completes bare names ("all-MiniLM-L6-v2")."""
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(f"{flag} {spec}: not a model folder (no config.json)")
        if revision:  # a folder has one version; silently ignoring --revision would misrecord the run
            raise UserError(f"--revision {revision}: only for a hub id, and {flag} {spec} is a local folder")
        return ResolvedModel(spec, str(local.resolve()), folder_digest(local))
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UserError(f"{flag} {spec}: no such folder")
    repo = f"{hub_owner}/{spec}" if hub_owner and "/" not in spec else spec
    from huggingface_hub import constants, snapshot_download

    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=_HUB_FILES)
        if not any(Path(path).rglob("*.safetensors")):
            # Same commit as the first call, whatever `revision` points at by now.
            path = snapshot_download(repo, revision=Path(path).name, allow_patterns=_HUB_FILES + _HUB_FALLBACK)
    except Exception as exc:  # the hub raises many types; each means "cannot get this model"
        if constants.HF_HUB_OFFLINE:  # the hub's own message is three sentences, cut mid-word at 200 chars
            raise UserError(f"{flag} {spec}: not in the local Hugging Face hub cache and HF_HUB_OFFLINE is set; "
                            "download it where there is network, or pass a local folder") from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{flag} {spec}: cannot get it from the Hugging Face hub: {first[:200]}") from None
    return ResolvedModel(spec, path, Path(path).name)
