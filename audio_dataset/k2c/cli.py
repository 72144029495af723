"""`audiodata k2c` and `audiodata keywords`, registered on the main parser by `add_cli`."""
from __future__ import annotations

import argparse
from pathlib import Path

from audio_dataset.k2c.generate import DEFAULT_MODEL, DTYPES, Decoding
from audio_dataset.k2c.keywords import DEFAULT_KEYBERT_MODEL, SYNONYM_MODES, KeyBertSettings
from audio_dataset.stage_cli import add_run_options, report, run_options
from audio_dataset.stage_runner import RunOptions
from clap_model.flags import add_renamed


def _add_keybert_options(p: argparse.ArgumentParser) -> None:
    d = KeyBertSettings()
    p.add_argument("--keybert-model", default=d.model,
                   help=f"sentence-transformers model for KeyBERT, hub name or folder "
                        f"(default {DEFAULT_KEYBERT_MODEL})")
    p.add_argument("--top-n", type=int, default=d.top_n, help="keyphrases per sample")
    p.add_argument("--ngram-max", type=int, default=d.ngram_max, help="longest keyphrase in words")
    p.add_argument("--diversity", type=float, default=d.diversity,
                   help="> 0 picks diverse keyphrases (maximal marginal relevance)")
    p.add_argument("--description-field", default=d.field,
                   help="dotted JSON field KeyBERT reads; samples without it use their captions")


def _keybert(args: argparse.Namespace) -> KeyBertSettings:
    return KeyBertSettings(model=args.keybert_model, top_n=args.top_n, ngram_max=args.ngram_max,
                           diversity=args.diversity, field=args.description_field)


def _run_options(args: argparse.Namespace) -> RunOptions:
    return run_options(args, args.dataset, args.out)


def run_k2c_command(args: argparse.Namespace) -> int:
    from audio_dataset.k2c.stages import K2COptions, run_k2c

    decoding = Decoding(num_captions=args.num_captions, num_beams=args.num_beams,
                        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, top_p=args.top_p,
                        top_k=args.top_k, temperature=args.temperature)
    options = K2COptions(model=args.caption_model, revision=args.revision, keywords=args.keywords,
                         ontology=args.ontology, synonyms=args.synonyms, keybert=_keybert(args),
                         decoding=decoding, batch_size=args.batch_size, dtype=args.dtype,
                         min_seconds=args.min_seconds,
                         seed=args.seed)
    report("k2c", run_k2c(options, _run_options(args)))
    return 0


def run_keywords_command(args: argparse.Namespace) -> int:
    from audio_dataset.k2c.stages import KeywordsOptions, run_keywords

    report("keywords", run_keywords(KeywordsOptions(_keybert(args), args.replace), _run_options(args)))
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    d = Decoding()
    p = subparsers.add_parser("k2c", help="add keyword-to-caption captions (text_augment_t5/_all) to shards")
    add_run_options(p)
    p.add_argument("--caption-model", default=DEFAULT_MODEL,
                   help=f"the seq2seq captioning model: hub id or local folder, or 'template' "
                        f"(default {DEFAULT_MODEL})")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) of --caption-model")
    p.add_argument("--keywords", choices=("tags", "keybert"), default="tags",
                   help="keywords from the sample's tags, or KeyBERT keyphrases of its description")
    p.add_argument("--ontology", type=Path, help="AudioSet ontology.json (default: the copy shipped)")
    p.add_argument("--synonyms", choices=SYNONYM_MODES, default="first",
                   help="for names like 'Male speech, man speaking': feed the first synonym or all")
    p.add_argument("--num-captions", type=int, default=d.num_captions, help="captions generated per sample")
    p.add_argument("--batch-size", type=int, default=32, help="inputs per generate call (raise it on a GPU)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="model weights; bfloat16 is faster on GPUs")
    p.add_argument("--num-beams", type=int, default=d.num_beams, help="beam search width")
    p.add_argument("--length-penalty", type=float, default=d.length_penalty,
                   help="beam score length exponent (> 1 favours longer captions)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=d.no_repeat_ngram_size,
                   help="no n-gram of this size repeats in a caption (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest caption in tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of pure beam search")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass (with --do-sample)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample from the k likeliest tokens (with --do-sample)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature (with --do-sample)")
    p.add_argument("--seed", type=int, default=0, help="seed for sampled decoding (recorded)")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="clips shorter than this keep their own captions only (LAION: 2 s)")
    _add_keybert_options(p)
    add_renamed(p, {"--model": "--caption-model"})
    p.set_defaults(func=run_k2c_command)

    p = subparsers.add_parser("keywords", help="fill empty `tag` lists with KeyBERT keyphrases of descriptions")
    add_run_options(p)
    _add_keybert_options(p)
    add_renamed(p, {"--model": "--keybert-model"})
    p.add_argument("--replace", action="store_true", help="replace existing tags too")
    p.set_defaults(func=run_keywords_command)
