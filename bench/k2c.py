"""k2c throughput: captions per second by batch size, through the same captioner `audiodata k2c` uses.

No network here, so the model is a T5 of the published shape (t5-base: keytotext's k2t-base;
t5-small) built from a config with random weights and the byte-level ByT5 tokenizer, saved and loaded
back through the real `--model PATH` loading path. Random weights rarely emit end-of-sequence, so
generation is pinned to exactly --new-tokens tokens per caption (a typical caption's length in T5
tokens): every batch size does the same work, and the figure is the cost of a caption of that length.
Keyword lists are real AudioSet label names (2-4 per input).

    python bench/k2c.py --shape base --batch-sizes 1,8,32 --inputs 32
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checks import require  # noqa: E402

SHAPES = {
    # d_model, d_ff, layers, heads (d_kv = d_model / heads), as in the T5 paper's checkpoints.
    "small": (512, 2048, 6, 8),
    "base": (768, 3072, 12, 12),
}


def build_model(shape: str, folder: Path) -> Path:
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    d_model, d_ff, layers, heads = SHAPES[shape]
    config = T5Config(vocab_size=32128, d_model=d_model, d_ff=d_ff, d_kv=d_model // heads, num_layers=layers,
                      num_heads=heads, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def keyword_lists(count: int) -> list:
    from audio_dataset.k2c.keywords import load_ontology, tag_keywords

    ontology = load_ontology()
    ids = sorted(ontology)
    rng = random.Random(0)
    return [tag_keywords(rng.sample(ids, rng.randint(2, 4)), ontology) for _ in range(count)]


def measure(captioner, inputs: list, batch_size: int) -> float:
    captioner.batch_size = batch_size
    captioner.caption(inputs[:batch_size], seed=0)  # warm-up: first-call allocations
    start = time.perf_counter()
    captions = captioner.caption(inputs, seed=0)
    elapsed = time.perf_counter() - start
    wanted = captioner.decoding.num_captions
    # Random weights over byte tokens may decode to blank text: what counts is that each input got
    # its captions generated (the token count is pinned), not what they say.
    made = sum(len(found) == wanted for found in captions)
    require(len(captions) == len(inputs) and made == len(inputs),
            f"batch {batch_size}: {made} of {len(inputs)} inputs got their {wanted} captions")
    return len(inputs) * wanted / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="base")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--inputs", type=int, default=32, help="keyword lists per measurement")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)

    import torch

    from audio_dataset.k2c.generate import Decoding, Seq2SeqCaptioner, TemplateCaptioner
    from audio_dataset.k2c.models import resolve_model

    torch.set_num_threads(args.threads)
    inputs = keyword_lists(args.inputs)
    decoding = Decoding(num_beams=args.num_beams, max_new_tokens=args.new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        model = resolve_model(str(build_model(args.shape, Path(tmp))), "--model")
        captioner = Seq2SeqCaptioner(model, decoding, 1, args.device, args.dtype)
    config = captioner.model.generation_config
    config.min_new_tokens = args.new_tokens
    # The output layer has T5's 32128 entries (its cost counts); the byte tokenizer decodes ids < 384.
    config.suppress_tokens = list(range(384, captioner.model.config.vocab_size))
    params = sum(p.numel() for p in captioner.model.parameters()) / 1e6

    print(f"t5-{args.shape} shape ({params:.0f}M parameters, random weights), {args.device} {args.dtype}, "
          f"{args.threads} torch threads, beams {args.num_beams}, {args.new_tokens} new tokens, "
          f"{args.inputs} inputs, load average {os.getloadavg()[0]:.1f}")
    print("| batch size | captions/s |\n| ---: | ---: |")
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        print(f"| {batch_size} | {measure(captioner, inputs, batch_size):.2f} |", flush=True)
    start = time.perf_counter()
    made = TemplateCaptioner().caption(inputs * 100, seed=0)
    require(len(made) == len(inputs) * 100 and all(made), "the template baseline captioned fewer inputs")
    print(f"template baseline: {len(inputs) * 100 / (time.perf_counter() - start):.0f} captions/s")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
