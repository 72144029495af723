"""Shared set-up of the parity harness (parity/run.sh runs it in its own virtualenv).

The reference packages are imported as they are, with two exceptions forced by the index's wheels:
torchvision and torchaudio there are CUDA builds whose C++ parts do not load beside CPU torch, and
their package `__init__` loads those parts. So `torchvision`, `torchvision.ops`,
`torchvision.datasets` and `torchaudio` are registered as bare packages (their submodules import
from the installed files, their `__init__` does not run): the references then use the real
`torchvision.transforms.Resize`, `torchvision.ops.misc.FrozenBatchNorm2d`,
`torchaudio.transforms.MelSpectrogram`; `torchvision.datasets` (image data sets LAION-CLAP's
data.py imports and never calls) stays empty, and `torchaudio._extension` says what torchaudio
built without its C++ extension says (none available).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # no hub: text towers are built from configs
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parent.parent
REAL_AUDIO_DIR = REPO / "tests" / "data" / "real-audio"
RATE = 48_000
ATOL = 1e-4  # embeddings, max abs
MEL_DB = 0.05  # mel, max abs in dB
CAPTIONS = ["a dog barks twice", "rain on a tin roof, then thunder", "ünïcode strings and digits 123"]


def _bare_package(name: str) -> None:
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed (parity/requirements-nodeps.txt)")
    module = types.ModuleType(name)
    module.__path__ = list(spec.submodule_search_locations)
    module.__file__ = spec.origin
    module.__spec__ = spec
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


for _name in ("torchvision", "torchvision.ops", "torchvision.datasets", "torchaudio"):
    _bare_package(_name)
# torchaudio's extension module as torchaudio sets it up when built without its C++ extension.
_no_extension = types.ModuleType("torchaudio._extension")
_no_extension._IS_TORCHAUDIO_EXT_AVAILABLE = False
_no_extension._IS_ALIGN_AVAILABLE = False
_no_extension.fail_if_no_align = importlib.import_module("torchaudio._internal.module_utils").fail_with_message(
    "Requires alignment extension, but TorchAudio is not compiled with it.")
sys.modules["torchaudio._extension"] = _no_extension
importlib.import_module("torchaudio.transforms")  # `import torchaudio` alone would have brought it
# clap_model/ from this checkout (run.sh sets PYTHONPATH too; this is for a bare `pytest parity`),
# and the tests' helper modules (appended: `conftest` stays this one).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.append(str(REPO / "tests"))
from random_weights import perturb  # noqa: E402,F401  (for the test modules)


def real_clip(name: str, seconds: float | None = None) -> np.ndarray:
    """A recording from tests/data/real-audio, mono float32 at 48 kHz (our decoder: the same array
    goes to both sides)."""
    from clap_model.data import decode_audio

    wave = decode_audio((REAL_AUDIO_DIR / f"{name}.ogg").read_bytes(), RATE)
    return wave[: int(seconds * RATE)] if seconds else wave


@pytest.fixture(scope="session")
def clips() -> list[np.ndarray]:
    """Shorter than a 10 s clip (filled), longer (cropped or fused), and much longer (fusion's
    shrunk global view over 47 s)."""
    return [real_clip("456440__inspectorj__bird-whistling-robin-single-13"), real_clip("198-209-0000"),
            real_clip("pibble")]


@pytest.fixture
def crops_like_ours(monkeypatch):
    """The references crop long clips at random (np.random); ours, evaluating, at the start, and
    fusion's three local crops at the middle of their ranges. Make their random picks those."""
    monkeypatch.setattr(np.random, "randint", lambda low, high=None, *a, **k: 0)
    monkeypatch.setattr(np.random, "choice", lambda options, *a, **k: options[len(options) // 2])


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Small shared CI machines: oversubscribed threads are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)
