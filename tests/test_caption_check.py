"""The CHECK step with a small CLAP trained here on the bundled clips: a true caption passes, a
caption of another clip is rejected and the sample is rewritten (AudioSetCaps' rule)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from audio_dataset.caption import types as t
from audio_dataset.caption.check import CheckOptions
from audio_dataset.caption.stage import SCORE_TOLERANCE, CaptionOptions, CaptionProcessor, WriteStep
from audio_dataset.caption.types import Candidate, WriteRequest
from audio_dataset.shards import iter_shard
from audio_dataset.stage_runner import ShardJob

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(trained_tiny_clap) -> tuple[list[dict], Path]:
    """(samples, checkpoint): ten 2 s clips and the `tiny` preset trained on them (conftest's
    trained_tiny_clap, test_curate_search's model)."""
    dataset, checkpoint = trained_tiny_clap
    return [s for tar in sorted((dataset / "train").glob("*.tar")) for s in iter_shard(tar)], checkpoint


class ScriptedWriter:
    """Writes the caption of the next clip; on a rewrite (attempt >= 1) the sample's own, unless `stubborn`."""

    def __init__(self, texts: dict[str, str], stubborn: bool = False) -> None:
        self.keys, self.texts, self.stubborn = list(texts), texts, stubborn
        self.settings: dict = {}
        self.calls: list[tuple[list[str], int]] = []

    def write(self, requests: list[WriteRequest], num_captions: int, attempt: int) -> list[list[Candidate]]:
        self.calls.append(([r.key for r in requests], attempt))
        out = []
        for request in requests:
            other = self.keys[(self.keys.index(request.key) + 1) % len(self.keys)]
            text = self.texts[request.key if attempt and not self.stubborn else other]
            out.append([Candidate(text, t.OK, text)])
        return out


def _run(samples: list[dict], checkpoint: Path, writer: ScriptedWriter, **check) -> list[dict]:
    options = CaptionOptions(steps=("write", "check"), write=WriteStep(lambda device: writer, {}),
                             check=CheckOptions(checkpoint, **check))
    processor = CaptionProcessor(options, None, {}, "cpu")
    _, rows = processor.process(ShardJob("train", "000000.tar", "", "", ""), samples)
    return rows


def test_a_true_caption_passes_and_another_clips_is_rejected_and_rewritten(trained):
    samples, checkpoint = trained
    texts = {s["__key__"]: json.loads(s["json"])["text"][0] for s in samples}
    writer = ScriptedWriter(texts)
    rows = _run(samples, checkpoint, writer, retries=2)
    rejected_first = [r for r in rows if r["attempts"] == [0, 1]]
    # The model ranks a clip's own caption above the next clip's for most clips (R@1 >= 0.6 here).
    assert len(rejected_first) >= 5, rows
    for row in rejected_first:  # the other clip's caption scored under the text; the rewrite passed
        assert row["scores"][0] < row["reference_score"] <= row["scores"][1] + SCORE_TOLERANCE
        assert row["captions"] == [texts[row["key"]]] and row["status"] == t.CAPTIONED
    for row in rows:
        assert row["status"] == t.CAPTIONED
        if row["attempts"] == [0]:  # kept at once: it scored at least the sample's own text
            assert row["scores"][0] >= row["reference_score"] - SCORE_TOLERANCE
    # Only the rejected samples were rewritten, once.
    assert writer.calls[1] == (sorted((r["key"] for r in rejected_first), key=list(texts).index), 1)
    assert len(writer.calls) == 2


def test_a_sample_whose_rewrites_never_pass_is_rejected_by_clap_with_every_score_kept(trained):
    samples, checkpoint = trained
    texts = {s["__key__"]: json.loads(s["json"])["text"][0] for s in samples}
    rows = _run(samples, checkpoint, ScriptedWriter(texts, stubborn=True), retries=2)
    rejected = [r for r in rows if r["status"] == t.REJECTED_BY_CLAP]
    assert len(rejected) >= 5
    for row in rejected:
        assert row["attempts"] == [0, 1, 2] and row["captions"] == []
        assert all(score < row["reference_score"] for score in row["scores"])


def test_min_score_replaces_the_rule(trained):
    samples, checkpoint = trained
    texts = {s["__key__"]: json.loads(s["json"])["text"][0] for s in samples}
    rows = _run(samples, checkpoint, ScriptedWriter(texts), retries=2, min_score=-1.0)
    assert all(r["status"] == t.CAPTIONED and r["attempts"] == [0] and r["reference_score"] is None for r in rows)
