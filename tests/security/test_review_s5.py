"""Review 5: a stranger controls the data of `audiodata caption`, the benchmark sources and
`clap-eval --suite` (templates files, suite files, LLM endpoint answers, distribution CSVs/JSON).
Each test names the attack; the command must refuse in one line or fail only the item, never run,
leak or crash with a traceback."""
from __future__ import annotations

import json
import os
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

    from audio_dataset.source import UserError

    mark = tmp_path / "RAN"
    reach = "{{ cycler.__init__.__globals__['os'].system('touch " + str(mark) + "') }}"
    # On every conversation: the load-time test render refuses the model.
    with pytest.raises(UserError, match="chat_template.jinja.*SecurityError"):
        _template_writer(llm_folder, tmp_path / "always", "{% for m in messages %}" + TURNS + reach)
    # On one sample's data only: that sample fails.
    template = "{% for m in messages %}" + TURNS + "{% if 'REACH' in messages[-1]['content'] %}" + reach + "{% endif %}"
    writer = _template_writer(llm_folder, tmp_path / "llm", template)
    [candidates] = writer.write([WriteRequest("k", {"title": "REACH"})], 1, 0)
    assert not mark.exists()
    assert [c.outcome for c in candidates] == ["llm_error"] and "SecurityError" in candidates[0].raw


# ---- resuming a stage (caption's .caption/): run.json and parts are whatever lies in OUT ----------

def _finished_caption_run(tmp_path: Path) -> tuple[Path, Path, object, object]:
    """An input of one shard and an OUT whose only shard is already done (no worker starts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audio_dataset.caption.stage import CAPTION_SCHEMA
    from audio_dataset.shards import ShardWriter, write_sizes
    from audio_dataset.stage_runner import RunOptions, Stage, _check_resumable, find_jobs
    from audio_dataset.storage import location

    data, out = tmp_path / "data", tmp_path / "out"
    for shard in (data / "train" / "000000.tar", out / "train" / "000000.tar"):  # the input's, and the one done
        with ShardWriter(shard) as writer:
            writer.write({"__key__": "a", "json": b'{"text": ["a dog"]}', "flac": b"fLaC"})
    write_sizes(data / "train", {"000000.tar": 1})
    stage = Stage("caption", {"steps": ["write"]}, lambda device: None, CAPTION_SCHEMA)
    [job] = find_jobs(location(data), location(out), stage.name)
    row = {"split": "train", "shard": "000000.tar", "key": "a", "status": "no_caption"}
    Path(job.part).parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=CAPTION_SCHEMA), job.part)
    _check_resumable(location(out), stage, location(data), None)  # the run.json of the run that finished it
    return data, out, stage, RunOptions(input=data, out=out, progress=False)


@pytest.mark.parametrize("record", [{"stage": "caption"}, {"stage": "caption", "settings": ["steps"]}])
def test_a_tampered_run_json_is_one_line(tmp_path, record):
    from audio_dataset.source import UserError
    from audio_dataset.stage_runner import run_stage

    data, out, stage, options = _finished_caption_run(tmp_path)
    (out / ".caption" / "run.json").write_text(json.dumps(record))
    with pytest.raises(UserError, match="other settings"):
        run_stage(stage, options)


@pytest.mark.parametrize("part", [b"not parquet at all", "other schema", "two rows"])
def test_a_tampered_manifest_part_is_one_line_naming_it(tmp_path, part):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from audio_dataset.caption.stage import CAPTION_SCHEMA
    from audio_dataset.source import UserError
    from audio_dataset.stage_runner import run_stage

    data, out, stage, options = _finished_caption_run(tmp_path)
    path = out / ".caption" / "parts" / "train" / "000000.parquet"
    if isinstance(part, bytes):
        path.write_bytes(part)
    elif part == "other schema":
        pq.write_table(pa.table({"key": ["a"]}), path)
    else:
        row = {"split": "train", "shard": "000000.tar", "key": "a", "status": "no_caption"}
        pq.write_table(pa.Table.from_pylist([row, row], schema=CAPTION_SCHEMA), path)
    with pytest.raises(UserError, match="000000.parquet"):
        run_stage(stage, options)
    assert not (out / "caption_manifest.parquet").exists()


def test_an_untampered_finished_run_still_resumes(tmp_path):
    from audio_dataset.stage_runner import run_stage

    data, out, stage, options = _finished_caption_run(tmp_path)
    summary = run_stage(stage, options)
    assert (summary.shards, summary.resumed, summary.samples) == (1, 1, 1)


# ---- audiodata caption: a sample's JSON reaches the LLM only as the fields the prompt names --------

class _RecordingWriter:
    def __init__(self) -> None:
        self.requests: list = []

    def write(self, requests, num_captions, attempt):
        from audio_dataset.caption.types import OK, Candidate

        self.requests += requests
        return [[Candidate("A dog barks.", OK)] for _ in requests]


def test_only_title_tags_description_and_text_reach_the_prompt_however_big_the_json():
    from audio_dataset.caption.stage import CaptionOptions, CaptionProcessor, WriteStep
    from audio_dataset.caption.write import data_block
    from audio_dataset.stage_runner import ShardJob

    recorder = _RecordingWriter()
    meta = {"text": ["a dog barking"], "url": "https://example.org/user/jane-doe/secret-upload",
            "original_data": {"title": "dog", "uploader": "Jane Doe", **{f"k{i}": ["x" * 2000] * 50 for i in range(50)}},
            **{f"junk{i}": {f"k{j}": "y" * 2000 for j in range(50)} for i in range(40)}}
    processor = CaptionProcessor(CaptionOptions(steps=("write",), write=WriteStep(lambda device: recorder, {})),
                                 None, None, "cpu")
    sample = {"__key__": "k", "json": json.dumps(meta).encode(), "flac": b""}
    processor.process(ShardJob("train", "000000.tar", "", "", ""), [sample])
    [request] = recorder.requests
    assert set(request.metadata) <= {"title", "tags", "description", "text"}
    assert request.metadata["title"] == "dog" and request.metadata["text"] == ["a dog barking"]
    assert "Jane Doe" not in data_block(request) and len(data_block(request)) < 20_000


# ---- clap-eval --results FILE: a stranger's results.json printed as a table ------------------------

def test_a_results_file_cannot_drive_the_terminal(tmp_path):
    from clap_model.suite_results import FORMAT, TABLES, read_results

    evil = "esc50\x1b]0;pwned\x07\x1b[2J\u202eevil"
    document = {"format": FORMAT, "suite": {"name": evil}, "checkpoint": {"name": evil, "sha256": evil},
                "tasks": [{"name": evil, "metrics": {"accuracy": 0.5}, "protocol": {"metrics": ["accuracy"],
                                                                                    "dataset": evil},
                           "published": {"accuracy": {"value": 0.9, "source": evil}}}],
                "skipped": [{"task": evil, "reason": evil}]}
    file = tmp_path / "results.json"
    file.write_text(json.dumps(document))
    for name, table in TABLES.items():
        shown = table(read_results(str(file)))
        assert "esc50" in shown and not any(c in shown for c in "\x1b\x07\u202e"), name


# ---- audiodata caption: a model folder's config.json is data -------------------------------------

@pytest.mark.parametrize("config", [
    {"hidden_size": "abc"},  # huggingface_hub's StrictDataclassFieldValidationError
    {"hidden_size": -4},  # torch's RuntimeError from a negative dimension
    [1, 2],  # TypeError: not a mapping
    '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError
])
@pytest.mark.usefixtures("one_torch_thread")
def test_a_model_folder_whose_config_makes_transformers_raise_is_one_line(llm_folder, tmp_path, config):
    import shutil

    from audio_dataset.caption.write import Decoding, WriterConfig, make_writer
    from audio_dataset.source import UserError

    folder = tmp_path / "llm"
    shutil.copytree(llm_folder, folder)
    if isinstance(config, dict):
        config = {**json.loads((folder / "config.json").read_text()), **config}
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    with pytest.raises(UserError, match="cannot load --llm"):
        make_writer(WriterConfig(llm=str(folder), device="cpu", decoding=Decoding(max_new_tokens=2)))


def test_an_alm_folder_whose_config_nests_past_the_recursion_limit_is_one_line(tmp_path):
    from audio_dataset.caption.listen import model_type
    from audio_dataset.k2c.models import ResolvedModel
    from audio_dataset.source import UserError

    (tmp_path / "config.json").write_text('{"model_type": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(UserError, match="no readable config.json"):
        model_type(ResolvedModel(spec=str(tmp_path), path=str(tmp_path), revision=None))


@pytest.fixture(scope="module")
def alm_folder(tmp_path_factory):
    from audio_dataset.caption.tiny_alm import make_tiny_alm

    return make_tiny_alm(tmp_path_factory.mktemp("alm") / "alm")


@pytest.mark.parametrize("extractor", [{"sampling_rate": "abc"}, {"sampling_rate": 0, "chunk_length": 0},
                                       {"chunk_length": 1e-9}])  # millions of windows a clip
@pytest.mark.usefixtures("one_torch_thread")
def test_an_alm_folder_whose_feature_extractor_lies_is_one_line(alm_folder, tmp_path, extractor):
    import shutil

    from audio_dataset.caption.listen import ListenOptions, make_listener, resolve_alm
    from audio_dataset.source import UserError

    folder = tmp_path / "alm"
    shutil.copytree(alm_folder, folder)
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "feature_extractor": {**config["feature_extractor"], **extractor}}))
    options = ListenOptions(model=str(folder), max_new_tokens=2, batch_size=1)
    with pytest.raises(UserError, match="alm-model"):
        make_listener(options, *resolve_alm(options), "cpu")


@pytest.mark.parametrize("nesting", ["[" * 5000 + "]" * 5000, "{a=" * 5000 + "1" + "}" * 5000])
def test_a_suite_or_templates_file_nested_past_the_recursion_limit_is_one_line(tmp_path, nesting):
    from clap_model.suites import load_suite

    file = tmp_path / "deep.toml"
    file.write_text(f"x = {nesting}\n")  # 10 KB, well under the size cap; tomllib recurses per level
    for load in (load_suite, load_prompts):
        with pytest.raises(SuiteError, match="not valid TOML"):
            load(str(file))


# ---- audiodata caption: cleaning an endpoint's answer costs time linear in its size ----------------

def test_cleaning_a_hostile_8_mib_answer_takes_seconds_not_days():
    """` *a` repeated: each `*` sent _EMPHASIS scanning to the end of the line (30 KB took 29 s
    before; an endpoint may send 8 MiB). Run in a child so a regression fails on time, not hangs."""
    code = textwrap.dedent('''
        from audio_dataset.caption.clean import clean_answer
        raw = " *a" * ((8 << 20) // 3)
        for n in (1, 3):
            candidates = clean_answer(raw, n, None, 1000)
            assert len(candidates) == n and len(candidates[0].text) <= 1000
        many = clean_answer("1. a dog barks\\n" * 500_000, 3, None, 1000)
        assert [c.outcome for c in many] == ["ok", "empty", "empty"]
    ''')
    root = str(Path(__file__).resolve().parents[2])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr[-500:]
