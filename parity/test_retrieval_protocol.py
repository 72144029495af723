"""Retrieval metrics against LAION-CLAP 1.1.7's own evaluation code (laion_clap/training/train.py):
its evaluate_clotho_audiocaps (five captions per clip), driven with fixed embeddings through a
stand-in model and loader, and its get_metrics (one caption per clip) give ours, key for key.

One finding: LAION-CLAP's audio-to-text mAP@10 numbers a clip's captions in the top 10 in caption
order (torch.where returns them so, and they are not sorted, though its docstring says "sort"), so
ours matches its code with map10_order="caption"; ours by default sorts them by rank, as its
docstring and the code it adapts (Xinhao Mei's audio-text_retrieval) do, a true average precision.
"""
from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch

import test_laion  # noqa: F401  (imports laion_clap with its tokenizers built offline)
from laion_clap.training import train as laion_train

from clap_model.metrics import retrieval_metrics

CLIPS, CAPTIONS, DIM = 40, 5, 16
T2A = ("mean_rank", "median_rank", "R@1", "R@5", "R@10", "mAP@10")
A2T = ("R@1", "R@5", "R@10", "mAP@10")


def embeddings(clips: int, captions: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clips and captions near their clip's embedding: ranks spread from 1 to past 10."""
    gen = torch.Generator().manual_seed(seed)
    audio = torch.nn.functional.normalize(torch.randn(clips, DIM, generator=gen), dim=1)
    text = audio.repeat_interleave(captions, 0) + noise * torch.randn(clips * captions, DIM, generator=gen)
    return audio, torch.nn.functional.normalize(text, dim=1)


class StandIn:
    """What evaluate_clotho_audiocaps calls as its model: audio features of a batch (its "idx"),
    then the text features of that batch's captions (five per clip, in order), then the scales."""

    def __init__(self, audio: torch.Tensor, text: torch.Tensor) -> None:
        self.audio, self.text, self.last = audio, text.view(len(audio), CAPTIONS, -1), None

    def __call__(self, audios, texts, device):
        if audios is not None:
            self.last = audios["idx"]
            return self.audio[self.last]
        if texts is not None:
            return self.text[self.last].reshape(-1, self.text.shape[-1])
        return torch.tensor(1.0), torch.tensor(1.0)


def laion_clotho_metrics(audio: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    batches = [{"idx": list(range(start, min(start + 8, CLIPS))),
                "full_text": [[f"clip {i} caption {j}" for j in range(CAPTIONS)]
                              for i in range(start, min(start + 8, CLIPS))],
                "__url__": ["/data/clotho/test/0.tar"] * (min(start + 8, CLIPS) - start)}
               for start in range(0, CLIPS, 8)]
    data = {"val": SimpleNamespace(dataloader=batches)}
    found = laion_train.evaluate_clotho_audiocaps(StandIn(audio, text), data, 0, SimpleNamespace(tmodel="roberta"),
                                                  nullcontext, "cpu")
    return {key.split("/", 1)[1]: float(value) for key, value in found["clotho-test"].items()}


def test_five_captions_per_clip_as_laion_clap_evaluate_clotho_audiocaps():
    audio, text = embeddings(CLIPS, CAPTIONS, noise=1.0, seed=0)
    theirs = laion_clotho_metrics(audio, text)
    owner = torch.arange(CLIPS).repeat_interleave(CAPTIONS)
    as_code = retrieval_metrics(audio, text, owner, map10_order="caption")
    for name in [f"text_to_audio_{m}" for m in T2A] + [f"audio_to_text_{m}" for m in A2T]:
        assert as_code[name] == pytest.approx(theirs[name], abs=1e-9), name
    assert 0.1 < theirs["text_to_audio_R@1"] < theirs["text_to_audio_R@10"] < 1  # ranks spread past 10
    assert 0 < theirs["audio_to_text_R@1"] < 1
    # Sorted by rank (the default) the audio-to-text mAP@10 differs; the rest is the same.
    ours = retrieval_metrics(audio, text, owner)
    assert ours["audio_to_text_mAP@10"] < theirs["audio_to_text_mAP@10"]
    assert {k: v for k, v in ours.items() if k != "audio_to_text_mAP@10"} == \
        {k: v for k, v in as_code.items() if k != "audio_to_text_mAP@10"}
    print(f"audio_to_text_mAP@10: LAION-CLAP's code {theirs['audio_to_text_mAP@10']:.4f}, "
          f"sorted by rank {ours['audio_to_text_mAP@10']:.4f}")


def test_one_caption_per_clip_as_laion_clap_get_metrics():
    audio, text = embeddings(30, 1, noise=0.9, seed=1)
    theirs = {k: float(v) for k, v in laion_train.get_metrics(audio, text, torch.tensor(1.0)).items()}
    ours = retrieval_metrics(audio, text)
    for direction in ("audio_to_text", "text_to_audio"):
        for metric in T2A:
            assert ours[f"{direction}_{metric}"] == pytest.approx(theirs[f"{direction}_{metric}"], abs=1e-9)
    assert 0 < theirs["text_to_audio_R@1"] < theirs["text_to_audio_R@10"] < 1
