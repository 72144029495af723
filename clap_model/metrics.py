"""Retrieval (R@1/5/10, mAP@10, mean/median rank) and zero-shot classification metrics."""
from __future__ import annotations

import torch


def _ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's `target` score in that row, ties counted pessimistically."""
    return (scores > target[:, None]).sum(dim=1) + (scores == target[:, None]).sum(dim=1) - 1


def _caption_ranks(logits: torch.Tensor, owner: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """0-based rank of caption j among all captions for its own audio `owner[j]` (in chunks: M x M
    at most). Ties: a caption of another clip scoring the same ranks ahead (pessimistic, as
    everywhere here); the clip's own captions tied with each other (a caption written twice) keep
    their caption order, as a stable sort puts them: one of two equally right answers is not wrong."""
    ranks = []
    position = torch.arange(len(owner))
    for start in range(0, len(owner), chunk):
        index = position[start : start + chunk]
        rows = logits[owner[index]]
        score = rows.gather(1, index[:, None])
        own = owner[None, :] == owner[index][:, None]
        tied_ahead = (rows == score) & (~own | (position[None, :] < index[:, None]))
        ranks.append((rows > score).sum(dim=1) + tied_ahead.sum(dim=1))
    return torch.cat(ranks)


def _median_rank(ranks: torch.Tensor) -> float:
    """1-based median rank as LAION-CLAP reports it: floor(np.median(ranks)) + 1 (the mean of the
    two middle ranks, floored, where torch.median would take the lower one)."""
    ordered = ranks.sort().values
    middle = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
    return float(torch.floor(middle) + 1)


def _summary(name: str, ranks: torch.Tensor, out: dict[str, float]) -> None:
    ranks = ranks.double()
    out[f"{name}_mean_rank"] = float(ranks.mean() + 1)
    out[f"{name}_median_rank"] = _median_rank(ranks)
    for k in (1, 5, 10):
        out[f"{name}_R@{k}"] = float((ranks < k).double().mean())


MAP10_ORDERS = ("rank", "caption")


def _audio_to_text_map10(ranks: torch.Tensor, owner: torch.Tensor, audios: int, order: str) -> torch.Tensor:
    """Average precision in the top 10 over each audio's captions: the n-th (from 1) of its captions
    ranked in the top 10, at 0-based rank r, adds n / (r + 1); the sum is divided by its caption
    count (LAION-CLAP: always 5). `order` "rank" counts n over those captions sorted by rank, as
    LAION-CLAP's evaluate_clotho_audiocaps documents it and Xinhao Mei's code it adapts computes
    it (a true average precision); "caption" counts n in caption order, as LAION-CLAP 1.1.7's code
    computes it (torch.where returns the hits in caption order and they are not sorted): it can
    exceed the first when a clip's later caption ranks above an earlier one."""
    if order not in MAP10_ORDERS:
        raise ValueError(f"mAP@10 order is one of {MAP10_ORDERS}, not {order!r}")
    key = ranks if order == "rank" else torch.arange(len(ranks))
    sequence = torch.argsort(owner * (int(key.max()) + 1) + key)  # by audio, then by rank or caption
    owner, ranks = owner[sequence], ranks[sequence].double()
    hit = (ranks < 10).double()
    counts = torch.bincount(owner, minlength=audios)
    hits_before = torch.cat([torch.zeros(1, dtype=hit.dtype), torch.cumsum(hit, 0)])
    starts = torch.cumsum(counts, 0) - counts
    nth = torch.cumsum(hit, 0) - hits_before[starts[owner]]  # 1-based among the clip's hits so far
    precision = hit * nth / (ranks + 1)
    return torch.zeros(audios, dtype=hit.dtype).index_add_(0, owner, precision) / counts.clamp(min=1)


def retrieval_metrics(audio: torch.Tensor, text: torch.Tensor, owner: torch.Tensor | None = None,
                      map10_order: str = "rank") -> dict[str, float]:
    """Audio i's captions are the texts j with owner[j] == i (default: text i alone). Keys as LAION-CLAP
    logs them: audio_to_text_R@1, ..., text_to_audio_mAP@10.

    With several captions per clip (Clotho, AudioCaps: five) it scores as LAION-CLAP does: text to
    audio over every caption (the mean over the caption index); audio to text by the best-ranked of
    the clip's captions for R@k and mean or median rank, and mAP@10 over all of them
    (`_audio_to_text_map10`, `map10_order`). Ties count against the right answer (see `_ranks`,
    `_caption_ranks`): where LAION-CLAP's argsort puts tied scores is unspecified."""
    owner = torch.arange(len(text)) if owner is None else owner.long().cpu()
    logits = audio.float() @ text.float().T  # (audios, captions)
    out: dict[str, float] = {}
    caption_ranks = _caption_ranks(logits, owner)
    best = torch.full((len(audio),), len(text), dtype=caption_ranks.dtype).scatter_reduce(
        0, owner, caption_ranks, reduce="amin")
    _summary("audio_to_text", best, out)
    out["audio_to_text_mAP@10"] = float(_audio_to_text_map10(caption_ranks, owner, len(audio), map10_order).mean())
    text_ranks = _ranks(logits.T, logits.T.gather(1, owner[:, None]).squeeze(1)).double()
    _summary("text_to_audio", text_ranks, out)
    # One relevant clip per caption: average precision is 1/(rank+1) when it is in the top 10.
    out["text_to_audio_mAP@10"] = float(torch.where(text_ranks < 10, 1.0 / (text_ranks + 1),
                                                    torch.zeros_like(text_ranks)).mean())
    return out


def zeroshot_metrics(audio: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Accuracy (top-1, top-5) and mAP of audio->class-prompt similarity; `labels` index classes."""
    logits = audio.float() @ class_text.float().T
    # Ties count against the true class, as in retrieval: a collapsed model scores chance or less, not 1.
    ranks = _ranks(logits, logits.gather(1, labels[:, None]).squeeze(1)).float()
    return {
        "zeroshot_top1": float((ranks < 1).float().mean()),
        "zeroshot_top5": float((ranks < 5).float().mean()),
        "zeroshot_mAP": float((1.0 / (ranks + 1)).mean()),
        "zeroshot_samples": float(len(labels)),
    }


def class_ranks(audio: torch.Tensor, class_text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """0-based rank of each clip's true class among the classes (ties against it, as above)."""
    logits = audio.float() @ class_text.float().T
    return _ranks(logits, logits.gather(1, labels[:, None]).squeeze(1))


def per_class_accuracy(ranks: torch.Tensor, labels: torch.Tensor, classes: int) -> list[float | None]:
    """Top-1 accuracy of each class's clips (None for a class with none), from `class_ranks`."""
    hits = torch.zeros(classes).index_add_(0, labels, (ranks < 1).float())
    counts = torch.bincount(labels, minlength=classes).float()
    return [float(h / c) if c else None for h, c in zip(hits, counts)]


def average_precision(scores: torch.Tensor, relevant: torch.Tensor) -> float:
    """Average precision of one ranking: the mean, over the relevant items, of the precision at
    each one's rank; items tied on a score count as one step, which is scikit-learn's
    average_precision_score (a constant score earns the base rate)."""
    relevant = relevant.bool()
    positives = int(relevant.sum())
    if positives == 0:
        return float("nan")
    # Rank of each relevant item: items scoring higher, plus every item scoring the same.
    at = scores[relevant]
    ranks = (scores[None, :] >= at[:, None]).sum(dim=1).float()  # 1-based, pessimistic
    hits = (at[None, :] >= at[:, None]).sum(dim=1).float()  # relevant items at or above it
    return float((hits / ranks).mean())


def multilabel_map(audio: torch.Tensor, class_text: torch.Tensor, targets: torch.Tensor
                   ) -> tuple[float, list[float | None]]:
    """Macro mAP of zero-shot multi-label tagging (FSD50K): per class, the average precision of the
    clips ranked by their similarity to the class's prompt; the mean over classes with a positive
    clip. `targets` is (clips, classes) of 0/1. Returns (mAP, per-class AP, None for no positives)."""
    logits = audio.float() @ class_text.float().T
    per_class = [average_precision(logits[:, c], targets[:, c]) if targets[:, c].any() else None
                 for c in range(targets.shape[1])]
    found = [ap for ap in per_class if ap is not None]
    return (sum(found) / len(found) if found else float("nan")), per_class


def format_metrics(metrics: dict[str, float]) -> str:
    """The metrics on one line, each under the name results.jsonl and `clap-eval --out` give it."""
    return " | ".join(f"{key} {value:.4f}" if isinstance(value, float) else f"{key} {value}"
                      for key, value in metrics.items())
