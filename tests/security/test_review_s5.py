"""Review 5: a stranger controls the data of `audiodata caption`, the benchmark sources and
`clap-eval --suite` (templates files, suite files, LLM endpoint answers, distribution CSVs/JSON).
Each test names the attack; the command must refuse in one line or fail only the item, never run,
leak or crash with a traceback."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clap_model.suites import SuiteError, load_prompts

# ---- clap-eval --templates / suite templates: str.format on a stranger's string ------------------


@pytest.mark.parametrize("template", [
    "{0.__class__.__init__.__globals__}CLASS",  # attribute walk: AttributeError, a traceback before
    "{0.__doc__} CLASS",  # reads str's docstring into every prompt
    "A sound of {:>1000000}.",  # pads each prompt to a megabyte (any width a file asks for)
    "A sound of {!r}.",
    "A sound of {0}.",
])
def test_a_templates_file_gets_only_a_bare_placeholder(tmp_path, template):
    file = tmp_path / "templates.toml"
    file.write_text(f"templates = [{json.dumps(template)}]\n")
    with pytest.raises(SuiteError, match="needs exactly one"):
        load_prompts(str(file))


def test_a_plain_template_is_still_accepted(tmp_path):
    file = tmp_path / "templates.toml"
    file.write_text('templates = ["A recording of {}."]\n')
    assert load_prompts(str(file)).templates == ("A recording of {}.",)


# ---- benchmark sources: a distribution's CSV and JSON are a stranger's ----------------------------

def _esc50(root: Path, rows: list[list[object]]) -> Path:
    from benchmark_helpers import csv_text, write_tree

    columns = ["filename", "fold", "target", "category", "esc10", "src_file", "take"]
    return write_tree(root, {"meta/esc50.csv": csv_text(columns, rows)})


def test_a_csv_field_over_csvs_limit_is_one_source_error_not_a_traceback(tmp_path):
    from audio_dataset.source import SourceConfig, SourceError
    from pipelines.esc50 import ESC50

    root = _esc50(tmp_path / "esc", [["1-1-A-0.wav", 1, 0, "d" * 200_000, "False", "1", "A"]])
    with pytest.raises(SourceError, match="field larger than field limit"):
        list(ESC50(SourceConfig(input=str(root))).list_items())


def test_vggsound_rows_with_a_huge_field_or_a_superscript_start_are_source_errors():
    from audio_dataset.source import SourceError
    from pipelines.vggsound import parse_rows

    with pytest.raises(SourceError, match="field larger than field limit"):
        list(parse_rows("abc," + "1," + "d" * 200_000 + ",test\n"))
    with pytest.raises(SourceError, match="start_seconds"):  # "²".isdigit(), but int("²") raises
        list(parse_rows("abc,²,dog,test\n"))


def _fsd50k(root: Path, vocabulary: str, info: str) -> Path:
    from benchmark_helpers import csv_text, tone, write_tree

    return write_tree(root, {"FSD50K.ground_truth/vocabulary.csv": vocabulary,
                             "FSD50K.ground_truth/eval.csv": csv_text(["fname", "labels", "mids"], [[1, "Bark", "/m/x"]]),
                             "FSD50K.eval_audio/1.wav": tone(1),
                             "FSD50K.metadata/eval_clips_info_FSD50K.json": info})


@pytest.mark.parametrize("vocabulary, info, reason", [
    ("0,Bark,/m/x\n", "[" * 100_000 + "]" * 100_000, "is not JSON"),  # RecursionError before
    ("²,Bark,/m/x\n", "{}", "holds no `index,label,mid` rows"),  # ValueError from int() before
    ("0," + "B" * 200_000 + ",/m/x\n", "{}", "unreadable vocabulary.csv"),  # csv.Error before
])
def test_fsd50k_metadata_that_lies_is_one_source_error(tmp_path, vocabulary, info, reason):
    from audio_dataset.source import SourceConfig, SourceError
    from pipelines.fsd50k import FSD50K

    root = _fsd50k(tmp_path / "fsd", vocabulary, info)
    source = FSD50K(SourceConfig(input=str(root), options={"splits": "eval", "metadata": str(root)}))
    with pytest.raises(SourceError, match=reason):
        list(source.list_items())


def test_csv_rows_naming_paths_outside_the_distribution_fail_alone(tmp_path):
    """Held before this review: an absolute name, `..`, and a link leading out are each the item's
    `bad_file_name`; a fold that is not a number is its `bad_metadata`."""
    import os

    from audio_dataset.source import ItemError, SourceConfig
    from pipelines.esc50 import ESC50

    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"RIFF-secret")
    root = _esc50(tmp_path / "esc", [[name, 1, 0, "dog", "False", "1", "A"]
                                     for name in (str(secret), "../../secret.wav", "link.wav")]
                  + [["x.wav", "1e3", 0, "dog", "False", "1", "A"]])
    (root / "audio").mkdir()
    os.symlink(secret, root / "audio" / "link.wav")
    source = ESC50(SourceConfig(input=str(root)))
    *outside, odd = list(source.list_items())
    for item in outside:
        with pytest.raises(ItemError, match="bad_file_name"):
            source.fetch(item)
    assert odd.listing_error[0] == "bad_metadata"


# ---- audiodata caption: the LLM endpoint's answer is data ----------------------------------------

# A loopback endpoint in its own process: it answers 200 with the bearer token it was sent, inside a
# caption ("echo") or inside a body that is not JSON ("page", a proxy's error page).
ECHO_SERVER = textwrap.dedent('''
    import json, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            key = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if self.path.startswith("/echo"):
                body = json.dumps({"choices": [{"message": {"content": f"A dog barks near {key} loudly."}}]})
            else:
                body = f"<html>upstream error for token {key}</html>"
            data = body.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()
''')
KEY_ENV = "AUDIODATA_REVIEW5_LLM_KEY"
KEY = "sk-review5-9d41c7e2b05f4a83"


@pytest.fixture(scope="module")
def echo_server():
    process = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(process.stdout.readline())}"
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.parametrize("path", ["echo", "page"])
def test_an_endpoint_echoing_the_api_key_puts_it_in_no_caption_message_or_log(echo_server, path, monkeypatch,
                                                                                caplog):
    from audio_dataset.caption.types import WriteRequest
    from audio_dataset.caption.write import Decoding, WriterConfig, make_writer

    monkeypatch.setenv(KEY_ENV, KEY)
    writer = make_writer(WriterConfig(llm=None, url=f"{echo_server}/{path}/v1", model_name="m", api_key_env=KEY_ENV,
                                      timeout=10, retries=0, language=None, decoding=Decoding(max_new_tokens=8)))
    try:
        [candidates] = writer.write([WriteRequest("k", {"title": "a dog"})], 1, 0)
    finally:
        writer.close()
    recorded = json.dumps([[c.text, c.outcome, c.raw] for c in candidates]) + caplog.text
    assert candidates and KEY[:8] not in recorded and KEY[-8:] not in recorded
    assert candidates[0].outcome == ("ok" if path == "echo" else "llm_error")


# ---- audiodata caption: the chat template in a model folder is a stranger's Jinja -----------------

TURNS = ("{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    from audio_dataset.caption.tiny_llm import make_tiny_llm

    return make_tiny_llm(tmp_path_factory.mktemp("llm") / "llm")


def _template_writer(llm_folder: Path, folder: Path, template: str):
    import shutil

    from audio_dataset.caption.tiny_llm import build_tokenizer
    from audio_dataset.caption.write import Decoding, WriterConfig, make_writer

    shutil.copytree(llm_folder, folder)
    build_tokenizer(chat_template=template).save_pretrained(folder)
    return make_writer(WriterConfig(llm=str(folder), device="cpu", language=None, decoding=Decoding(max_new_tokens=2)))


@pytest.mark.usefixtures("one_torch_thread")
def test_a_template_that_raises_on_one_samples_data_fails_that_sample_alone(llm_folder, tmp_path):
    from audio_dataset.caption.types import WriteRequest

    template = ("{% for m in messages %}{% if 'TRIPWIRE' in m['content'] %}{{ raise_exception('no') }}{% endif %}"
                + TURNS)
    writer = _template_writer(llm_folder, tmp_path / "llm", template)
    bad, good = writer.write([WriteRequest("bad", {"title": "TRIPWIRE"}), WriteRequest("good", {"title": "a dog"})],
                             1, 0)
    assert [c.outcome for c in bad] == ["llm_error"] and "chat template failed" in bad[0].raw
    assert good and good[0].outcome != "llm_error"


@pytest.mark.usefixtures("one_torch_thread")
def test_a_template_reaching_for_python_is_stopped_by_the_sandbox(llm_folder, tmp_path):
    from audio_dataset.caption.types import WriteRequest

    mark = tmp_path / "RAN"
    template = ("{% for m in messages %}" + TURNS
                + "{{ cycler.__init__.__globals__['os'].system('touch " + str(mark) + "') }}")
    writer = _template_writer(llm_folder, tmp_path / "llm", template)
    [candidates] = writer.write([WriteRequest("k", {"title": "a dog"})], 1, 0)
    assert not mark.exists()
    assert [c.outcome for c in candidates] == ["llm_error"] and "SecurityError" in candidates[0].raw
