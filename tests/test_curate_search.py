"""`audiodata search` with a tiny CLAP trained here on the real clips: a clip's caption finds that clip."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audio_dataset.cli import main
from audio_dataset.shards import iter_shard

pytestmark = pytest.mark.usefixtures("ray_local", "one_torch_thread")


@pytest.fixture(scope="module")
def trained(trained_tiny_clap) -> tuple[Path, Path]:
    """(dataset, checkpoint): ten 2 s clips, and the `tiny` preset trained on them for 80 steps
    (conftest's trained_tiny_clap), embedded here."""
    dataset, checkpoint = trained_tiny_clap
    assert main(["embed", str(dataset), "--checkpoint", str(checkpoint), "--no-progress"]) == 0
    return dataset, checkpoint


def _search(dataset: Path, capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    checkpoint = dataset.parent / "run" / "latest.pt"
    assert main(["search", str(dataset), *args, "--json", "--checkpoint", str(checkpoint)]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_caption_finds_its_clip_first(trained, capsys):
    from audio_dataset.curate.search import Searcher, SearchOptions

    dataset, checkpoint = trained
    samples = [s for tar in sorted((dataset / "train").glob("*.tar")) for s in iter_shard(tar)]
    captions = [json.loads(s["json"])["text"][0] for s in samples]
    searcher = Searcher(dataset, dataset / "embed", SearchOptions(k=10, checkpoint=checkpoint))
    firsts = [searcher.text(caption)[0].key for caption in captions]
    right = sum(first == s["__key__"] for first, s in zip(firsts, samples))
    # The same ranking by brute force over the model's own embeddings: the flat index is exact...
    audio = np.load(dataset / "embed" / "train.audio.npy")
    brute = [samples[int(np.argmax(audio @ searcher.clap.embed_text([c]).numpy()[0]))]["__key__"] for c in captions]
    assert firsts == brute
    # ...and it agrees with clap-train's own text-to-audio R@1 on these clips (chance is 0.1).
    last = json.loads((checkpoint.parent / "results.jsonl").read_text().splitlines()[-1])
    print(f"search: the matching clip first for {right} of {len(samples)} captions; "
          f"clap-train's t2a R@1 {last['text_to_audio_R@1']:.2f}")
    assert right / len(samples) == pytest.approx(last["text_to_audio_R@1"]) and right >= 6
    hits = _search(dataset, capsys, captions[3], "-k", "3")
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True) and len(hits) == 3
    assert hits[0]["key"] == firsts[3] and hits[0]["shard"].endswith("train/000000.tar")
    assert hits[0]["member"] == f"{hits[0]['key']}.flac" and hits[0]["caption"] == captions[int(np.argmax(
        [s["__key__"] == hits[0]["key"] for s in samples]))]


def test_an_audio_file_finds_its_own_clip(trained, tmp_path, capsys):
    dataset, _ = trained
    for sample in [s for tar in sorted((dataset / "train").glob("*.tar")) for s in iter_shard(tar)][::3]:
        query = tmp_path / f"{sample['__key__']}.flac"
        query.write_bytes(sample["flac"])
        hits = _search(dataset, capsys, "--audio", str(query), "-k", "1")
        assert hits[0]["key"] == sample["__key__"] and hits[0]["score"] > 0.999


def test_search_usage_errors(trained, tmp_path, capsys):
    dataset, checkpoint = trained
    assert main(["search", str(dataset), "dog", "--split", "valid", "--checkpoint", str(checkpoint)]) == 2
    assert "--split valid: not indexed" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "dog"]) == 2
    assert "no finished `embed` run" in capsys.readouterr().err
    assert main(["search", str(dataset), "dog", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "none.pt: not found" in capsys.readouterr().err
    assert main(["search", str(dataset), "dog"]) == 2  # the recorded checkpoint is named, not loaded
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs --checkpoint" in err[0] and str(checkpoint.resolve()) in err[0], err
    assert main(["search", str(dataset), "dog", "--checkpoint", str(dataset / "train" / "000000.tar")]) == 2
    assert "is not the model the embeddings were made with" in capsys.readouterr().err
