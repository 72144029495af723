"""Audio embedding throughput, ours against LAION-CLAP's own, on the same clips and the same weights.

The reference is LAION-CLAP 1.1.7's `CLAP_Module.get_audio_embedding_from_filelist` (librosa load
at 48 kHz, int16 round trip, `get_audio_features` per clip, one forward pass over the list), run in
the parity virtualenv (`.venv-parity`: LAION-CLAP pins numpy<2) as a subprocess of this script;
its model is HTSAT-tiny with random, perturbed weights (no network: the text tower is RoBERTa-base's
architecture, randomly initialised), saved as LAION-CLAP's training saves. Ours loads that same
checkpoint (`--model htsat-tiny-roberta`) and runs what every `audiodata embed` worker runs per shard
for the audio: `EmbedProcessor`'s decode (clap-train's `read_clip`, int16) and `embed_waves`
(batched forward passes), over the same clips as FLAC members. Both sides use the same torch thread
count; the sides alternate (reference, ours, reference, ours) and each side's best run is reported,
so a machine loaded by others weighs on both alike. LAION-CLAP's function runs without
`torch.no_grad()` (it builds the autograd graph): it is timed as a user calls it, and also inside
`no_grad`, the fairer figure.

It asserts what it reports: every clip embedded on both sides, and the two sides' embeddings the
same (cosine >= 0.9999 per clip: the comparison is of one computation).

    python bench/embed_vs_laion.py --clips 32 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PARITY_PYTHON = Path(os.environ.get("PARITY_VENV", "/work/main/.venv-parity")) / "bin" / "python"
RATE, SECONDS = 48_000, 10.0


def make_clips(folder: Path, count: int) -> list[Path]:
    """The test clips cut to 10 s (shorter ones stay short: both sides repeat-pad them), 48 kHz mono
    16-bit FLAC, repeated under distinct names to `count`."""
    from audio_dataset import audio as audio_lib

    sources = sorted((ROOT / "tests" / "data" / "real-audio").glob("*.ogg"))
    encoded = []
    for path in sources:
        decoded = audio_lib.decode(path.read_bytes())
        mono = audio_lib.resample(audio_lib.set_channels(decoded.samples, 1), decoded.sample_rate, RATE)
        encoded.append(audio_lib.encode_flac(mono[:, : int(SECONDS * RATE)], RATE))
    files = []
    for i in range(count):
        files.append(folder / f"clip{i:04d}.flac")
        files[-1].write_bytes(encoded[i % len(encoded)])
    return files


# ------------------------------------------------------------------ the reference (parity venv)
def reference_side(folder: Path, threads: int, no_grad: bool) -> None:
    """In the parity venv: make the checkpoint once, then time get_audio_embedding_from_filelist."""
    import torch

    sys.path.insert(0, str(ROOT / "parity"))
    import conftest  # noqa: F401  (registers the references' bare packages)
    import pytest
    from test_laion import hook, save_as_laion_training

    from clap_model.text import byte_tokenizer, known_text_config

    torch.set_num_threads(threads)
    checkpoint = folder / "laion.pt"
    with pytest.MonkeyPatch.context() as patch:
        from types import SimpleNamespace

        from transformers import RobertaModel

        laion_model = sys.modules["clap_module.model"]
        # RoBERTa-base's architecture, random: what `--model htsat-tiny-roberta` builds on our side.
        patch.setattr(laion_model, "RobertaModel",
                      SimpleNamespace(from_pretrained=lambda name: RobertaModel(known_text_config("roberta-base"))))
        patch.setattr(hook, "RobertaTokenizer", SimpleNamespace(from_pretrained=lambda name: byte_tokenizer()))
        torch.manual_seed(0)
        module = hook.CLAP_Module(enable_fusion=False, device="cpu", amodel="HTSAT-tiny", tmodel="roberta")
    conftest.perturb(module.model, 1)  # seeded: every run of this side builds the same weights
    if not checkpoint.exists():
        save_as_laion_training(module, checkpoint)
    module.eval()
    files = sorted(str(p) for p in folder.glob("clip*.flac"))
    started = time.perf_counter()
    if no_grad:
        with torch.no_grad():
            emb = module.get_audio_embedding_from_filelist(files)
    else:
        emb = module.get_audio_embedding_from_filelist(files)
    seconds = time.perf_counter() - started
    np.save(folder / "laion.npy", np.asarray(emb, np.float32))
    (folder / "laion.json").write_text(json.dumps({"seconds": seconds, "count": len(emb)}))


def run_reference(folder: Path, threads: int, no_grad: bool) -> tuple[float, np.ndarray]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    args = [str(PARITY_PYTHON), __file__, "--reference", str(folder), "--threads", str(threads)]
    done = subprocess.run(args + (["--no-grad"] if no_grad else []), env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the reference side failed:\n{done.stderr[-3000:]}")
    result = json.loads((folder / "laion.json").read_text())
    return result["seconds"], np.load(folder / "laion.npy")


# ------------------------------------------------------------------------------------ ours
def our_side(folder: Path, files: list[Path], threads: int, batch: int,
             precision: str = "fp32") -> tuple[float, np.ndarray]:
    import torch

    from audio_dataset.curate.embed import EmbedOptions, EmbedProcessor, _decode

    torch.set_num_threads(threads)
    processor = EmbedProcessor(EmbedOptions(checkpoint=folder / "laion.pt", preset="htsat-tiny-roberta",
                                            batch_size=batch, precision=precision), "cpu")
    members = [path.read_bytes() for path in files]  # as a shard's members are in a worker's memory
    started = time.perf_counter()
    waves = [_decode(data, processor.read_spec) for data in members]
    emb = processor.embed_waves(waves)
    return time.perf_counter() - started, emb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bf16", action="store_true",
                        help="also time ours with --precision bf16 (a CPU with AVX512-BF16 or AMX runs it faster)")
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # the parity-venv side
    parser.add_argument("--no-grad", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference_side(args.reference, args.threads, args.no_grad)
        return
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        files = make_clips(folder, args.clips)
        times: dict[str, list[float]] = {"laion": [], "laion_no_grad": [], "ours": [], **({"ours_bf16": []} if args.bf16 else {})}
        for _ in range(args.rounds):
            seconds, theirs = run_reference(folder, args.threads, no_grad=False)
            times["laion"].append(seconds)
            seconds, theirs = run_reference(folder, args.threads, no_grad=True)
            times["laion_no_grad"].append(seconds)
            seconds, ours = our_side(folder, files, args.threads, args.batch_size)
            times["ours"].append(seconds)
            if args.bf16:
                seconds, ours_bf16 = our_side(folder, files, args.threads, args.batch_size, "bf16")
                times["ours_bf16"].append(seconds)
        assert theirs.shape == ours.shape == (args.clips, 512), (theirs.shape, ours.shape)
        cosines = _cosines(theirs, ours)
        assert cosines.min() >= 0.9999, f"the sides disagree: cosine min {cosines.min():.6f}"
        if args.bf16:
            assert ours_bf16.shape == theirs.shape, ours_bf16.shape
            bf16 = _cosines(theirs, ours_bf16)
            assert bf16.min() >= 0.99, f"bf16 strays from the reference: cosine min {bf16.min():.6f}"
            print(f"bf16 against the reference's fp32: cosine min {bf16.min():.6f}, mean {bf16.mean():.6f}")
        rate = {side: args.clips / min(runs) / args.threads for side, runs in times.items()}
        print(f"{args.clips} clips, {args.threads} thread(s), batch {args.batch_size}, cosine min {cosines.min():.6f}")
        for side, runs in times.items():
            print(f"  {side:14s} best {min(runs):7.2f} s of {[round(r, 2) for r in runs]}: "
                  f"{rate[side]:.2f} samples/s per core")
        for side in [s for s in ("ours", "ours_bf16") if s in rate]:
            print(f"ratio {side} / LAION-CLAP: {rate[side] / rate['laion']:.2f}x as called, "
                  f"{rate[side] / rate['laion_no_grad']:.2f}x against it under no_grad")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


if __name__ == "__main__":
    main()
