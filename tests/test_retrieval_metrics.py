"""The retrieval metrics against examples worked by hand, under LAION-CLAP's definitions
(laion_clap/training/train.py: get_metrics, evaluate_clotho_audiocaps):
- text to audio: every caption ranks the clips; R@k, mean and median rank and mAP@10 are means over
  all captions (the five caption indexes averaged); mAP@10 of one relevant clip is 1/(rank+1) in
  the top 10, else 0;
- audio to text: R@k and ranks by the best-ranked of the clip's captions; mAP@10 sums, over the
  clip's captions in the top 10 in rank order, n / (rank + 1) for the n-th of them, divided by 5;
- median rank: floor(np.median(0-based ranks)) + 1.
Tie rule (ours: where LAION-CLAP's argsort puts tied scores is unspecified): a tie with a wrong
answer counts against the right one; a clip's own captions tied with each other keep caption order.

Logits are given directly: audio is the identity, so audio @ text.T is text.T.
"""
from __future__ import annotations

import pytest
import torch

from clap_model.metrics import retrieval_metrics


def _scores(order: list[int]) -> list[float]:
    """Scores over 15 captions that rank them in `order` (best first)."""
    scores = [0.0] * 15
    for position, caption in enumerate(order):
        scores[caption] = float(15 - position)
    return scores


# Three clips, five captions each: captions 0-4 are clip 0's, 5-9 clip 1's, 10-14 clip 2's.
OWNER = torch.arange(3).repeat_interleave(5)
LOGITS = torch.tensor([
    # Clip 0 ranks its captions 0, 2, 10 (caption 2: the 11th), 4, 13.
    _scores([0, 5, 1, 6, 3, 7, 8, 9, 10, 11, 2, 12, 13, 4, 14]),
    # Clip 1 ranks its captions 3, 1, 10, 12, 14: in caption order the hits come out of rank order.
    _scores([0, 6, 1, 5, 2, 3, 4, 10, 11, 12, 7, 13, 8, 14, 9]),
    # Clip 2: captions 10 and 11 tie at the top (the same caption written twice: ranks 0 and 1);
    # caption 12 ties with clip 0's caption 0 (which counts ahead of it: rank 5).
    [7, 4, 3.5, 9, 8, 6, 3, 2.5, 2, 0.5, 10, 10, 7, 5, 1],
])


def _metrics(logits: torch.Tensor, owner: torch.Tensor | None = None, **kwargs) -> dict[str, float]:
    return retrieval_metrics(torch.eye(len(logits)), logits.T.contiguous(), owner, **kwargs)


def test_audio_to_text_by_the_best_caption_and_laion_map10():
    m = _metrics(LOGITS, OWNER)
    # Own-caption ranks: clip 0 [0, 2, 10, 4, 13], clip 1 [3, 1, 10, 12, 14], clip 2 [0, 1, 5, 7, 13].
    # Best: 0, 1, 0.
    assert m["audio_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["audio_to_text_R@5"] == m["audio_to_text_R@10"] == 1.0
    assert m["audio_to_text_mean_rank"] == pytest.approx(1 / 3 + 1)
    assert m["audio_to_text_median_rank"] == 1.0
    # mAP@10, hits sorted by rank; the 11th-ranked captions (rank 10) and worse add nothing:
    # clip 0: 1/1 + 2/3 + 3/5; clip 1: 1/2 + 2/4; clip 2: 1/1 + 2/2 + 3/6 + 4/8; each over 5.
    clip_ap = [(1 + 2 / 3 + 3 / 5) / 5, (1 / 2 + 2 / 4) / 5, (1 + 1 + 3 / 6 + 4 / 8) / 5]
    assert m["audio_to_text_mAP@10"] == pytest.approx(sum(clip_ap) / 3)


def test_audio_to_text_map10_in_caption_order_as_laion_clap_code_computes_it():
    """LAION-CLAP 1.1.7's code numbers the hits in caption order: clip 1's hits (ranks 3 then 1)
    give 1/4 + 2/2 there, 1/2 + 2/4 sorted."""
    m = _metrics(LOGITS, OWNER, map10_order="caption")
    clip_ap = [(1 + 2 / 3 + 3 / 5) / 5, (1 / 4 + 2 / 2) / 5, (1 + 1 + 3 / 6 + 4 / 8) / 5]
    assert m["audio_to_text_mAP@10"] == pytest.approx(sum(clip_ap) / 3)
    assert m["audio_to_text_mAP@10"] > _metrics(LOGITS, OWNER)["audio_to_text_mAP@10"]
    with pytest.raises(ValueError, match="order"):
        _metrics(LOGITS, OWNER, map10_order="best")


def test_text_to_audio_over_every_caption_with_ties_against_the_caption():
    m = _metrics(LOGITS, OWNER)
    # Each caption's column [clip 0, clip 1, clip 2] and the rank of its own clip:
    # c0 [15 15 7] 1 (tie) | c1 [13 13 4] 1 (tie) | c2 [5 11 3.5] 1 | c3 [11 10 9] 0 | c4 [2 9 8] 2
    # c5 [14 12 6] 1 | c6 [12 14 3] 0 | c7 [10 5 2.5] 1 | c8 [9 3 2] 1 | c9 [8 1 .5] 1
    # c10..c13: 0 | c14 [1 2 1] 2 (clip 1 above, clip 0 tied)
    ranks = [1, 1, 1, 0, 2, 1, 0, 1, 1, 1, 0, 0, 0, 0, 2]
    assert m["text_to_audio_R@1"] == pytest.approx(6 / 15)
    assert m["text_to_audio_R@5"] == m["text_to_audio_R@10"] == 1.0
    assert m["text_to_audio_mean_rank"] == pytest.approx(sum(ranks) / 15 + 1)
    assert m["text_to_audio_median_rank"] == 2.0
    assert m["text_to_audio_mAP@10"] == pytest.approx((6 + 7 / 2 + 2 / 3) / 15)


def test_text_to_audio_eleventh_rank_and_even_median_as_laion_clap():
    """One caption per clip (get_metrics): caption j's own clip at the given 0-based rank, the
    clips above it scoring 1, its own 0.5, the rest 0."""
    ranks = [0, 0, 0, 1, 1, 2, 4, 5, 9, 10, 10, 11]
    logits = torch.zeros(12, 12)
    for caption, rank in enumerate(ranks):
        others = [clip for clip in range(12) if clip != caption]
        logits[others[:rank], caption] = 1.0
        logits[caption, caption] = 0.5
    m = _metrics(logits)
    assert m["text_to_audio_R@1"] == pytest.approx(3 / 12)
    assert m["text_to_audio_R@5"] == pytest.approx(7 / 12)
    assert m["text_to_audio_R@10"] == pytest.approx(9 / 12)  # rank 9 (10th) in; ranks 10 (11th) and 11 out
    assert m["text_to_audio_mAP@10"] == pytest.approx((3 + 2 / 2 + 1 / 3 + 1 / 5 + 1 / 6 + 1 / 10) / 12)
    assert m["text_to_audio_mean_rank"] == pytest.approx(53 / 12 + 1)
    # Middle ranks 2 and 4: floor(3) + 1, not the lower middle (2) + 1.
    assert m["text_to_audio_median_rank"] == 4.0


def test_a_collapsed_model_scores_no_hits():
    """Every score equal: every right answer ties with every wrong one and ranks last."""
    m = _metrics(torch.ones(3, 15), OWNER)
    assert m["text_to_audio_R@1"] == m["audio_to_text_R@1"] == 0.0
    assert m["text_to_audio_mean_rank"] == 3.0
