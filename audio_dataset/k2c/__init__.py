"""Keyword-to-caption augmentation (LAION-CLAP's T5 "keyword-to-caption") and KeyBERT keywords, as
resumable shard-to-shard stages over a build output:

    audiodata k2c OUT --out OUT_K2C                            # keytotext's k2t-base, tags as keywords
    audiodata k2c OUT --out OUT_K2C --caption-model template   # "The sound of A, B and C"
    audiodata keywords OUT --out OUT_KW                        # fill empty `tag` lists from descriptions

k2c adds `text_augment_t5` and `text_augment_all` to each sample JSON (see `stages`); audio bytes,
sample order and sizes.json are kept; `OUT_K2C/k2c_manifest.parquet` lists every sample's keywords,
generated captions and what post-processing did to each; `OUT_K2C/.k2c/run.json` the model, its
revision, decoding settings and seed.
"""
from __future__ import annotations

import importlib
from typing import Any

# Imported on first use: `audiodata caption` and bench/caption_gpu.py import k2c.models alone, and
# the stages pull in the whole build (PyAV, libsndfile, soxr), which a GPU image may lack.
_LAZY = {"RunOptions": "audio_dataset.stage_runner", "RunSummary": "audio_dataset.stage_runner",
         "K2COptions": "audio_dataset.k2c.stages", "KeywordsOptions": "audio_dataset.k2c.stages",
         "run_k2c": "audio_dataset.k2c.stages", "run_keywords": "audio_dataset.k2c.stages"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = ["K2COptions", "KeywordsOptions", "RunOptions", "RunSummary", "run_k2c", "run_keywords"]
