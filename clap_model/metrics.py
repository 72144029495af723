"""Retrieval (R@1/5/10, mAP@10, mean/median rank) and zero-shot classification metrics."""
from __future__ import annotations

import torch


def _ranks(logits: torch.Tensor) -> torch.Tensor:
    """0-based rank of the matching column (the diagonal) in each row, ties counted pessimistically."""
    target = logits.diagonal()[:, None]
    return (logits > target).sum(dim=1) + (logits == target).sum(dim=1) - 1


def retrieval_metrics(audio: torch.Tensor, text: torch.Tensor) -> dict[str, float]:
    """Audio i matches text i. Keys as LAION-CLAP logs them: audio_to_text_R@1, ..., text_to_audio_mAP@10."""
    logits = audio.float() @ text.float().T
    out: dict[str, float] = {}
    for name, matrix in (("audio_to_text", logits), ("text_to_audio", logits.T)):
        ranks = _ranks(matrix).float()
        out[f"{name}_mean_rank"] = float(ranks.mean() + 1)
        out[f"{name}_median_rank"] = float(ranks.median() + 1)
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = float((ranks < k).float().mean())
        # One relevant item: average precision is 1/(rank+1) when it is in the top 10.
        out[f"{name}_mAP@10"] = float(torch.where(ranks < 10, 1.0 / (ranks + 1), torch.zeros_like(ranks)).mean())
    return out


def zeroshot_metrics(audio: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (top-1, top-5) and mAP of audio->class-prompt similarity; `labels` index classes."""
    logits = audio.float() @ class_text.float().T
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    ranks = (logits > logits.gather(1, labels[:, None])).sum(dim=1).float()
    return {
        "zeroshot_top1": float(hit[:, 0].float().mean()),
        "zeroshot_top5": float(hit.any(dim=1).float().mean()),
        "zeroshot_mAP": float((1.0 / (ranks + 1)).mean()),
        "zeroshot_samples": float(len(labels)),
    }


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        short = key.replace("audio_to_text_", "a2t_").replace("text_to_audio_", "t2a_")
        parts.append(f"{short} {value:.4f}" if isinstance(value, float) else f"{short} {value}")
    return " | ".join(parts)
