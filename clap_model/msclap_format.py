"""Microsoft CLAP's weight files (`CLAP_weights_2022.pth`, `CLAP_weights_2023.pth`) in and out.

msclap 1.3.4 saves `{'model': state_dict}` of its `CLAP` module: `audio_encoder.base` (CNN14, or
HTSAT under `.htsat`), `audio_encoder.projection`, `caption_encoder.base` (a transformers BERT or
GPT-2), `caption_encoder.projection`, `logit_scale`. Inside those modules the names are already ours
(LAION-CLAP's CNN14 / HTSAT, transformers' text models, `MsclapProjection`), so the conversion is the
prefix table below. GPT-2 files from older transformers also hold the causal-mask buffers
`h.N.attn.bias` / `h.N.attn.masked_bias`, and BERT ones `embeddings.position_ids`: not weights,
dropped on loading.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from clap_model.clap import CLAP
from clap_model.config import PRESETS, ModelConfig, UsageError

VERSIONS = ("2022", "2023")

# msclap prefix -> ours, per version; the first matching prefix wins.
_COMMON = (
    ("audio_encoder.projection.", "audio_projection."),
    ("caption_encoder.base.", "text_branch."),
    ("caption_encoder.projection.", "text_projection."),
    ("logit_scale", "logit_scale_a"),
)
PREFIXES: dict[str, tuple[tuple[str, str], ...]] = {
    "2022": (("audio_encoder.base.", "audio_branch."), *_COMMON),
    "2023": (("audio_encoder.base.htsat.", "audio_branch."), *_COMMON),
}
OBSOLETE = re.compile(r"^caption_encoder\.base\.(h\.\d+\.attn\.(bias|masked_bias)|embeddings\.position_ids)$")


def _state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    return state if isinstance(state, dict) else None


def is_msclap_checkpoint(checkpoint: dict) -> bool:
    """A top-level `model` state dict with msclap's audio and caption encoders."""
    state = _state(checkpoint)
    return state is not None and any(k.startswith("audio_encoder.base.") for k in state) \
        and any(k.startswith("caption_encoder.base.") for k in state)


def version_of(state: dict[str, Any]) -> str:
    """'2023' (HTSAT audio encoder, GPT-2 text) or '2022' (CNN14, BERT), from the names."""
    return "2023" if any(k.startswith("audio_encoder.base.htsat.") for k in state) else "2022"


def _inverse(version: str) -> tuple[tuple[str, str], ...]:
    return tuple((ours, theirs) for theirs, ours in PREFIXES[version])


def _rename(name: str, table: tuple[tuple[str, str], ...]) -> str:
    for source, target in table:
        if name.startswith(source):
            return target + name[len(source):]
    return name  # unknown: reported by the strict check


def state_dict_of(checkpoint: dict) -> tuple[str, dict[str, torch.Tensor]]:
    """The file's version and its weights under our names, the obsolete buffers dropped."""
    state = _state(checkpoint)
    if state is None or not is_msclap_checkpoint(checkpoint):
        raise UsageError("not a Microsoft CLAP weight file (no 'model' dict with audio_encoder / caption_encoder)")
    version = version_of(state)
    return version, {_rename(k, PREFIXES[version]): v for k, v in state.items() if not OBSOLETE.match(k)}


def config_of(checkpoint: dict) -> ModelConfig:
    """The `msclap-2022` or `msclap-2023` preset a weight file holds."""
    return PRESETS[f"msclap-{state_dict_of(checkpoint)[0]}"]


def load_msclap(checkpoint: dict) -> CLAP:
    """The `msclap-2022` or `msclap-2023` model with the file's weights; every name must fit."""
    version, ours = state_dict_of(checkpoint)
    model = CLAP(PRESETS[f"msclap-{version}"], pretrained_text=False)  # text tower from config: no hub
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        lost, extra = ([_rename(k, _inverse(version)) for k in names[:3]] for names in (missing, unexpected))
        raise UsageError(f"Microsoft CLAP {version} weights do not fit msclap-{version} (msclap's names): "
                         f"{len(missing)} missing (e.g. {lost}), {len(unexpected)} unexpected (e.g. {extra})")
    return model.eval()


def save_msclap(model: CLAP, path: str | Path) -> None:
    """Write `{'model': state_dict}` under msclap's names, as its CLAPWrapper loads; atomically."""
    version = next((v for v in VERSIONS if model.cfg == PRESETS[f"msclap-{v}"]), None)
    if version is None:
        raise UsageError("msclap's format holds only the msclap-2022 and msclap-2023 models "
                         "(msclap builds no other architecture)")
    state = {_rename(k, _inverse(version)): v.detach().cpu() for k, v in model.state_dict().items()}
    from clap_model.checkpoint import save_atomic  # here: checkpoint imports this module

    save_atomic({"model": state}, Path(path))
