"""embed, dedup and filter end to end on shards of the real clips, through the CLI, with local Ray.

The dataset holds nine clips plus copies a real collection picks up: robin re-encoded to MP3 under
another source (shorter, CC0), dog 20 dB quieter and trimmed (a German caption), drums as a WAV of
the same PCM (exact). The eval set holds the whale (not in the dataset) and trumpet trimmed by 0.5 s
(a leak)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch

from audio_dataset import audio as audio_lib
from audio_dataset.cli import main
from audio_dataset.schema import SampleMeta, safe_key
from audio_dataset.shards import iter_shard, read_sizes
from conftest import REAL_AUDIO_DIR, ffmpeg_convert
from test_k2c import _write_input  # tests/ is on sys.path

RATE = 48_000
CLIPS = {
    "robin": "456440__inspectorj__bird-whistling-robin-single-13", "woman": "198-209-0000",
    "man": "3436-172162-0000", "narrator": "5703-47212-0000", "waltz": "147793__setuniman__sweet-waltz-0i-22mi",
    "orchestra": "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra)",
    "drums": "admiralbob77_-_Choice_-_Drum-bass", "dog": "pibble", "trumpet": "sorohanro_-_solo-trumpet-06",
    "whale": "glacier-bay-humpback",
}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pcm(path: Path, seconds: float) -> np.ndarray:
    decoded = audio_lib.decode(path.read_bytes())
    mono = audio_lib.resample(audio_lib.set_channels(decoded.samples, 1), decoded.sample_rate, RATE)
    return mono[:, : int(seconds * RATE)]


def _sample(name: str, samples: np.ndarray, source: str = "local", ext: str = "flac", **meta_fields) -> dict:
    stem = CLIPS[name]
    side = json.loads((REAL_AUDIO_DIR / f"{stem}.json").read_text())
    fields = {"text": side["text"], "tag": side["tag"], "original_data": {}, "source": source, "source_id": stem,
              "license": side["license"], "author": side["author"], "url": side["url"],
              "duration": round(samples.shape[1] / RATE, 3), "sample_rate": RATE, "channels": 1, **meta_fields}
    if ext == "flac":
        audio = audio_lib.encode_flac(samples, RATE)
    else:
        buffer = io.BytesIO()
        soundfile.write(buffer, samples.T, RATE, format="WAV", subtype="PCM_16")
        audio = buffer.getvalue()
    return {"__key__": safe_key(source, fields["source_id"]), ext: audio, "json": SampleMeta(**fields).to_json_bytes()}


def _via_ffmpeg(name: str, tmp: Path, seconds: float, *args: str) -> np.ndarray:
    """The clip's first `seconds`, converted by ffmpeg and decoded back to 48 kHz mono."""
    source = tmp / f"{name}.wav"
    soundfile.write(source, _pcm(REAL_AUDIO_DIR / f"{CLIPS[name]}.ogg", seconds).T, RATE)
    out = ffmpeg_convert(source, tmp / f"{name}{args[-1]}", "-loglevel", "quiet", *args[:-1])
    return _pcm(out, seconds)


def _write(root: Path, split: str, shards: list[list[dict]]) -> None:
    _write_input(root, {split: shards})


@pytest.fixture(scope="module")
def folders(tmp_path_factory, ray_local) -> dict[str, Path]:
    """The stages' inputs; every test that runs a stage uses it, so it starts (session) Ray."""
    tmp = tmp_path_factory.mktemp("curate")
    seconds = {"robin": 2.6, "dog": 4.0, "drums": 4.0}
    s = {name: _sample(name, _pcm(REAL_AUDIO_DIR / f"{CLIPS[name]}.ogg", seconds.get(name, 3.0)))
         for name in CLIPS if name != "whale"}
    copies = {
        "robin_mp3": _sample("robin", _via_ffmpeg("robin", tmp, 2.4, "-b:a", "128k", ".mp3"), source="freesound",
                             license="CC0 1.0"),
        "dog_quiet": _sample("dog", _via_ffmpeg("dog", tmp, 4.0, "-ss", "0.5", "-af", "volume=-20dB", ".flac"),
                             source="bbc", text=["Ein Hund heult leise im Schlaf auf dem Sofa."]),
        # the FLAC's 16-bit PCM in a WAV member: other bytes, the same decoded audio
        "drums_wav": _sample("drums", soundfile.read(io.BytesIO(s["drums"]["flac"]), dtype="float32",
                                                     always_2d=True)[0].T, source="sonniss", ext="wav"),
    }
    dataset = tmp / "dataset"
    _write(dataset, "train", [[s["robin"], s["woman"], s["man"], s["narrator"], s["drums"]],
                              [s["waltz"], s["orchestra"], copies["robin_mp3"], s["dog"]],
                              [s["trumpet"], copies["dog_quiet"], copies["drums_wav"]]])
    evalset = tmp / "eval"
    _write(evalset, "test", [[_sample("whale", _pcm(REAL_AUDIO_DIR / f"{CLIPS['whale']}.ogg", 3.0), source="clotho"),
                              _sample("trumpet", _via_ffmpeg("trumpet", tmp, 3.0, "-ss", "0.5", ".flac"),
                                      source="clotho")]])
    return {"dataset": dataset, "eval": evalset, "tmp": tmp}


def key(name: str, source: str = "local") -> str:
    return safe_key(source, CLIPS[name])


def _cli(*args: str) -> None:
    assert main([*map(str, args), "--no-progress"]) == 0


def _clusters(dataset: Path) -> dict[str, dict]:
    return {row["key"]: row for row in pq.read_table(dataset / "dedup" / "clusters.parquet").to_pylist()}


def test_dedup_finds_copies_and_the_eval_leak(folders, capsys):
    dataset, evalset = folders["dataset"], folders["eval"]
    _cli("dedup", dataset, "--against", evalset, "--no-embeddings")
    # "kept" as in every stage's counts: the samples that stay (the 5 no cluster holds among them).
    assert "dedup: 12 sample(s) (8 kept, 3 duplicate, 1 eval_overlap); 7 in duplicate clusters" \
        in capsys.readouterr().out
    rows = _clusters(dataset)
    robin, robin_mp3 = key("robin"), key("robin", "freesound")
    dog, dog_quiet, drums, drums_wav = key("dog"), key("dog", "bbc"), key("drums"), key("drums", "sonniss")
    assert set(rows) == {robin, robin_mp3, dog, dog_quiet, drums, drums_wav, key("trumpet")}
    assert rows[robin]["cluster"] == rows[robin_mp3]["cluster"] != rows[dog]["cluster"]
    assert rows[robin]["kind"] == rows[dog_quiet]["kind"] == "fingerprint"
    assert rows[drums]["kind"] == rows[drums_wav]["kind"] == "exact" and rows[drums]["score"] == 1.0
    # The MP3 is the whole clip: it starts at 0 s in it and overlaps all of it (to a frame hop).
    assert abs(rows[robin]["matched_span"][0]) < 0.03 and rows[robin]["matched_span"][1] > 2.0
    summary = json.loads((dataset / "dedup" / "summary.json").read_text())["fingerprint_matching"]
    assert summary["stop_list"]["threshold"] == 100 and summary["items"] == 12 + 2 and summary["matches"] >= 3
    assert rows[drums]["pcm_sha256"] == rows[drums_wav]["pcm_sha256"]
    assert rows[drums]["bytes_sha256"] != rows[drums_wav]["bytes_sha256"]  # both are recorded
    # --keep longest (default): robin is longer than its MP3; dog than its trimmed copy; drums tie -> first
    assert {name for name, row in rows.items() if row["keep"]} == {robin, drums, dog}
    leak = rows[key("trumpet")]
    assert leak["kind"] == "eval_overlap" and leak["method"] == "fingerprint" and not leak["keep"]
    assert leak["matched_key"] == key("trumpet", "clotho") and leak["matched_set"] == str(evalset)
    assert not (evalset / "fingerprint").exists()  # the eval set's fingerprints are cached in the dataset
    assert len(list((dataset / "dedup" / "against").glob("*/test/000000.parquet"))) == 1


def test_keep_rules(folders):
    dataset = folders["dataset"]
    _cli("dedup", dataset, "--no-embeddings", "--keep", "license")
    kept = {name for name, row in _clusters(dataset).items() if row["keep"]}
    assert key("robin", "freesound") in kept and key("robin") not in kept  # CC0 over CC-BY
    _cli("dedup", dataset, "--no-embeddings", "--keep", "first")
    kept = {name for name, row in _clusters(dataset).items() if row["keep"]}
    assert kept == {key("robin"), key("drums"), key("dog")}  # dataset order
    assert key("trumpet") not in _clusters(dataset)  # no --against: no leak to find


def test_dedup_apply_writes_the_dataset_without_the_copies(folders, capsys):
    dataset, evalset, out = folders["dataset"], folders["eval"], folders["tmp"] / "deduped"
    _cli("dedup", dataset, "--against", evalset, "--no-embeddings", "--apply", "--out", out)
    dropped = {key("robin", "freesound"), key("dog", "bbc"), key("drums", "sonniss"), key("trumpet")}
    manifest = {row["key"]: row for row in pq.read_table(out / "dedup_manifest.parquet").to_pylist()}
    assert len(manifest) == 12
    assert {k for k, row in manifest.items() if row["status"] != "kept"} == dropped
    assert manifest[key("trumpet")]["status"] == "eval_overlap"
    assert manifest[key("trumpet")]["matched_key"] == key("trumpet", "clotho")
    assert manifest[key("dog", "bbc")]["status"] == "duplicate"
    before = {s["__key__"]: s for tar in sorted((dataset / "train").glob("*.tar")) for s in iter_shard(tar)}
    after = [s for tar in sorted((out / "train").glob("*.tar")) for s in iter_shard(tar)]
    assert [s["__key__"] for s in after] == [k for k in before if k not in dropped]  # order kept
    assert all(s == before[s["__key__"]] for s in after)  # bytes verbatim
    assert read_sizes(out / "train") == {"000000.tar": 5, "000001.tar": 3}  # the third shard is left empty
    assert (out / "manifest.parquet").exists() is (dataset / "manifest.parquet").exists()
    first = {path.name: path.read_bytes() for path in (out / "train").glob("*.tar")}
    capsys.readouterr()
    _cli("dedup", dataset, "--against", evalset, "--no-embeddings", "--apply", "--out", out)  # a rerun resumes
    assert "3 shard(s), 3 already done" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in (out / "train").glob("*.tar")} == first


def test_dedup_usage_errors(folders, capsys):
    assert main(["dedup", str(folders["dataset"]), "--apply"]) == 2
    assert "--apply needs --out" in capsys.readouterr().err
    assert main(["dedup", str(folders["dataset"]), "--against", str(folders["tmp"] / "nope")]) == 2
    assert "--against" in capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(folders) -> Path:
    """A tiny model with random weights: embeddings are a function of the weights, training or not."""
    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    torch.manual_seed(0)
    model = CLAP(get_preset("tiny"), pretrained_text=False)
    path = folders["tmp"] / "tiny.pt"
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def embedded(folders, checkpoint) -> Path:
    _cli("embed", folders["dataset"], "--checkpoint", checkpoint, "--batch-size", "4")
    return folders["dataset"] / "embed"


def test_embed_equals_the_inference_api_on_the_same_weights(folders, checkpoint, embedded):
    from clap_model.inference import CLAPInference

    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    samples = [s for tar in sorted((folders["dataset"] / "train").glob("*.tar")) for s in iter_shard(tar)]
    rows = pq.read_table(embedded / "train.rows.parquet").to_pylist()
    audio, text = np.load(embedded / "train.audio.npy"), np.load(embedded / "train.text.npy")
    assert [r["key"] for r in rows] == [s["__key__"] for s in samples] and audio.shape == (12, 128)
    files = []
    for sample in samples:
        ext = "flac" if "flac" in sample else "wav"
        files.append(folders["tmp"] / f"{sample['__key__']}.{ext}")
        files[-1].write_bytes(sample[ext])
    np.testing.assert_allclose(audio, clap.embed_audio(files).numpy(), atol=1e-5)
    for row, sample, vector in zip(rows, samples, text):
        captions = json.loads(sample["json"])["text"]
        mean = clap.embed_text(captions).numpy().mean(axis=0)
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)
        assert row["caption"] == captions[0] and row["status"] == "ok"
    np.testing.assert_allclose([r["similarity"] for r in rows], (audio * text).sum(axis=1), atol=1e-5)
    assert [r["member"] for r in rows] == [f"{s['__key__']}.{'flac' if 'flac' in s else 'wav'}" for s in samples]
    part = pq.read_table(embedded / "train" / "000001.parquet")
    assert part.schema.field("audio").type.list_size == 128 and part.num_rows == 4
    settings = json.loads((embedded / ".embed" / "run.json").read_text())["settings"]
    assert settings["model"]["digest"].startswith("sha256:") and settings["model"]["joint_dim"] == 128


def test_embed_in_bf16_stays_close_to_fp32(folders, checkpoint, embedded):
    """--precision bf16 (autocast: faster on GPUs and on CPUs with AVX512-BF16) moves each embedding
    a little; the run records it, so a resume cannot mix precisions silently."""
    out = folders["tmp"] / "embed-bf16"
    _cli("embed", folders["dataset"], "--checkpoint", checkpoint, "--batch-size", "4", "--precision", "bf16",
         "--out", out)
    for name in ("train.audio.npy", "train.text.npy"):
        fp32, bf16 = np.load(embedded / name), np.load(out / name)
        cosine = (fp32 * bf16).sum(axis=1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
        assert cosine.min() > 0.99 and not np.array_equal(fp32, bf16)  # close, and really computed in bf16
    assert json.loads((out / ".embed" / "run.json").read_text())["settings"]["precision"] == "bf16"
    # a shard left, resumed without --precision (fp32 on this CPU): refused, not bf16 and fp32 shards in one output
    sorted((out / "train").glob("*.parquet"))[-1].unlink()
    assert main(["embed", str(folders["dataset"]), "--checkpoint", str(checkpoint), "--batch-size", "4",
                 "--out", str(out), "--no-progress"]) == 2


def test_a_resume_where_the_device_picks_another_precision_is_refused(folders, checkpoint, embedded, monkeypatch,
                                                                      capsys):
    """Without --precision the workers' device picks it (bf16 on a GPU, fp32 on a CPU, as clap-train);
    run.json records the one they ran in. A run made on this CPU resumed where the Ray cluster has a
    GPU (as the runner reads the cluster's resources) is refused, not bf16 shards among fp32 ones;
    --precision fp32 resumes it. With every shard done nothing runs on a device: the run finishes as
    it was made, without starting Ray. A run.json of an earlier version (precision None) still resumes."""
    import shutil

    import ray

    from audio_dataset import stage_runner

    out = folders["tmp"] / "embed-elsewhere"
    shutil.copytree(embedded, out)
    run_json = out / ".embed" / "run.json"
    assert json.loads(run_json.read_text())["settings"]["precision"] == "fp32"
    command = ["embed", str(folders["dataset"]), "--checkpoint", str(checkpoint), "--batch-size", "4",
               "--out", str(out), "--no-progress"]
    cpu_cluster = ray.cluster_resources()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {**cpu_cluster, "GPU": 1.0})
    started = []
    monkeypatch.setattr(stage_runner, "start_ray", lambda address: started.append(address) or False)
    assert main(command) == 0 and started == []  # every shard done: no device asked for, Ray not started
    assert json.loads(run_json.read_text())["settings"]["precision"] == "fp32"
    part = sorted((out / "train").glob("*.parquet"))[-1]
    part.unlink()  # a shard left to embed, on the "GPU"
    capsys.readouterr()
    assert main(command) == 2 and started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (precision)" in err[0] and "(recorded: precision=fp32)" in err[0]
    assert not part.exists()
    monkeypatch.setattr(ray, "cluster_resources", lambda: cpu_cluster)
    assert main([*command, "--precision", "fp32"]) == 0 and part.exists()
    record = json.loads(run_json.read_text())
    record["settings"]["precision"] = None  # as an earlier version wrote it
    run_json.write_text(json.dumps(record))
    part.unlink()
    assert main(command) == 0 and part.exists() and json.loads(run_json.read_text())["settings"]["precision"] is None


def test_every_shard_done_without_run_json_records_the_devices_precision(folders, checkpoint, embedded, monkeypatch,
                                                                      capsys):
    """A run.json removed (anyone may) with every shard done: no recorded precision to stand, so the
    run starts clean and records the one its device runs in (fp32 on this CPU), never the earlier
    version's unresolved None, which would let a later resume on a GPU add bf16 shards unrefused."""
    import shutil

    import ray

    out = folders["tmp"] / "embed-no-run-json"
    shutil.copytree(embedded, out)
    run_json = out / ".embed" / "run.json"
    run_json.unlink()
    command = ["embed", str(folders["dataset"]), "--checkpoint", str(checkpoint), "--batch-size", "4",
               "--out", str(out), "--no-progress"]
    assert main(command) == 0 and json.loads(run_json.read_text())["settings"]["precision"] == "fp32"
    sorted((out / "train").glob("*.parquet"))[-1].unlink()  # a shard left, on a "GPU"
    cpu_cluster = ray.cluster_resources()
    monkeypatch.setattr(ray, "cluster_resources", lambda: {**cpu_cluster, "GPU": 1.0})
    capsys.readouterr()
    assert main(command) == 2
    assert "other settings (precision)" in capsys.readouterr().err


def test_a_planted_precision_is_refused_even_with_nothing_left_to_run(folders, checkpoint, embedded, capsys):
    """With every shard done the recorded precision stands, but only bf16, fp32 or an earlier
    version's None: any other value planted in run.json is refused in one line, not carried on."""
    import shutil

    out = folders["tmp"] / "embed-planted-precision"
    shutil.copytree(embedded, out)
    run_json = out / ".embed" / "run.json"
    record = json.loads(run_json.read_text())
    record["settings"]["precision"] = "fp64"
    run_json.write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["embed", str(folders["dataset"]), "--checkpoint", str(checkpoint), "--batch-size", "4",
                 "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (precision)" in err[0] and "precision=fp64" in err[0], err


def test_device_cuda_without_a_gpu_says_so_before_any_setting_it_decides(folders, checkpoint, embedded, capsys):
    """`--device cuda` resuming a CPU run where the cluster has no GPU: the missing GPU is the line,
    not the precision (bf16) a GPU would have run in."""
    import shutil

    out = folders["tmp"] / "embed-no-gpu"
    shutil.copytree(embedded, out)
    sorted((out / "train").glob("*.parquet"))[-1].unlink()
    capsys.readouterr()
    assert main(["embed", str(folders["dataset"]), "--checkpoint", str(checkpoint), "--batch-size", "4",
                 "--out", str(out), "--no-progress", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--device cuda: the Ray cluster has no GPU" in err[0], err


@pytest.mark.parametrize("planted", ["bf16\n\x1b[2Jaudiodata: ok", "fp\u202e61fb", "x\ty"])
def test_a_refusal_shows_a_planted_recorded_value_on_one_line_inert(tmp_path, monkeypatch, planted):
    """run.json is anyone's to edit: a recorded value the refusal quotes ('recorded: precision=...')
    keeps it one line, with no character a terminal acts on (a newline, an escape, a bidi override)."""
    from audio_dataset import stage_runner
    from audio_dataset.source import UserError
    from audio_dataset.stage_runner import READ, Stage
    from upath import UPath

    monkeypatch.setattr(stage_runner, "dataset_identity", lambda folder: "sha256:same")
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "train" / "000000.parquet").write_bytes(b"")  # a shard done: the settings are compared
    (out / ".embed").mkdir()
    (out / ".embed" / "run.json").write_text(json.dumps(
        {"stage": "embed", "input": str(tmp_path.resolve()), "input_digest": "sha256:same",
         "settings": {"precision": planted}}))
    stage = Stage("embed", {"precision": "fp32"}, lambda device: None, pa.schema([]), mode=READ)
    with pytest.raises(UserError) as caught:
        stage_runner._check_resumable(UPath(out), stage, UPath(tmp_path), stage_runner._previous_run(UPath(out), stage))
    message = str(caught.value)
    assert "(recorded: precision=" in message and message.isprintable(), message


def test_an_earlier_versions_run_json_with_no_shard_done_records_the_resolved_precision(tmp_path):
    """The earlier version's unresolved precision (None) is kept only for its shards: where none is
    done (killed before the first), this run starts clean and records the precision it runs in, so a
    later resume on another kind of machine is refused as after any clean run."""
    from audio_dataset.curate.embed import EmbedOptions, _precision_setting
    from audio_dataset.stage_runner import READ, Stage, _previous_run, _recorded_settings
    from upath import UPath

    out = tmp_path / "out"
    (out / ".embed").mkdir(parents=True)
    (out / ".embed" / "run.json").write_text(json.dumps({"stage": "embed", "settings": {"precision": None}}))
    options = EmbedOptions(checkpoint=None)
    stage = Stage("embed", {}, lambda device: None, pa.schema([]), mode=READ)

    def setting() -> dict:  # what run_stage hands embed: the settings a resume must match
        return _precision_setting(options, "cpu", _recorded_settings(_previous_run(UPath(out), stage)))

    assert setting() == {"precision": "fp32"}
    (out / "train").mkdir()
    (out / "train" / "000000.parquet").write_bytes(b"")  # a shard done by the earlier version
    assert setting() == {"precision": None}


def test_a_resumed_embed_equals_a_clean_one(folders, checkpoint, embedded, capsys):
    clean = {name: (embedded / name).read_bytes() for name in ("train.audio.npy", "train.text.npy")}
    (embedded / "train" / "000001.parquet").unlink()
    capsys.readouterr()
    _cli("embed", folders["dataset"], "--checkpoint", checkpoint, "--batch-size", "4")
    assert "2 already done" in capsys.readouterr().out
    assert {name: (embedded / name).read_bytes() for name in clean} == clean
    assert main(["embed", str(folders["dataset"]), "--checkpoint", str(checkpoint), "--batch-size", "8",
                 "--no-progress"]) == 2  # other settings into the same output are refused


def test_search_by_audio_finds_the_clip_itself(folders, checkpoint, embedded, capsys):
    query = folders["tmp"] / "query.wav"
    soundfile.write(query, _pcm(REAL_AUDIO_DIR / f"{CLIPS['waltz']}.ogg", 3.0).T, RATE)
    capsys.readouterr()
    assert main(["search", str(folders["dataset"]), "--audio", str(query), "-k", "3", "--json",
                 "--checkpoint", str(checkpoint)]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 3 and hits[0]["key"] == key("waltz") and hits[0]["score"] > 0.999
    assert hits[0]["shard"] == str(folders["dataset"] / "train" / "000001.tar")
    assert hits[0]["member"] == f"{key('waltz')}.flac" and hits[0]["caption"].startswith("A sweet waltz")
    assert main(["search", str(folders["dataset"])]) == 2


def _loudness(sample: dict) -> float:
    import pyloudnorm

    ext = "flac" if "flac" in sample else "wav"
    data, rate = soundfile.read(io.BytesIO(sample[ext]), always_2d=True)
    return pyloudnorm.Meter(rate).integrated_loudness(data)


def test_filter_keeps_exactly_what_its_thresholds_say(folders, embedded):
    import py3langid

    dataset, out = folders["dataset"], folders["tmp"] / "filtered"
    rows = {r["key"]: r for r in pq.read_table(embedded / "train.rows.parquet").to_pylist()}
    similarity = float(np.median([r["similarity"] for r in rows.values()]))
    _cli("filter", dataset, "--out", out, "--min-seconds", "2.5", "--min-similarity", similarity,
         "--language", "en", "--min-lufs", "-40")
    expected = []
    for tar in sorted((dataset / "train").glob("*.tar")):
        for sample in iter_shard(tar):
            meta = json.loads(sample["json"])
            reasons = [meta["duration"] < 2.5 and "too_short", rows[sample["__key__"]]["similarity"] < similarity
                       and "low_similarity", py3langid.classify(" ".join(meta["text"]))[0] != "en" and "language",
                       _loudness(sample) < -40 and "too_quiet"]
            expected.append((sample["__key__"], next((r for r in reasons if r), "kept")))
    manifest = pq.read_table(out / "filter_manifest.parquet").to_pylist()
    assert [(r["key"], r["status"]) for r in manifest] == expected
    kept = [s["__key__"] for tar in sorted((out / "train").glob("*.tar")) for s in iter_shard(tar)]
    assert kept == [k for k, status in expected if status == "kept"] and 0 < len(kept) < 12
    assert sum(read_sizes(out / "train").values()) == len(kept)
    assert {"kept", "too_short", "low_similarity"} <= {status for _, status in expected}
    assert {r["language"] for r in manifest if r["status"] == "kept"} == {"en"}


def test_filter_top_fraction_per_source_and_loudness(folders, embedded):
    out = folders["tmp"] / "top"
    _cli("filter", folders["dataset"], "--out", out, "--top-fraction", "0.5", "--max-lufs", "-10", "--language", "en")
    rows = pq.read_table(embedded / "train.rows.parquet").to_pylist()
    manifest = {r["key"]: r for r in pq.read_table(out / "filter_manifest.parquet").to_pylist()}
    local = sorted((r["similarity"], r["key"]) for r in rows if r["source"] == "local")
    top_local = {k for _, k in local[len(local) - math.ceil(0.5 * len(local)):]}
    assert {k for k, r in manifest.items() if r["source"] == "local" and r["status"] != "low_similarity"} == top_local
    for source in ("freesound", "bbc", "sonniss"):  # one sample each: the top half of one is that one
        assert all(r["status"] != "low_similarity" for r in manifest.values() if r["source"] == source)
    assert all(r["loudness"] is None or r["loudness"] <= -10 or r["status"] == "too_loud" for r in manifest.values())
    german = manifest[key("dog", "bbc")]
    assert german["status"] == "language" and german["language"] == "de"


def test_filter_by_dedup_result_and_usage_errors(folders, capsys):
    dataset, out = folders["dataset"], folders["tmp"] / "unique"
    _cli("dedup", dataset, "--against", folders["eval"], "--no-embeddings")
    _cli("filter", dataset, "--out", out, "--dedup")
    manifest = {r["key"]: r["status"] for r in pq.read_table(out / "filter_manifest.parquet").to_pylist()}
    assert manifest[key("trumpet")] == "eval_overlap" and manifest[key("drums", "sonniss")] == "duplicate"
    assert list(manifest.values()).count("kept") == 8
    summary = json.loads((dataset / "dedup" / "summary.json").read_text())
    assert summary["counts"]["kept"] == 8  # dedup's "kept" is the samples filter --dedup keeps
    assert main(["filter", str(dataset), "--out", str(folders["tmp"] / "x"), "--no-progress"]) == 2
    assert "no test given" in capsys.readouterr().err
    assert main(["filter", str(dataset), "--out", str(folders["tmp"] / "x"), "--top-fraction", "1.5"]) == 2


@pytest.mark.parametrize("count", [500, 12_000])  # flat, and IVF from 10k vectors
def test_embedding_pairs_find_planted_copies(count):
    from audio_dataset.curate.embed_match import embedding_pairs

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, 64)).astype(np.float32)
    copies = np.arange(1, count, 50)
    vectors[copies] = vectors[copies - 1] + 0.05 * rng.standard_normal((len(copies), 64)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q, b, scores = embedding_pairs(vectors, vectors, threshold=0.98, same=True)
    found = set(zip(np.minimum(q, b).tolist(), np.maximum(q, b).tolist()))
    assert found == {(int(c - 1), int(c)) for c in copies}  # every planted copy, nothing else, no self-pairs
    assert (scores >= 0.98).all()
    q, b, _ = embedding_pairs(vectors, vectors[copies], threshold=0.98, same=False)  # eval queries
    assert set(zip(q.tolist(), b.tolist())) >= {(i, int(c)) for i, c in enumerate(copies)}


def test_dedup_with_embeddings_names_the_sets_without_them(folders, embedded, capsys):
    dataset, evalset = folders["dataset"], folders["eval"]
    capsys.readouterr()
    _cli("dedup", dataset, "--against", evalset, "--embedding-threshold", "0.99999")
    assert f"no embeddings for {evalset}" in capsys.readouterr().out
    rows = _clusters(dataset)
    assert rows[key("drums", "sonniss")]["kind"] == "exact"  # the strongest link names the kind
    assert {key("robin"), key("dog"), key("trumpet")} <= set(rows)


@pytest.mark.timeout(30)
def test_the_model_thread_runs_a_call_made_from_itself_and_keeps_an_errors_type():
    """A function on the model thread that asks for the model thread again (a processor or a bench
    step calling back into the worker) runs there at once instead of waiting on itself forever; a
    UserError from the factory reaches the caller as itself."""
    import threading

    import pyarrow as pa

    from audio_dataset.source import UserError
    from audio_dataset.stage_runner import REWRITE, _Worker

    def refuse(device):
        raise UserError("--model x: no such model")

    worker = _Worker(refuse, "cpu", 1, pa.schema([("status", pa.string())]), REWRITE)
    inner = worker.on_model_thread(worker.on_model_thread, threading.get_ident)
    assert inner == worker.on_model_thread(threading.get_ident) != threading.get_ident()
    with pytest.raises(UserError, match="^--model x: no such model$"):
        worker.on_model_thread(worker._processor)


def test_a_worker_prepares_the_next_shard_while_its_model_runs_one_shard_at_a_time(tmp_path):
    """The actor's threads: shard B is read and prepared while A is in `process`; `process` never
    runs twice at once, and always on one thread, the one that built the processor (torch's
    OpenMP team is per thread); every shard's output equals a serial run's."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from audio_dataset.stage_runner import REWRITE, SHARDS_IN_FLIGHT, _Worker, find_jobs, process_shard

    shards = [[{"__key__": f"s{n}k{i}", "flac": bytes([n, i]), "json": b"{}"} for i in range(3)] for n in range(4)]
    _write(tmp_path / "in", "train", shards)
    events, busy, overlaps = [], [0], []
    lock = threading.Lock()
    in_process = threading.Event()

    model_threads = set()

    class Processor:
        def __init__(self):
            model_threads.add(threading.get_ident())

        def prepare(self, job, samples):
            # decoding takes a while: a prepare that starts as the model's next process starts (the
            # two threads race for the same instant) still overlaps it, however the machine is loaded
            threading.Event().wait(0.05)
            with lock:
                events.append(("prepare", job.name, in_process.is_set()))
            return [sample["flac"][::-1] for sample in samples]

        def process(self, job, samples, prepared=None):
            model_threads.add(threading.get_ident())
            with lock:
                busy[0] += 1
                overlaps.append(busy[0])
            in_process.set()
            threading.Event().wait(0.15)  # the model's time: the other thread prepares meanwhile
            in_process.clear()
            with lock:
                busy[0] -= 1
            new = [{**s, "json": json.dumps({"p": list(p)}).encode()} for s, p in zip(samples, prepared)]
            return new, [{"status": "ok"} for _ in samples]

    schema = pa.schema([("status", pa.string())])
    worker = _Worker(lambda device: Processor(), "cpu", 1, schema, REWRITE)
    jobs = find_jobs(tmp_path / "in", tmp_path / "out", "t")
    with ThreadPoolExecutor(SHARDS_IN_FLIGHT) as pool:
        done = list(pool.map(worker.run, jobs))
    assert [n for _, n in done] == [3, 3, 3, 3] and max(overlaps) == 1
    assert len(model_threads) == 1 and threading.get_ident() not in model_threads
    assert any(during for what, _, during in events if what == "prepare")  # some shard prepared during a process
    for job, serial in zip(jobs, find_jobs(tmp_path / "in", tmp_path / "serial", "t")):
        process_shard(Processor(), serial, schema, REWRITE)
        assert list(iter_shard(job.dst)) == list(iter_shard(serial.dst)) and len(list(iter_shard(job.dst))) == 3
        assert pq.read_table(job.part).num_rows == 3


def test_the_runner_refuses_a_drop_stage_that_alters_or_reorders(tmp_path):
    from audio_dataset.stage_runner import DROP, READ, ShardJob, process_shard

    samples = [{"__key__": f"k{i}", "flac": b"x", "json": b"{}"} for i in range(3)]
    _write(tmp_path, "train", [samples])
    job = ShardJob("train", "000000.tar", str(tmp_path / "train" / "000000.tar"), str(tmp_path / "out.tar"),
                   str(tmp_path / "part.parquet"))

    class Processor:
        def __init__(self, keep):
            self.keep = keep

        def process(self, job, samples):
            return self.keep(samples), [{"status": "kept"} for _ in samples]

    schema = pa.schema([("status", pa.string())])
    assert process_shard(Processor(lambda s: [s[0], s[2]]), job, schema, DROP) == 2
    assert [s["__key__"] for s in iter_shard(job.dst)] == ["k0", "k2"]
    with pytest.raises(RuntimeError, match="changed or reordered"):
        process_shard(Processor(lambda s: [s[2], s[0]]), job, schema, DROP)
    with pytest.raises(RuntimeError, match="changed or reordered"):
        process_shard(Processor(lambda s: [{**s[0], "json": b'{"a": 1}'}]), job, schema, DROP)
    with pytest.raises(RuntimeError, match="rows for 3 samples"):
        process_shard(type("Short", (), {"process": lambda self, job, s: ([], [{"status": "ok"}])})(), job, schema,
                      READ)


def test_embed_marks_unreadable_audio_and_missing_captions(tmp_path):
    from audio_dataset.curate.embed import EmbedOptions, EmbedProcessor
    from audio_dataset.stage_runner import ShardJob
    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    torch.manual_seed(0)
    model = CLAP(get_preset("tiny"), pretrained_text=False)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict()}, tmp_path / "tiny.pt")
    good = _sample("dog", _pcm(REAL_AUDIO_DIR / f"{CLIPS['dog']}.ogg", 2.0))
    broken = {**good, "__key__": "broken", "flac": b"fLaC not really"}
    silent_text = {**good, "__key__": "uncaptioned", "json": json.dumps({"text": [" "], "source": "x"}).encode()}
    processor = EmbedProcessor(EmbedOptions(checkpoint=tmp_path / "tiny.pt"), "cpu")
    _, rows = processor.process(ShardJob("train", "000000.tar", "", "", ""), [good, broken, silent_text])
    assert [r["status"] for r in rows] == ["ok", "no_audio", "no_text"]
    assert not np.any(rows[1]["audio"]) and not np.any(rows[2]["text"])
    assert rows[0]["similarity"] is not None and rows[1]["similarity"] is None and rows[2]["caption"] is None
    np.testing.assert_allclose(rows[2]["audio"], rows[0]["audio"], atol=1e-6)  # the same clip


def _as_old_keys(folder: Path) -> None:
    """Every fingerprint part under `folder` as an earlier version wrote it: uint32 keys."""
    for path in folder.glob("*/*.parquet"):
        table = pq.read_table(path)
        old = pa.array([np.asarray(row, np.uint64).astype(np.uint32) for row in table.column("hashes").to_pylist()],
                       pa.list_(pa.uint32()))
        pq.write_table(table.set_column(table.schema.get_field_index("hashes"), "hashes", old), path)


def test_fingerprints_of_an_earlier_version_are_redone_or_refused(folders, tmp_path, capsys):
    """With their run record, an earlier version's fingerprints (uint32 triplet keys) are stale and
    done again: the result equals a clean run's. Without it (lost, or parts copied in), they were
    cast to this version's keys and silently matched against them; now one line names the part."""
    import shutil

    dataset, evalset = tmp_path / "dataset", tmp_path / "eval"
    shutil.copytree(folders["dataset"], dataset, ignore=shutil.ignore_patterns("dedup", "fingerprint"))
    shutil.copytree(folders["eval"], evalset)
    _cli("dedup", dataset, "--against", evalset, "--no-embeddings")
    clean = _clusters(dataset)
    record = dataset / "fingerprint" / ".fingerprint" / "run.json"
    run = json.loads(record.read_text())
    run["settings"] = {**run["settings"], "method": "wang2003-landmark-triplets", "fanout": 4}
    record.write_text(json.dumps(run))
    _as_old_keys(dataset / "fingerprint")
    shutil.rmtree(dataset / "dedup" / "_work")
    _cli("dedup", dataset, "--against", evalset, "--no-embeddings")
    assert _clusters(dataset) == clean
    capsys.readouterr()
    record.unlink()
    _as_old_keys(dataset / "fingerprint")
    shutil.rmtree(dataset / "dedup" / "_work")
    assert main(["dedup", str(dataset), "--against", str(evalset), "--no-embeddings", "--no-progress"]) in (1, 2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "fingerprint/train/000000.parquet: not a fingerprint part of this version (hashes list<" in err, err
