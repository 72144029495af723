"""`clap-eval --suite`: the shipped suites load and cite every number; a bad suite, templates file or
data root is one line; on tiny builds made here the command scores zero-shot and retrieval tasks,
skips (and names) the tasks without data, and its numbers equal those computed independently from
CLAPInference embeddings; fixed crops repeat exactly, random crops repeat under their seed;
--templates ensembles prompts; results.json carries the protocol and converts to Markdown and CSV."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from audio_dataset import audio as audio_lib
from audio_dataset.schema import SampleMeta, safe_key, shard_name
from audio_dataset.shards import ShardWriter, write_sizes
from clap_model import benchmark
from clap_model.checkpoint import save_atomic
from clap_model.clap import CLAP
from clap_model.config import get_preset
from clap_model.evaluate import main
from clap_model.inference import CLAPInference
from clap_model.metrics import multilabel_map, retrieval_metrics
from clap_model.suites import Prompts, SuiteError, load_prompts, load_suite, shipped_suites
from random_weights import perturb

RATE = 48_000
CLASSES = {"dog": 220.0, "chirping_birds": 1760.0, "car_horn": 440.0}  # ESC-50 spellings
TEMPLATE = "This is a sound of {}."


def _tone(freq: float, seconds: float, seed: int) -> np.ndarray:
    """int16 mono: a tone that changes pitch halfway (so where a crop falls changes the embedding)."""
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    pitch = np.where(t < seconds / 2, freq, freq * 1.5)
    wave = 0.4 * np.sin(2 * np.pi * pitch * t) + 0.05 * rng.standard_normal(len(t))
    return np.round(np.clip(wave, -1, 1) * 32767).astype(np.int16)


def _write_split(folder: Path, samples: list[tuple[str, np.ndarray, dict]]) -> None:
    folder.mkdir(parents=True)
    writer = ShardWriter(folder / shard_name(0))
    for key, pcm, fields in samples:
        text = fields.pop("text")
        meta = SampleMeta(text=text, tag=fields.get("class_labels", []), original_data={}, source="test",
                          source_id=key, license="CC0", author="test", url="", duration=len(pcm) / RATE,
                          sample_rate=RATE, channels=1, extra=fields)
        writer.write({"__key__": safe_key("test", key), "flac": audio_lib.encode_flac(pcm[None, :].astype(np.float32) / 32768.0, RATE),
                      "json": meta.to_json_bytes()})
    writer.close()
    write_sizes(folder, {shard_name(0): len(samples)})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """DATA_ROOT/esc50/test: 12 clips of 3 s, 3 classes, folds 1 and 2 (with class ids, as the esc50
    source writes them); DATA_ROOT/clotho/test: 4 clips with five captions each."""
    root = tmp_path_factory.mktemp("bench_root")
    clips: dict[str, np.ndarray] = {}
    esc = []
    for i in range(12):
        label = list(CLASSES)[i % 3]
        key = f"esc-{i:02d}"
        clips[safe_key("test", key)] = pcm = _tone(CLASSES[label], 3.0, i)
        esc.append((key, pcm, {"text": [label.replace("_", " ")], "class_labels": [label],
                               "class_ids": [list(CLASSES).index(label)], "fold": 1 + i % 2,
                               "benchmark_split": "esc50"}))
    _write_split(root / "esc50" / "test", esc)
    clotho = []
    for i in range(4):
        key = f"clotho-{i}"
        clips[safe_key("test", key)] = pcm = _tone(300.0 + 200 * i, 2.5, 100 + i)
        clotho.append((key, pcm, {"text": [f"caption {j} of sound {i}" for j in range(5)], "fold": None}))
    _write_split(root / "clotho" / "test", clotho)
    return root, clips


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random model whose audio projection learnt the three tones from fold 2's clips (their
    start, against the class prompts' embeddings): its zero-shot predictions differ by clip."""
    torch.manual_seed(3)
    cfg = get_preset("tiny")
    model = CLAP(cfg, pretrained_text=False).eval()
    perturb(model, seed=3)
    clap = CLAPInference(model, device="cpu")
    clips = [_tone(CLASSES[list(CLASSES)[i % 3]], 2.0, i) for i in range(1, 12, 2)]
    wave = torch.tensor(np.stack(clips).astype(np.float32) / 32768.0)
    with torch.no_grad():
        features = model.audio_branch(wave, torch.full((len(clips),), wave.shape[1]),
                                      torch.full((len(clips), 3), 0.5))["embedding"]
        text = clap.embed_text([TEMPLATE.format(name.replace("_", " ")) for name in CLASSES])
    target = torch.arange(1, 12, 2) % 3
    optimizer = torch.optim.Adam(model.audio_projection.parameters(), lr=1e-2)
    for _ in range(40):
        audio = torch.nn.functional.normalize(model.audio_projection(features), dim=-1)
        loss = torch.nn.functional.cross_entropy(20 * audio @ text.T, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("bench_ckpt") / "tiny-bench.pt"
    save_atomic({"config": cfg.to_dict(), "state_dict": model.state_dict(), "epoch": 1}, path)
    return path


SUITE = """
[suite]
name = "test-suite"
left_out = ["nothing"]

[[task]]
name = "esc-fold1"
dataset = "esc50"
folds = [1]
kind = "zeroshot"
templates = ["This is a sound of {}."]
metrics = ["accuracy", "top5", "mean_rank"]

[[task.published]]
checkpoint = "tiny-bench.pt"
metric = "accuracy"
value = 0.5
source = "made up for the test"

[[task]]
name = "esc-all"
dataset = "esc50"
kind = "zeroshot"

[[task]]
name = "clotho"
dataset = "clotho"
kind = "retrieval"

[[task]]
name = "urban"
dataset = "us8k"
kind = "zeroshot"

[[task]]
name = "esc-fold9"
dataset = "esc50"
folds = [9]
kind = "zeroshot"
"""


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bench_suite") / "suite.toml"
    path.write_text(SUITE)
    return path


@pytest.fixture(scope="module")
def esc_suite(tmp_path_factory) -> Path:
    """One task (every ESC-like clip): for the tests that run the command several times."""
    path = tmp_path_factory.mktemp("bench_suite") / "esc.toml"
    path.write_text('[suite]\nname = "esc"\n[[task]]\nname = "esc-all"\ndataset = "esc50"\nkind = "zeroshot"\n')
    return path


def _run(suite_file: Path, data_root: Path, checkpoint: Path, out: Path, *extra: str) -> dict:
    assert main(["--suite", str(suite_file), "--checkpoint", str(checkpoint), "--data-root", str(data_root),
                 "--out", str(out), "--batch-size", "5", "--workers", "0", "--device", "cpu", *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def fixed_run(suite_file, data_root, checkpoint, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench_out") / "run"
    return {**_run(suite_file, data_root[0], checkpoint, out), "out": str(out)}


# --------------------------------------------------------------------------- suites as data


@pytest.mark.parametrize("name", ["laion-clap", "msclap-2022", "msclap-2023"])
def test_the_shipped_suites_load_and_every_published_number_has_its_source(name):
    suite = load_suite(name)
    assert suite.name == name and suite.tasks and suite.left_out
    for task in suite.tasks:
        for row in task.published:
            assert row.source.strip() and row.metric in task.metrics and row.checkpoint
    assert name in shipped_suites()


def test_the_laion_readme_protocol_is_what_the_suite_says():
    task = next(t for t in load_suite("laion-clap").tasks if t.name == "esc50-fold1")
    assert task.folds == (1,) and task.templates == ("This is a sound of {}",) and task.filling == "repeatpad"
    assert task.class_name("chirping_birds") == "chirping birds"
    published = {(r.checkpoint, r.metric): r.value for r in task.published}
    assert published[("630k-audioset-best.pt", "accuracy")] == 0.9275
    msclap = next(t for t in load_suite("msclap-2023").tasks if t.name == "esc50")
    assert msclap.templates == ("this is the sound of {}",) and msclap.filling == "repeat" and not msclap.folds


BAD_SUITES = {
    "not toml": "[suite\nname=",
    "no tasks": '[suite]\nname = "x"\n',
    "unknown kind": '[suite]\nname="x"\n[[task]]\nname="a"\ndataset="esc50"\nkind="regression"\n',
    "template without a slot": '[suite]\nname="x"\n[[task]]\nname="a"\ndataset="esc50"\nkind="zeroshot"\ntemplates=["a sound"]\n',
    "dataset as a path": '[suite]\nname="x"\n[[task]]\nname="a"\ndataset="../etc"\nkind="zeroshot"\n',
    "number without source": '[suite]\nname="x"\n[[task]]\nname="a"\ndataset="esc50"\nkind="zeroshot"\n'
                             '[[task.published]]\ncheckpoint="c"\nmetric="accuracy"\nvalue=0.9\nsource=""\n',
    "percent for a fraction": '[suite]\nname="x"\n[[task]]\nname="a"\ndataset="esc50"\nkind="zeroshot"\n'
                              '[[task.published]]\ncheckpoint="c"\nmetric="accuracy"\nvalue=92.75\nsource="s"\n',
    "a name that is a path": '[suite]\nname="../../x"\n[[task]]\nname="a"\ndataset="esc50"\nkind="zeroshot"\n',
    "misspelt key": '[suite]\nname="x"\n[[task]]\nname="a"\ndataset="esc50"\nkind="zeroshot"\nfold=[1]\n',
}


@pytest.mark.parametrize("text", BAD_SUITES.values(), ids=BAD_SUITES.keys())
def test_a_bad_suite_is_one_line_and_exit_2(text, tmp_path, checkpoint, capsys):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(SuiteError):
        load_suite(str(tmp_path / "bad.toml"))
    assert main(["--suite", str(tmp_path / "bad.toml"), "--checkpoint", str(checkpoint),
                 "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clap-eval: error: ") and err.count("\n") == 1


@pytest.mark.parametrize("argv, says", [
    (["--suite", "no-such-suite", "--data-root", "."], "no such suite"),
    (["--suite", "laion-clap", "--data-root", "/no/such/root"], "no such folder"),
    (["--suite", "laion-clap"], "--suite needs --data-root"),
    (["--data-root", "."], "--data-root goes with --suite"),
    (["--suite", "laion-clap", "--data-root", ".", "--repeats", "3"], "--repeats needs --crop random"),
])
def test_suite_usage_mistakes_are_one_line(argv, says, checkpoint, capsys):
    assert main(["--checkpoint", str(checkpoint), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1


def test_suite_mistakes_are_found_before_torch_loads(tmp_path):
    """The suite, data root and templates are checked before the heavy imports: a quick line."""
    import subprocess
    import sys

    (tmp_path / "bad.toml").write_text("[suite]\nname = 1\n")
    code = ("import sys; from clap_model.evaluate import main; "
            f"code = main(['--suite', {str(tmp_path / 'bad.toml')!r}, '--checkpoint', 'x.pt', '--data-root', '.']); "
            "assert 'torch' not in sys.modules, 'torch loaded'; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("clap-eval: error: ") and done.stderr.count("\n") == 1


# --------------------------------------------------------------------------- the command end to end


def test_the_suite_scores_what_is_built_and_names_what_is_skipped(fixed_run, capsys):
    tasks = {t["name"]: t for t in fixed_run["tasks"]}
    assert set(tasks) == {"esc-fold1", "esc-all", "clotho"}
    assert [(s["task"], s["dataset"]) for s in fixed_run["skipped"]] == [("urban", "us8k"), ("esc-fold9", "esc50")]
    assert "us8k is not built" in fixed_run["skipped"][0]["reason"]
    assert "no clip in folds [9]" in fixed_run["skipped"][1]["reason"]  # named; the other tasks go on
    assert tasks["esc-fold1"]["clips"] == 6 and tasks["esc-all"]["clips"] == 12
    assert tasks["clotho"]["details"]["captions"] == 20 and tasks["clotho"]["details"]["captions_per_clip"] == [5]
    fold1 = tasks["esc-fold1"]
    assert fold1["published"]["accuracy"]["value"] == 0.5
    assert fold1["difference"]["accuracy"] == pytest.approx(fold1["metrics"]["accuracy"] - 0.5)
    # Every protocol choice and the checkpoint's identity are recorded.
    assert fold1["protocol"]["folds"] == [1] and fold1["protocol"]["templates"] == [TEMPLATE]
    assert fold1["audio"] == {"sample_rate": RATE, "clip_seconds": 2.0, "truncating": "rand_trunc",
                              "filling": "repeatpad", "crop": "start", "crop_seeds": [], "as_reference": None}
    assert set(fold1["details"]["per_class_accuracy"]) == set(CLASSES)
    assert fixed_run["checkpoint"]["sha256"] and len(fixed_run["checkpoint"]["sha256"]) == 64
    assert fixed_run["version"] and fixed_run["suite"]["left_out"] == ["nothing"]
    assert fixed_run["run"]["crop"] == "fixed" and fixed_run["run"]["templates"] is None


def test_zero_shot_accuracy_equals_one_computed_from_clap_inference(fixed_run, data_root, checkpoint):
    _, clips = data_root
    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    task = next(t for t in fixed_run["tasks"] if t["name"] == "esc-all")
    keys = sorted(task["details"]["predictions"])
    audio = clap.embed_audio([clips[k] for k in keys], sample_rate=RATE)
    classes = list(CLASSES)  # the ids' order
    assert task["details"]["classes"] == classes
    text = clap.embed_text([TEMPLATE.format(c.replace("_", " ")) for c in classes])
    predicted = [classes[i] for i in (audio @ text.T).argmax(dim=1)]
    assert predicted == [task["details"]["predictions"][k] for k in keys]
    assert len(set(predicted)) == 3  # the model tells the tones apart: a check that can fail
    number = {safe_key("test", f"esc-{i:02d}"): i for i in range(12)}
    truth = [classes[number[k] % 3] for k in keys]  # clip i is of class i % 3, in fold 1 + i % 2
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth)]))
    assert task["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    fold1 = next(t for t in fixed_run["tasks"] if t["name"] == "esc-fold1")
    fold1_rows = [row for row, k in enumerate(keys) if number[k] % 2 == 0]
    assert fold1["metrics"]["accuracy"] == pytest.approx(np.mean([predicted[r] == truth[r] for r in fold1_rows]))


def test_retrieval_equals_the_metrics_of_clap_inference_embeddings(fixed_run, data_root, checkpoint):
    _, clips = data_root
    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    keys = [safe_key("test", f"clotho-{i}") for i in range(4)]
    audio = clap.embed_audio([clips[k] for k in keys], sample_rate=RATE)
    text = clap.embed_text([f"caption {j} of sound {i}" for i in range(4) for j in range(5)])
    expected = retrieval_metrics(audio, text, torch.arange(4).repeat_interleave(5))
    found = next(t for t in fixed_run["tasks"] if t["name"] == "clotho")["metrics"]
    assert found == pytest.approx(expected, abs=1e-6)


def test_a_fixed_crop_repeats_exactly(fixed_run, esc_suite, data_root, checkpoint, tmp_path):
    [again] = _run(esc_suite, data_root[0], checkpoint, tmp_path / "again", "--batch-size", "7")["tasks"]
    first = next(t for t in fixed_run["tasks"] if t["name"] == "esc-all")
    assert first["metrics"] == again["metrics"] and first["details"] == again["details"]


def test_random_crops_are_drawn_per_clip_and_reproduced_by_their_seed(data_root, checkpoint):
    model = CLAPInference.from_checkpoint(checkpoint, device="cpu").model
    task = load_suite("laion-clap").tasks[0]
    folder = data_root[0] / "clotho" / "test"  # four 2.5 s clips, longer than the model's 2 s: crops differ
    opts = benchmark.Options(batch_size=5)
    spec = benchmark.audio_spec_for(model, task, opts)
    from clap_model.text import Tokenize

    tokenize = Tokenize(model.cfg.text)

    def embed(seed, batch_size=5):
        opts.batch_size = batch_size
        found = benchmark.embed_split(model, folder, spec, tokenize, opts, seed, captions=False)
        return found.audio[torch.tensor(np.argsort(found.keys))]

    first, fixed = embed(7), embed(None)
    assert torch.allclose(first, embed(7, batch_size=3), atol=1e-6)  # the same crops whatever the batching
    assert not torch.allclose(first, embed(8)) and not torch.allclose(first, fixed)


def test_repeated_random_crops_give_a_mean_and_spread(esc_suite, data_root, checkpoint, tmp_path):
    """Repeat r draws with seed + r: the second of two repeats from seed 4 is the run of seed 5."""
    [task] = _run(esc_suite, data_root[0], checkpoint, tmp_path / "a", "--crop", "random", "--seed", "4",
                  "--repeats", "2")["tasks"]
    [alone] = _run(esc_suite, data_root[0], checkpoint, tmp_path / "b", "--crop", "random", "--seed", "5")["tasks"]
    assert len(task["repeats"]) == 2 and task["repeats"][1] == alone["metrics"]
    assert task["audio"]["crop_seeds"] == [4, 5] and task["audio"]["crop"] == "random"
    for metric, value in task["metrics"].items():
        assert value == pytest.approx(np.mean([r[metric] for r in task["repeats"]]))
        assert task["spread"][metric] == pytest.approx(np.std([r[metric] for r in task["repeats"]]))


# --------------------------------------------------------------------------- prompts


def test_a_prompt_ensemble_is_the_normalised_mean_of_its_prompts(checkpoint):
    clap = CLAPInference.from_checkpoint(checkpoint, device="cpu")
    groups = [["a dog", "the sound of a dog", "woof"], ["a car horn"]]
    found = benchmark.class_embeddings(clap.model, clap.tokenize, groups, torch.device("cpu"), "fp32")
    single = clap.embed_text(groups[0])
    expected = torch.nn.functional.normalize(torch.nn.functional.normalize(single, dim=-1).mean(0), dim=-1)
    assert torch.allclose(found[0], expected, atol=1e-6)
    assert torch.allclose(found[1], clap.embed_text(groups[1])[0], atol=1e-6)


def test_templates_file_prompts_are_used_and_recorded(esc_suite, data_root, checkpoint, tmp_path, fixed_run):
    (tmp_path / "prompts.toml").write_text(
        'templates = ["This is a sound of {}.", "A recording of {}."]\n'
        '[datasets.esc50.descriptions]\ndog = ["a dog barking loudly"]\n')
    found = _run(esc_suite, data_root[0], checkpoint, tmp_path / "out", "--templates", str(tmp_path / "prompts.toml"))
    task = next(t for t in found["tasks"] if t["name"] == "esc-all")
    assert task["details"]["prompts"]["dog"] == ["This is a sound of dog.", "A recording of dog.", "a dog barking loudly"]
    assert task["details"]["prompts"]["car_horn"] == ["This is a sound of car horn.", "A recording of car horn."]
    assert found["run"]["templates"]["templates"] == ["This is a sound of {}.", "A recording of {}."]
    before = next(t for t in fixed_run["tasks"] if t["name"] == "esc-all")
    assert before["details"]["prompts"]["dog"] == [TEMPLATE.format("dog")]


@pytest.mark.parametrize("text", ['templates = ["no slot"]', "templates = 3", "[datasets.esc50]\ntemplates = [1]",
                                  "colour = 1", ""])
def test_a_bad_templates_file_is_one_line(text, tmp_path, checkpoint, capsys):
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(SuiteError):
        load_prompts(str(tmp_path / "t.toml"))
    assert main(["--suite", "laion-clap", "--checkpoint", str(checkpoint), "--data-root", str(tmp_path),
                 "--templates", str(tmp_path / "t.toml")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_prompts_fall_back_to_the_tasks_own_templates():
    task = load_suite("laion-clap").tasks[0]
    assert Prompts().prompts(task, "chirping_birds") == ["This is a sound of chirping birds"]


# --------------------------------------------------------------------------- tables


def test_results_convert_to_markdown_and_csv(fixed_run, capsys):
    out = Path(fixed_run["out"])
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("| task | metric | ours | published | difference |")
    accuracy = next(t for t in fixed_run["tasks"] if t["name"] == "esc-fold1")["metrics"]["accuracy"]
    assert f"| esc-fold1 | accuracy | {100 * accuracy:.2f} | 50.00 [1] |" in markdown
    assert "[1] made up for the test" in markdown and "Skipped urban" in markdown
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    row = next(r for r in rows if r["task"] == "esc-fold1" and r["metric"] == "accuracy")
    assert float(row["ours"]) == pytest.approx(accuracy) and row["source"] == "made up for the test"
    assert {r["task"] for r in rows} == {"esc-fold1", "esc-all", "clotho"}
    for table in ("csv", "md"):
        assert main(["--results", str(out / "results.json"), "--table", table]) == 0
        assert capsys.readouterr().out == (out / f"results.{table}").read_text()
    assert main(["--results", str(out / "results.json")]) == 0  # the text table
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split() == ["task", "metric", "ours", "published", "difference"]
    assert "skipped urban: us8k is not built" in printed


def test_a_results_file_that_is_not_ours_is_one_line(tmp_path, capsys):
    (tmp_path / "r.json").write_text('{"tasks": []}')
    assert main(["--results", str(tmp_path / "r.json")]) == 2
    assert "not a results.json" in capsys.readouterr().err


def test_the_output_folder_is_never_written_through_a_link(suite_file, data_root, checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").symlink_to(tmp_path / "elsewhere.json")
    assert main(["--suite", str(suite_file), "--checkpoint", str(checkpoint), "--data-root", str(data_root[0]),
                 "--out", str(out)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "elsewhere.json").exists()


# --------------------------------------------------------------------------- multi-label mAP


def test_multilabel_map_is_scikit_learns_average_precision_macro():
    from sklearn.metrics import average_precision_score

    gen = torch.Generator().manual_seed(0)
    audio = torch.nn.functional.normalize(torch.randn(40, 8, generator=gen), dim=-1)
    classes = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=-1)
    targets = (torch.rand(40, 5, generator=gen) < 0.3).float()
    targets[:, 4] = 0  # a class with no positive clip is left out of the mean
    found, per_class = multilabel_map(audio, classes, targets)
    scores = (audio @ classes.T).numpy()
    expected = [average_precision_score(targets[:, c].numpy(), scores[:, c]) for c in range(4)]
    assert per_class[:4] == pytest.approx(expected) and per_class[4] is None
    assert found == pytest.approx(np.mean(expected))
    # Ties: a constant score earns the base rate, as scikit-learn gives it.
    flat, _ = multilabel_map(audio, torch.zeros(5, 8), targets)
    assert flat == pytest.approx(np.mean([float(targets[:, c].mean()) for c in range(4)]))


def test_a_linked_dataset_folder_is_skipped_not_followed(data_root, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "esc50").symlink_to(data_root[0] / "esc50")
    (root / "clotho").mkdir()
    (root / "clotho" / "test").symlink_to(data_root[0] / "clotho" / "test")
    tasks = {t.name: t for t in load_suite("laion-clap").tasks}
    for name in ("esc50-fold1", "clotho-test"):
        folder, why = benchmark.task_folder(tasks[name], root)
        assert folder is None and "symbolic link" in why
    assert benchmark.task_folder(tasks["esc50"], data_root[0]) == (data_root[0] / "esc50" / "test", "")
    assert "no test split" in benchmark.task_folder(tasks["gtzan"], _with(tmp_path / "g", "gtzan"))[1]


def _with(root: Path, dataset: str) -> Path:
    (root / dataset / "train").mkdir(parents=True)
    return root


def test_a_hugging_face_folder_is_scored_and_hashed(esc_suite, data_root, tmp_path):
    """The suite runs on any format clap-eval loads: here an HF ClapModel folder (tiny-roberta)."""
    from clap_model import hf_format

    torch.manual_seed(0)
    hf_format.save_hf(CLAP(get_preset("tiny-roberta"), pretrained_text=False), tmp_path / "hf")
    found = _run(esc_suite, data_root[0], tmp_path / "hf", tmp_path / "out", "--reference", "tiny-bench.pt")
    assert found["tasks"][0]["clips"] == 12 and found["checkpoint"]["name"] == "hf"
    assert found["checkpoint"]["sha256"] == benchmark.checkpoint_sha256(str(tmp_path / "hf"))
    assert len(found["checkpoint"]["sha256"]) == 64 and found["checkpoint"]["reference"] == "tiny-bench.pt"
    (tmp_path / "hf" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text() + " ")
    assert benchmark.checkpoint_sha256(str(tmp_path / "hf")) != found["checkpoint"]["sha256"]
