"""`python -m audio_dataset.caption.tiny_models OUT`: the three tiny random-weight models the
caption stage runs in tests, the README and the benchmark, built here with no download:
OUT/alm (Qwen2-Audio), OUT/llm (a Qwen2 chat LLM) and OUT/clap.pt (the `tiny` CLAP preset).
They exercise the whole pipeline; their captions are noise."""
from __future__ import annotations

import sys
from pathlib import Path


def make_tiny_clap(path: str | Path, seed: int = 0) -> Path:
    """A clap-train checkpoint of the `tiny` preset with random weights (as tests/test_curate.py makes)."""
    import torch

    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLAP(get_preset("tiny"), pretrained_text=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)
    return path


def make_tiny_models(out: str | Path) -> dict[str, Path]:
    from audio_dataset.caption.tiny_alm import make_tiny_alm
    from audio_dataset.caption.tiny_llm import make_tiny_llm

    out = Path(out)
    return {"alm": make_tiny_alm(out / "alm"), "llm": make_tiny_llm(out / "llm"),
            "clap": make_tiny_clap(out / "clap.pt")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m audio_dataset.caption.tiny_models OUT", file=sys.stderr)
        return 2
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name, path in make_tiny_models(argv[0]).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
