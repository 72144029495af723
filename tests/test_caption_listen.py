"""The LISTEN step on a tiny random-weight Qwen2-Audio loaded from a folder, as `--alm-model PATH`:
the model's own front end, windows, the rendered prompt, and batching that does not change answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from audio_dataset.caption.listen import DEFAULT_QUESTIONS, ListenOptions, make_listener, read_questions, \
    resolve_alm, windows
from audio_dataset.caption.types import Clip
from audio_dataset.source import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RATE = 16000


@pytest.fixture(scope="module")
def listener(caption_models):
    options = ListenOptions(model=str(caption_models["alm"]), max_new_tokens=5, batch_size=8)
    return make_listener(options, *resolve_alm(options), "cpu")


def _clip(key: str, seconds: float, seed: int) -> Clip:
    wave = np.random.default_rng(seed).standard_normal(int(seconds * RATE)).astype(np.float32) * 0.1
    return Clip(key, wave, RATE)


def test_windows_cut_at_the_models_window_and_drop_a_tiny_tail():
    assert windows(65 * RATE, RATE, 30.0) == [(0, 30 * RATE), (30 * RATE, 60 * RATE), (60 * RATE, 65 * RATE)]
    assert windows(60 * RATE + RATE // 2, RATE, 30.0) == [(0, 30 * RATE), (30 * RATE, 60 * RATE)]
    assert windows(3 * RATE, RATE, 30.0) == [(0, 3 * RATE)]
    assert windows(RATE // 4, RATE, 30.0) == [(0, RATE // 4)]  # a short clip is one window, however short


def test_the_listener_takes_rate_and_window_from_the_models_processor(listener):
    extractor = listener.processor.feature_extractor
    assert listener.sample_rate == extractor.sampling_rate == 16000
    assert listener.window_seconds == extractor.chunk_length == 30
    answers = listener.listen([_clip("long", 65, 0)], ["What do you hear?"])[0]
    assert [(a.start, a.end) for a in answers] == [(0.0, 30.0), (30.0, 60.0), (60.0, 65.0)]
    assert all(a.question == "What do you hear?" and isinstance(a.answer, str) for a in answers)
    assert any(a.answer for a in answers)  # the real generate path wrote words


def test_the_prompt_is_qwen2_audios_chat_template(listener):
    assert listener.prompt(DEFAULT_QUESTIONS[0]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
        "Describe the sound events in this audio and the acoustic scene they happen in, in at most 50 words."
        "<|im_end|>\n<|im_start|>assistant\n")
    # The rendered prompt reaches the model with the audio token expanded to the window's frames.
    batch = listener.processor(text=[listener.prompt("Hi")], audio=[np.zeros(3 * RATE, np.float32)],
                               sampling_rate=RATE, return_tensors="pt")
    audio_id = listener.processor.tokenizer.convert_tokens_to_ids("<|AUDIO|>")
    assert int((batch["input_ids"] == audio_id).sum()) == 75  # 3 s: 300 frames -> 150 -> 75 tokens


def test_batching_does_not_change_greedy_answers(caption_models, listener):
    clips = [_clip(f"c{i}", seconds, i) for i, seconds in enumerate([3.0, 1.5, 7.0, 2.0])]
    questions = ["What do you hear?", "Is there music?"]
    batched = listener.listen(clips, questions)
    options = ListenOptions(model=str(caption_models["alm"]), max_new_tokens=5, batch_size=1)
    one_by_one = make_listener(options, *resolve_alm(options), "cpu").listen(clips, questions)
    assert batched == one_by_one
    assert [len(a) for a in batched] == [2, 2, 2, 2]
    assert len({a.answer for answers in batched for a in answers}) > 1  # the clips' answers differ


def test_questions_file_one_a_line_or_a_json_list(tmp_path):
    lines = tmp_path / "q.txt"
    lines.write_text("What animal is it?\n\n  Is it indoors?  \n")
    assert read_questions(lines) == ("What animal is it?", "Is it indoors?")
    listed = tmp_path / "q.json"
    listed.write_text(json.dumps(["One?", "Two?"]))
    assert read_questions(listed) == ("One?", "Two?")
    for bad in ('["ok", 3]', "", "[not json"):
        listed.write_text(bad)
        with pytest.raises(UserError, match="--questions"):
            read_questions(listed)


def test_a_model_that_is_not_an_audio_language_model_is_one_line(caption_models):
    with pytest.raises(UserError, match="model_type 'qwen2' is not an audio-language model"):
        resolve_alm(ListenOptions(model=str(caption_models["llm"])))


@pytest.mark.parametrize("samples", [1, 800, 1_599])
def test_a_clip_shorter_than_the_front_end_takes_is_heard_padded(listener, samples):
    """Whisper's front end makes no audio token of under 0.1 s (the processor raised TypeError, which
    the stage did not expect: one such clip ended the run); the window is padded with silence."""
    clip = Clip("short", np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1, RATE)
    alone = listener.listen([clip], ["What do you hear?"])  # a batch of short windows only
    answers = listener.listen([clip, _clip("normal", 2.0, 1)], ["What do you hear?"])
    assert [len(a) for a in answers] == [1, 1] and alone == answers[:1]
    assert (answers[0][0].start, answers[0][0].end) == (0.0, round(samples / RATE, 3))  # its own span


@pytest.mark.parametrize("penalty", [1.3, "high", 1e9, "fifo"])
def test_the_folders_repetition_penalty_is_decoded_with_and_recorded(caption_models, tmp_path, penalty):
    """Both engines decode with the folder's repetition penalty (vLLM applies it only when passed);
    run.json records it; a value that is no penalty is one line."""
    import shutil

    folder = tmp_path / "alm"
    shutil.copytree(caption_models["alm"], folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": penalty}))
    options = ListenOptions(model=str(folder), max_new_tokens=5, batch_size=8)
    if penalty == "fifo":  # read as a file, it never ends
        import os

        (folder / "generation_config.json").unlink()
        os.mkfifo(folder / "generation_config.json")
        with pytest.raises(UserError, match="not a regular file"):
            make_listener(options, *resolve_alm(options), "cpu")
        return
    if not isinstance(penalty, float) or penalty > 10:
        with pytest.raises(UserError, match="repetition_penalty"):
            make_listener(options, *resolve_alm(options), "cpu")
        return
    listener = make_listener(options, *resolve_alm(options), "cpu")
    assert listener.settings["decoding"] == {"do_sample": False, "max_new_tokens": 5, "repetition_penalty": 1.3}
    assert listener.listen([_clip("a", 2.0, 0)], ["What do you hear?"])[0][0].answer is not None
