"""`audiodata caption` throughput and the stage's plumbing overhead, with the tiny models.

Models: the tiny random-weight Qwen2-Audio and Qwen2 chat LLM of `audio_dataset.caption.tiny_models`
(saved to a folder, loaded through `--alm-model PATH` / `--llm PATH`), so the figures are the
pipeline's own cost around `generate`, not a 7B model's. Clips: the ten bundled recordings
(tests/data/real-audio, 2-49 s), built into two shards.

- bare: the same work with nothing of the stage around it: the listening model's processor and
  `generate` on the same windows, prompts and batches (per shard, as the stage batches); the LLM's
  `generate` on the same prompts.
- stage: the runner's worker (`stage_runner._Worker.run`, what each Ray actor runs, in as many
  threads as the actor has shards in flight) with `--steps listen,write`: read the tar, decode and
  resample (`prepare`, overlapping the model's work on the other shard), windows, listen, write,
  clean, JSON, write the tar and the manifest part.
- serial: the same, one shard after another (`process_shard`): what the overlap saves.
The overhead is stage / bare - 1 (target: under 10 %). Models are loaded before anything is timed;
bare, stage and serial take turns in each repeat (a drifting machine slows all three alike), and
each figure is the best of the repeats.

    python bench/caption.py [--device cpu] [--batch-size 8] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_input(out: Path, per_shard: int = 5) -> Path:
    """The bundled clips, whole, as FLAC shards with their sidecars' captions (no Ray: the bench
    measures the caption stage, not the build)."""
    from audio_dataset.audio import decode, encode_flac
    from audio_dataset.schema import SampleMeta, safe_key
    from audio_dataset.shards import ShardWriter, write_sizes

    real = ROOT / "tests" / "data" / "real-audio"
    samples = []
    for path in sorted(real.glob("*.ogg")):
        side = json.loads(path.with_suffix(".json").read_text())
        audio = decode(path.read_bytes())
        meta = SampleMeta(text=side["text"], tag=side["tag"], original_data={"description": side["description"]},
                          source="local", source_id=path.stem, license=side["license"], author=side["author"],
                          url=side["url"], duration=round(audio.duration, 3), sample_rate=audio.sample_rate,
                          channels=1)
        samples.append({"__key__": safe_key("local", path.stem), "flac": encode_flac(audio.samples, audio.sample_rate),
                        "json": meta.to_json_bytes()})
    counts = {}
    for index in range(0, len(samples), per_shard):
        name = f"{index // per_shard:06d}.tar"
        with ShardWriter(out / "train" / name) as writer:
            for sample in samples[index:index + per_shard]:
                writer.write(sample)
        counts[name] = len(samples[index:index + per_shard])
    write_sizes(out / "train", counts)
    return out


def bare_listen(listener, clips, questions) -> int:
    """The listener's own batches, straight into the processor and generate: answers produced."""
    import torch

    from audio_dataset.caption.listen import windows

    prompts = {q: listener.prompt(q) for q in questions}
    items = [(clip, start, end, q) for clip in clips
             for start, end in windows(len(clip.audio), listener.sample_rate, listener.window_seconds)
             for q in questions]
    # the listener's order: longest windows first, then by prompt length (the same batches)
    items.sort(key=lambda it: (-(it[2] - it[1]), len(prompts[it[3]])))
    done = 0
    for first in range(0, len(items), listener.options.batch_size):
        chunk = items[first:first + listener.options.batch_size]
        batch = listener.processor(text=[prompts[q] for _, _, _, q in chunk],
                                   audio=[clip.audio[s:e] for clip, s, e, _ in chunk],
                                   sampling_rate=listener.sample_rate, return_tensors="pt", padding=True)
        with torch.inference_mode():
            out = listener.model.generate(**batch, do_sample=False, max_new_tokens=listener.options.max_new_tokens)
        done += len(listener.processor.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    return done


def bare_write(writer, requests) -> int:
    import torch

    prompts = [writer.prompt(request, 1) for request in requests]
    done = 0
    for first in range(0, len(prompts), writer.config.batch_size):
        batch = writer.tokenizer(prompts[first:first + writer.config.batch_size], return_tensors="pt", padding=True,
                                 add_special_tokens=False)
        with torch.inference_mode():
            out = writer.model.generate(**batch, max_new_tokens=writer.config.decoding.max_new_tokens,
                                        do_sample=False, pad_token_id=writer.tokenizer.pad_token_id,
                                        temperature=None, top_p=None, top_k=None)
        done += len(writer.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alm-tokens", type=int, default=16)
    parser.add_argument("--llm-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    from audio_dataset.caption.listen import DEFAULT_QUESTIONS, ListenOptions
    from audio_dataset.caption.stage import CAPTION_SCHEMA, CaptionOptions, CaptionProcessor, _metadata
    from audio_dataset.caption.tiny_models import make_tiny_models
    from audio_dataset.caption.types import WriteRequest
    from audio_dataset.caption.write import Decoding, WriterConfig
    from audio_dataset.caption.write_step import _build
    from audio_dataset.caption.listen import resolve_alm
    from audio_dataset.caption.stage import WriteStep
    from audio_dataset.stage_runner import SHARDS_IN_FLIGHT, _Worker, find_jobs, process_shard, read_input_shard

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Every torch call on the worker's one model thread, as in the actor (a second thread's
        # OpenMP team would slow both: see stage_runner._Worker); the processor is built there too.
        worker = _Worker(lambda device: CaptionProcessor(options, resolve_alm(listen), None, device), args.device,
                         args.threads, CAPTION_SCHEMA)
        worker.on_model_thread(torch.set_num_threads, args.threads)
        models = worker.on_model_thread(make_tiny_models, tmp / "models")
        dataset = build_input(tmp / "clips")
        listen = ListenOptions(model=str(models["alm"]), batch_size=args.batch_size, max_new_tokens=args.alm_tokens)
        config = WriterConfig(llm=str(models["llm"]), batch_size=args.batch_size,
                              decoding=Decoding(max_new_tokens=args.llm_tokens)).resolve()
        options = CaptionOptions(steps=("listen", "write"), listen=listen,
                                 write=WriteStep(lambda device: _build(config, device), config.settings()))
        processor = worker.on_model_thread(worker._processor)
        writer = processor.writer
        questions = list(DEFAULT_QUESTIONS)
        # Per shard, as the stage batches: a batch never mixes two shards' windows, so bare does the
        # same generate calls and the difference is the stage's own work around them.
        shards = [read_input_shard(job) for job in find_jobs(dataset, tmp / "out", "caption")]
        samples = [s for shard in shards for s in shard]
        shard_clips = [[processor._clip(s) for s in shard] for shard in shards]
        clips = [clip for shard in shard_clips for clip in shard]
        # The writer reads the answers, in the stage and here alike (untimed: listen is timed below).
        shard_requests = worker.on_model_thread(
            lambda: [[WriteRequest(s["__key__"], _metadata(json.loads(s["json"])), tuple(a))
                      for s, a in zip(shard, processor.listener.listen(shard_clip, questions))]
                     for shard, shard_clip in zip(shards, shard_clips)])

        def stage() -> int:
            jobs = find_jobs(dataset, tmp / f"out{time.perf_counter_ns()}", "caption")
            with ThreadPoolExecutor(SHARDS_IN_FLIGHT) as pool:  # as the actor's threads take its shards
                return sum(written for _, written in pool.map(worker.run, jobs))

        def serial() -> int:
            out = tmp / f"out{time.perf_counter_ns()}"
            return sum(process_shard(processor, job, CAPTION_SCHEMA) for job in find_jobs(dataset, out, "caption"))

        runs = {"listen": lambda: sum(bare_listen(processor.listener, shard, questions) for shard in shard_clips),
                "write": lambda: sum(bare_write(writer, shard) for shard in shard_requests),
                "stage": stage, "serial": serial}
        worker.on_model_thread(bare_listen, processor.listener, clips[:2], questions[:1])  # warm-up
        best = {name: float("inf") for name in runs}
        counts = {}
        for _ in range(args.repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                counts[name] = fn() if name == "stage" else worker.on_model_thread(fn)
                best[name] = min(best[name], time.perf_counter() - start)
    answers, captions, written = counts["listen"], counts["write"], counts["stage"]
    assert answers > 0 and captions == len(samples) and written == counts["serial"] == len(samples), counts
    t_listen, t_write, t_stage = best["listen"], best["write"], best["stage"]
    windows = answers // len(questions)
    overhead = t_stage / (t_listen + t_write) - 1
    print(f"clips {len(samples)}, windows {windows}, questions {len(questions)}, batch {args.batch_size}, "
          f"device {args.device}, torch threads {args.threads}")
    print(f"listen bare: {answers / t_listen:.2f} answers/s ({windows / t_listen:.2f} windows/s), {t_listen:.2f} s")
    print(f"write bare:  {captions / t_write:.2f} captions/s, {t_write:.2f} s")
    print(f"stage (listen,write): {len(samples) / t_stage:.2f} samples/s, {t_stage:.2f} s; "
          f"overhead vs bare generate {overhead * 100:+.1f} %")
    print(f"serial (one shard after another): {best['serial']:.2f} s; "
          f"overhead {(best['serial'] / (t_listen + t_write) - 1) * 100:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
