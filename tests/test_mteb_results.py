"""`clap-eval --suite` results in MTEB's result layout, without mteb (parity/test_mteb.py has mteb
read and validate them): which tasks convert, under which names, and writes that stay in OUT."""
from __future__ import annotations

import json
import os

import pytest

from clap_model.files import UnsafeTarget
from clap_model.mteb_model import mteb_results, write_mteb_results
from clap_model.suite_results import FORMAT


def _results(name: str = "epoch_10.pt") -> dict:
    def task(task_name, dataset, kind, metrics, folds=()):
        return {"name": task_name, "protocol": {"dataset": dataset, "kind": kind, "split": "test",
                                                "folds": list(folds)}, "metrics": metrics, "seconds": 2.0}

    retrieval = {f"{d}_R@{k}": 0.1 * k for d in ("audio_to_text", "text_to_audio") for k in (1, 5, 10)}
    retrieval.update({"audio_to_text_mAP@10": 0.3, "text_to_audio_mAP@10": 0.2})
    return {"format": FORMAT, "checkpoint": {"name": name, "sha256": "0123456789abcdef" * 4},
            "tasks": [task("esc50", "esc50", "zeroshot", {"accuracy": 0.8}),
                      task("esc50-fold1", "esc50", "zeroshot", {"accuracy": 0.9}, folds=(1,)),
                      task("fsd50k", "fsd50k", "multilabel", {"mAP": 0.4}),
                      task("clotho", "clotho", "retrieval", retrieval)]}


def test_tasks_mteb_scores_the_same_way_convert_under_its_names():
    converted, left_out = mteb_results(_results())
    by_name = {c["task_name"]: c["scores"] for c in converted}
    assert list(by_name) == ["ESC50_Zeroshot", "ClothoA2TRetrieval", "ClothoT2ARetrieval"]
    assert by_name["ESC50_Zeroshot"]["train"][0]["main_score"] == 0.8
    a2t, t2a = by_name["ClothoA2TRetrieval"]["test"][0], by_name["ClothoT2ARetrieval"]["test"][0]
    assert a2t["hit_rate_at_5"] == a2t["main_score"] == 0.5 and a2t["map_at_10"] == 0.3 and "recall_at_5" not in a2t
    assert t2a["recall_at_10"] == t2a["hit_rate_at_10"] == 1.0 and t2a["map_at_10"] == 0.2
    assert left_out == ["esc50-fold1: folds [1]: MTEB's task scores every clip",
                        "fsd50k: no MTEB task scores fsd50k multilabel as this suite does"]
    with pytest.raises(ValueError, match="not a clap-eval --suite results file"):
        mteb_results({"format": "something else", "tasks": []})


def test_written_files_stay_in_out_and_never_follow_a_link(tmp_path):
    out = tmp_path / "mteb"
    written = write_mteb_results(_results("../../etc/x.pt"), out)  # a name read from data, not a path
    assert [p.relative_to(out).as_posix() for p in written] == [
        f"audiodata__x.pt/0123456789ab/{name}.json" for name in
        ("ESC50_Zeroshot", "ClothoA2TRetrieval", "ClothoT2ARetrieval")]
    assert json.loads(written[0].read_text())["task_name"] == "ESC50_Zeroshot"
    planted = tmp_path / "elsewhere"
    planted.mkdir()
    target = out / "audiodata__x.pt" / "0123456789ab" / "ESC50_Zeroshot.json"
    target.unlink()
    os.symlink(planted / "file.json", target)
    with pytest.raises(UnsafeTarget):
        write_mteb_results(_results("x.pt"), out)
    assert not (planted / "file.json").exists()
