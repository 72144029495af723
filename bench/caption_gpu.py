"""Captions/s of `audiodata caption`'s listen and write steps with 7B-shaped models, for a GPU check.

`bench/caption_gpu.sh` runs this once per (step, engine), each in its own process under a time
limit, then `--summary`. Nothing is downloaded: the models are built from configs with random
weights in bf16, directly on the GPU:
- listen: Qwen2-Audio-7B's shape (Whisper-large-v3 encoder, 32 layers of width 1280; Qwen-7B
  decoder, 32 layers of width 4096, vocabulary 156,032);
- write: Qwen2-7B's (= Qwen2.5-7B's) shape (28 layers of width 3584, 28 query / 4 key-value heads,
  vocabulary 152,064).
The tokenizer, processor and chat templates are the tiny models' (`audio_dataset.caption.tiny_*`:
Qwen's chat format and special tokens, Whisper's front end), so prompts have a real prompt's form;
the compute is the 7B model's (its vocabulary covers the tiny one; a token past the tokenizer's
decodes to nothing, which changes no timing).

What runs is the step's own code, not a copy: `TransformersListener.listen` and
`TransformersWriter.write` (their model swapped for the 7B-shaped one), and for vLLM the offline
engine behind `VllmListener._generate` on a folder holding the 7B config and the tiny tokenizer,
weights `load_format="dummy"` (random, never read from disk), tokens not detokenized (the 7B
vocabulary is past the tiny tokenizer's). The writer goes through vLLM as a server in production
(`--llm-url`); its offline figure here is that engine's ceiling.

Every answer and caption runs to its full length (min_new_tokens, ignore_eos): the figures are for
128-token answers and 64-token captions (the defaults' ceilings); real ones stop sooner. Clips are
10 s of synthetic audio (AudioSet's length: one window, 250 audio tokens); three questions each.

Without CUDA it runs the same steps with the tiny shapes on CPU (how it is tested off the device).

    python bench/caption_gpu.py --step listen --engine transformers --json OUT.json [--seconds 80]
    python bench/caption_gpu.py --summary OUT/*.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from checks import require  # noqa: E402

STARTED = time.monotonic()  # --seconds counts from here: imports and model building included

RATE = 16000
CLIP_SECONDS = 10.0
# Qwen2-Audio-7B's config.json (audio_config, text_config) and Qwen2-7B-Instruct's.
ALM_7B_AUDIO = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                    num_mel_bins=128, max_source_positions=1500)
ALM_7B_TEXT = dict(vocab_size=156032, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rope_theta=10000.0,
                   rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)
LLM_7B_TEXT = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                   num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
                   rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.02)
# tiny_alm.make_tiny_alm's audio tower; the text shape is tiny_llm.tiny_qwen2_config's.
TINY_AUDIO = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=128,
                  max_source_positions=1500)


@dataclass(frozen=True)
class Setup:
    step: str  # listen | write
    engine: str  # transformers | vllm
    big: bool  # 7B shapes on CUDA, else tiny shapes on CPU
    device: str
    batch_sizes: tuple[int, ...]
    new_tokens: int
    seconds: float  # start no batch size that would end past this


def _configs(step: str, big: bool, tokenizer):
    """The model config for `step`, in the big or tiny shape, over the tiny tokenizer's special ids."""
    from transformers import Qwen2AudioConfig, Qwen2Config

    from audio_dataset.caption.tiny_alm import AUDIO
    from audio_dataset.caption.tiny_llm import ENDOFTEXT, IM_END, tiny_qwen2_config

    eos, pad = tokenizer.convert_tokens_to_ids([IM_END, ENDOFTEXT])
    if big:
        text = ALM_7B_TEXT if step == "listen" else LLM_7B_TEXT
        text_config = Qwen2Config(eos_token_id=eos, pad_token_id=pad, bos_token_id=None, **text)
    else:
        text_config = tiny_qwen2_config(len(tokenizer), eos, pad)
    if step == "write":
        return text_config
    return Qwen2AudioConfig(audio_config=ALM_7B_AUDIO if big else TINY_AUDIO, text_config=text_config.to_dict(),
                            audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO))


def random_model(model_class, config, device: str, dtype):
    """`model_class(config)` with its own random initialisation, allocated on `device` in `dtype`
    (no float32 copy on the host first: a 7B model is built on the GPU in seconds)."""
    import torch

    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval()


def force_length(model, tokens: int) -> None:
    """Every sequence generates exactly `tokens` new tokens (random weights may pick EOS early)."""
    model.generation_config.min_new_tokens = tokens


def clips(count: int):
    import numpy as np

    from audio_dataset.caption.types import Clip

    rng = np.random.default_rng(0)
    t = np.arange(int(CLIP_SECONDS * RATE)) / RATE
    return [Clip(f"clip{i}", (0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t) + 0.05 * rng.standard_normal(len(t)))
                 .astype(np.float32), RATE) for i in range(count)]


def requests(count: int):
    """Write requests shaped as the stage makes them: metadata and three answers for one window."""
    from audio_dataset.caption.listen import DEFAULT_QUESTIONS
    from audio_dataset.caption.types import WindowAnswer, WriteRequest

    answer = ("A dog barks several times in a backyard while birds chirp and a car passes in the distance; "
              "no speech, no music.")
    return [WriteRequest(f"key{i}", {"title": f"Dog barking {i}", "tags": ["dog", "bark", "backyard", "birds"],
                                     "description": "Recorded in the garden one morning.",
                                     "text": ["A dog is barking outside."]},
                         tuple(WindowAnswer(0.0, CLIP_SECONDS, q, answer) for q in DEFAULT_QUESTIONS))
            for i in range(count)]


# ---------------------------------------------------------------------------------- the engines

def transformers_listen(setup: Setup, folders: dict[str, Path]) -> Callable[[int, int], int]:
    """A TransformersListener over the tiny folder, its model swapped for the `setup`-shaped one;
    the returned run(batch, tokens) answers three questions about `batch` clips, `batch` at a time."""
    from audio_dataset.caption.listen import DEFAULT_QUESTIONS, ListenOptions, make_listener, resolve_alm
    from audio_dataset.caption.write import _torch_dtype

    options = ListenOptions(model=str(folders["alm"]), max_new_tokens=setup.new_tokens)
    listener = make_listener(options, *resolve_alm(options), setup.device)
    from transformers import Qwen2AudioForConditionalGeneration

    listener.model = random_model(Qwen2AudioForConditionalGeneration,
                                  _configs("listen", setup.big, listener.processor.tokenizer), setup.device,
                                  _torch_dtype("auto", setup.device))

    def run(batch: int, tokens: int) -> int:
        listener.options = replace(options, batch_size=batch, max_new_tokens=tokens)
        force_length(listener.model, tokens)
        answers = listener.listen(clips(batch), list(DEFAULT_QUESTIONS))
        return sum(len(a) for a in answers)
    return run


def transformers_write(setup: Setup, folders: dict[str, Path]) -> Callable[[int, int], int]:
    from transformers import Qwen2ForCausalLM

    from audio_dataset.caption.types import LLM_ERROR
    from audio_dataset.caption.write import Decoding, WriterConfig, _torch_dtype, make_writer

    config = WriterConfig(llm=str(folders["llm"]), device=setup.device, language=None,
                          decoding=Decoding(max_new_tokens=setup.new_tokens))
    writer = make_writer(config)
    writer.model = random_model(Qwen2ForCausalLM, _configs("write", setup.big, writer.tokenizer), setup.device,
                                _torch_dtype("auto", setup.device))

    def run(batch: int, tokens: int) -> int:
        writer.config = replace(config, batch_size=batch, decoding=Decoding(max_new_tokens=tokens))
        force_length(writer.model, tokens)
        written = writer.write(requests(2 * batch), 1, 0)
        return sum(any(c.outcome != LLM_ERROR for c in candidates) for candidates in written)
    return run


def _vllm_folder(step: str, folders: dict[str, Path], tmp: Path) -> Path:
    """The tiny folder's tokenizer and processor with the 7B config, and no weights (vLLM's dummy load)."""
    from transformers import AutoTokenizer

    source = folders["alm" if step == "listen" else "llm"]
    folder = tmp / f"{step}-7b"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    _configs(step, True, AutoTokenizer.from_pretrained(source)).save_pretrained(folder)
    return folder


def vllm_listen(setup: Setup, folders: dict[str, Path], tmp: Path) -> Callable[[int, int], int]:
    """VllmListener's own prompts and `_generate`, its engine on dummy 7B-shaped weights."""
    from vllm import LLM, SamplingParams

    from audio_dataset.caption.listen import DEFAULT_QUESTIONS, FAMILIES, ListenOptions, VllmListener, \
        load_processor

    options = ListenOptions(model=str(folders["alm"]), max_new_tokens=setup.new_tokens, engine="vllm")
    listener = VllmListener.__new__(VllmListener)  # its __init__ would read weights from the folder
    listener.options, listener.family, listener.device = options, FAMILIES["qwen2_audio"], setup.device
    listener.processor = load_processor(listener.family, str(folders["alm"]))
    listener.sample_rate, listener.window_seconds = RATE, 30.0
    listener.prompts = {q: listener.prompt(q) for q in DEFAULT_QUESTIONS}
    listener.llm = LLM(model=str(_vllm_folder("listen", folders, tmp)), load_format="dummy", dtype="bfloat16",
                       max_num_seqs=max(setup.batch_sizes), limit_mm_per_prompt={"audio": 1},
                       max_model_len=4096, gpu_memory_utilization=0.85)

    def run(batch: int, tokens: int) -> int:
        listener.options = replace(options, batch_size=batch)
        listener.params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
        return sum(len(a) for a in listener.listen(clips(batch), list(DEFAULT_QUESTIONS)))
    return run


def vllm_write(setup: Setup, folders: dict[str, Path], tmp: Path) -> Callable[[int, int], int]:
    """The writer's own prompts (rendered by the tiny writer on CPU) through the offline engine."""
    from vllm import LLM, SamplingParams

    from audio_dataset.caption.write import Decoding, WriterConfig, make_writer

    prompter = make_writer(WriterConfig(llm=str(folders["llm"]), device="cpu", language=None,
                                        decoding=Decoding(max_new_tokens=setup.new_tokens)))
    llm = LLM(model=str(_vllm_folder("write", folders, tmp)), load_format="dummy", dtype="bfloat16",
              max_num_seqs=max(setup.batch_sizes), max_model_len=4096, gpu_memory_utilization=0.85)

    def run(batch: int, tokens: int) -> int:
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
        prompts = [prompter.prompt(r, 1) for r in requests(2 * batch)]
        done = 0
        for first in range(0, len(prompts), batch):  # the transformers writer's batches
            done += len(llm.generate(prompts[first:first + batch], params, use_tqdm=False))
        return done
    return run


# ---------------------------------------------------------------------------------- the run

def vllm_status() -> str | None:
    """None where vLLM imports, else why not (one line)."""
    import importlib

    try:
        importlib.import_module("vllm")
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA mismatch raised at import
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None


def measure(setup: Setup, json_path: Path) -> dict[str, Any]:
    """Build the engine, warm it up, then time each batch size; the JSON is rewritten after each
    row, so a run stopped by its time limit keeps what it measured."""
    import torch

    from audio_dataset.caption.tiny_alm import make_tiny_alm
    from audio_dataset.caption.tiny_llm import make_tiny_llm

    started = STARTED
    result: dict[str, Any] = {"step": setup.step, "engine": setup.engine, "shape": "7b" if setup.big else "tiny",
                              "device": torch.cuda.get_device_name(0) if setup.device == "cuda" else "cpu",
                              "new_tokens": setup.new_tokens, "clip_seconds": CLIP_SECONDS, "rows": [],
                              "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                                           "vllm": _version("vllm")}}

    def save() -> None:
        json_path.write_text(json.dumps(result, indent=1))

    if setup.engine == "vllm" and (why := vllm_status()) is not None:
        result["skipped"] = f"vllm does not import here ({why})"
        print(f"{setup.step}/vllm: skipped: {result['skipped']}")
        save()
        return result
    with tempfile.TemporaryDirectory() as tmp:
        # The tokenizers, processors and templates (tiny_models' CLAP would need the clap-train stack).
        folders = {"alm": make_tiny_alm(Path(tmp) / "alm"), "llm": make_tiny_llm(Path(tmp) / "llm")}
        builders = {("listen", "transformers"): transformers_listen, ("write", "transformers"): transformers_write}
        if setup.engine == "vllm":
            run = (vllm_listen if setup.step == "listen" else vllm_write)(setup, folders, Path(tmp))
        else:
            run = builders[(setup.step, setup.engine)](setup, folders)
        result["build_seconds"] = round(time.monotonic() - started, 1)
        if setup.device == "cuda":
            result["gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        save()
        run(2, 4)  # warm-up: first kernels, allocator, feature extractor
        last = 0.0
        for batch in setup.batch_sizes:
            if time.monotonic() - started + 1.5 * last > setup.seconds:
                result.setdefault("not_run", []).append(batch)
                continue
            start = time.perf_counter()
            items = run(batch, setup.new_tokens)
            last = time.perf_counter() - start
            expected = _expected(setup.step, batch)
            require(items == expected, f"{setup.step}/{setup.engine} batch {batch}: {items} {_unit(setup.step)} "
                                       f"made of {expected}")
            row = {"batch_size": batch, "items": items, "seconds": round(last, 3),
                   "per_second": round(items / last, 3), "tokens_per_second": round(items * setup.new_tokens / last, 1)}
            result["rows"].append(row)
            print(f"{setup.step}/{setup.engine} batch {batch}: {items} {_unit(setup.step)} in {last:.2f} s, "
                  f"{row['per_second']:.2f}/s, {row['tokens_per_second']:.0f} tokens/s")
            save()
    result["seconds"] = round(time.monotonic() - started, 1)
    save()
    return result


def _expected(step: str, batch: int) -> int:
    """What a run at `batch` must make: three answers for each one-window clip, or one caption for
    each of the 2 x batch requests."""
    from audio_dataset.caption.listen import DEFAULT_QUESTIONS

    return batch * len(DEFAULT_QUESTIONS) if step == "listen" else 2 * batch


def _unit(step: str) -> str:
    return "answers" if step == "listen" else "captions"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def summary(paths: list[Path]) -> str:
    """One line per step, engine and batch size from the phases' JSON files."""
    lines = []
    for path in paths:
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError):
            lines.append(f"{path.name}: unreadable (the phase died before writing)")
            continue
        head = f"{found['step']:6} {found['engine']:12} {found['shape']:4} {found['device']}"
        if "skipped" in found:
            lines.append(f"{head}: skipped: {found['skipped']}")
            continue
        for row in found["rows"]:
            lines.append(f"{head}: batch {row['batch_size']:3}: {row['per_second']:8.2f} {_unit(found['step'])}/s "
                         f"({row['tokens_per_second']:.0f} new tokens/s, {found['new_tokens']} tokens each)")
        if found.get("not_run"):
            lines.append(f"{head}: batch {found['not_run']} not run (time limit)")
        if not found["rows"] and not found.get("not_run"):
            lines.append(f"{head}: no row (stopped while building or warming up)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=("listen", "write"))
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, help="per answer or caption (default: 128 listen, 64 write on "
                                                       "CUDA; 8 on CPU)")
    parser.add_argument("--seconds", type=float, default=120.0, help="start no batch size that would end past this")
    parser.add_argument("--summary", type=Path, nargs="+", help="print the summary of these JSON files and exit")
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if not args.step or not args.json:
        parser.error("--step and --json (or --summary FILES)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    big = torch.cuda.is_available()
    tokens = args.new_tokens or ((128 if args.step == "listen" else 64) if big else 8)
    setup = Setup(args.step, args.engine, big, "cuda" if big else "cpu", tuple(args.batch_sizes), tokens,
                  args.seconds)
    measure(setup, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
