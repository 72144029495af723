"""Qwen2.5-Omni through the listen step, and the CLAP check in batches.

The Omni model is tiny and random, saved the way `Qwen/Qwen2.5-Omni-7B` is downloaded: one checkpoint
of model_type qwen2_5_omni (thinker, talker, token2wav) that the listen step loads the thinker from,
through the users' `--alm-model PATH`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from audio_dataset.caption import types as t
from audio_dataset.cli import main
from audio_dataset.shards import iter_shard
from test_k2c import _sample, _write_input  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("ray_local", "one_torch_thread")


@pytest.fixture(scope="module")
def omni(tmp_path_factory) -> Path:
    from audio_dataset.caption.tiny_alm import make_tiny_omni

    return make_tiny_omni(tmp_path_factory.mktemp("omni") / "Qwen2.5-Omni")


@pytest.fixture(scope="module")
def omni_input(tmp_path_factory) -> Path:
    """A 35 s clip (two windows: 30 s and 5 s) and a short one, in two shards."""
    return _write_input(tmp_path_factory.mktemp("omni_in"), {"train": [
        [_sample("147793__setuniman__sweet-waltz-0i-22mi", 35.0)], [_sample("198-209-0000", 2.0)]]})


@pytest.fixture(scope="module")
def listener_b1(omni):
    """The Omni listener in this process at batch 1 (the stage runs it in a worker)."""
    from audio_dataset.caption.listen import ListenOptions, make_listener, resolve_alm

    options = ListenOptions(model=str(omni), questions=QUESTIONS, max_new_tokens=4, batch_size=1)
    return make_listener(options, *resolve_alm(options), "cpu")


QUESTIONS = ("What do you hear?", "Is there music?")


def test_the_tiny_omni_is_laid_out_as_the_full_omni_download(omni):
    config = json.loads((omni / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_omni" and config["architectures"] == ["Qwen2_5OmniForConditionalGeneration"]
    assert {"thinker_config", "talker_config", "token2wav_config"} <= set(config)
    from safetensors import safe_open

    with safe_open(str(omni / "model.safetensors"), "pt") as weights:
        prefixes = {key.split(".")[0] for key in weights.keys()}
    assert prefixes == {"thinker", "talker", "token2wav"}
    # One preprocessor_config.json for the audio and the image front ends, as the download has.
    assert {"feature_extractor_type", "image_processor_type"} <= set(json.loads(
        (omni / "preprocessor_config.json").read_text()))


def test_omni_listens_per_window_through_the_stage_and_batching_does_not_change_answers(
        omni, omni_input, listener_b1, tmp_path):
    from audio_dataset.caption.types import Clip
    from audio_dataset.caption.stage import decode_whole  # the stage's own decoder

    questions, out = tmp_path / "questions.json", tmp_path / "out"
    questions.write_text(json.dumps(list(QUESTIONS)))
    assert main(["caption", str(omni_input), "--out", str(out), "--steps", "listen", "--alm-model", str(omni),
                 "--questions", str(questions), "--alm-max-new-tokens", "4", "--batch-size", "4",
                 "--workers", "1", "--threads", "1", "--no-progress"]) == 0
    samples = [s for tar in sorted((out / "train").glob("*.tar")) for s in iter_shard(tar)]
    four = {s["__key__"]: json.loads(s["json"])["alm_answers"] for s in samples}
    waltz = next(answers for key, answers in four.items() if "waltz" in key)
    assert [(a["start"], a["end"], a["question"]) for a in waltz] == [
        (0.0, 30.0, QUESTIONS[0]), (0.0, 30.0, QUESTIONS[1]), (30.0, 35.0, QUESTIONS[0]), (30.0, 35.0, QUESTIONS[1])]
    assert all(len(answers) == 2 for key, answers in four.items() if "waltz" not in key)
    texts = [a["answer"] for answers in four.values() for a in answers]
    assert all(texts) and len(set(texts)) > 1  # the real generate path wrote words that depend on the input
    # The same clips one prompt at a time: the same greedy answers.
    clips = [Clip(s["__key__"], decode_whole(s["flac"], 16000), 16000) for s in samples]
    one = listener_b1.listen(clips, list(QUESTIONS))
    assert {clip.key: [a.as_json() for a in answers] for clip, answers in zip(clips, one)} == four
    rows = pq.read_table(out / "caption_manifest.parquet").to_pylist()
    assert [r["status"] for r in rows] == [t.LISTENED] * 2 and [r["windows"] for r in rows] == [2, 1]
    settings = json.loads((out / ".caption" / "run.json").read_text())["settings"]
    assert settings["listen"]["model_type"] == "qwen2_5_omni" and settings["batch_size"] == 4


def test_the_omni_prompt_carries_its_system_turn_and_the_audio_tokens(listener_b1):
    prompt = listener_b1.prompt("Hi")
    assert prompt.startswith("<|im_start|>system\nYou are Qwen, a virtual human")
    assert "<|audio_bos|><|AUDIO|><|audio_eos|>" in prompt
    batch = listener_b1.processor(text=[prompt], audio=[np.zeros(3 * 16000, np.float32)],
                                  sampling_rate=16000, return_tensors="pt")
    audio_id = listener_b1.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert int((batch["input_ids"] == audio_id).sum()) == 75  # 3 s of audio: 75 audio tokens


def test_the_clap_check_batches_across_samples_with_the_scores_of_one_at_a_time(caption_models):
    from audio_dataset.caption.check import CheckOptions, ClapChecker, check_settings
    from audio_dataset.caption.types import Clip

    rng = np.random.default_rng(0)
    # Ten clips of different lengths, some over the model's window, with their candidates (the
    # last clip has none: nothing to score).
    clips = [Clip(f"c{i}", (rng.standard_normal(int(s * 16000)) * 0.1).astype(np.float32), 16000)
             for i, s in enumerate([1.0, 2.5, 12.0, 0.5, 3.0, 7.5, 1.5, 2.0, 4.0, 0.8])]
    words = ["a dog barks", "rain on a roof", "a man speaks", "birds chirp in a park", "an engine idles"]
    requests = [(clip, words[:1 + i % 5]) for i, clip in enumerate(clips[:-1])] + [(clips[-1], [])]

    def checker(batch_size: int) -> tuple[ClapChecker, list[int]]:
        options = CheckOptions(caption_models["clap"], batch_size=batch_size)
        made = ClapChecker(options, check_settings(options), "cpu")
        sizes: list[int] = []
        encode = made.embed.clap.model.encode_audio

        def counted(batch, *args, **kwargs):
            sizes.append(len(batch))
            return encode(batch, *args, **kwargs)

        made.embed.clap.model.encode_audio = counted
        return made, sizes

    single, single_sizes = checker(1)
    one_at_a_time = [single.score(clip, texts) for clip, texts in requests]
    batched, batched_sizes = checker(8)
    together = batched.score_many(requests)
    assert [len(s) for s in together] == [len(texts) for _, texts in requests]
    for alone, joint in zip(one_at_a_time, together):
        assert joint == pytest.approx(alone, abs=1e-5)
    assert single_sizes == [1] * 9 and batched_sizes == [8, 1]  # the audio went in batches of --batch-size
    # A retry scores the same clips again: their audio is not embedded twice.
    again = batched.score_many(requests[:3])
    assert [s for scores in again for s in scores] == [s for scores in together[:3] for s in scores]
    assert batched_sizes == [8, 1]
    assert len({round(s, 4) for scores in together for s in scores}) > 5  # the scores tell texts apart


def test_the_processors_chat_template_file_wins_over_the_tokenizers(omni, tmp_path):
    """A download with chat_template.json (the processor's, which renders the audio) renders with it."""
    import shutil

    from audio_dataset.caption.listen import FAMILIES, load_processor
    from audio_dataset.caption.tiny_alm import CHAT_TEMPLATE

    folder = Path(shutil.copytree(omni, tmp_path / "omni"))
    template = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    processor = load_processor(FAMILIES["qwen2_5_omni"], str(folder))
    rendered = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                             tokenize=False)
    assert rendered == "[user]<|audio_bos|><|AUDIO|><|audio_eos|>"
    (folder / "chat_template.json").write_text("[not json")  # unreadable: the tokenizer's template
    processor = load_processor(FAMILIES["qwen2_5_omni"], str(folder))
    assert processor.chat_template == processor.tokenizer.chat_template == CHAT_TEMPLATE
