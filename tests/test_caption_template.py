"""A model folder's chat template is a stranger's Jinja: it renders within a time and a size bound,
and one that fails, loops or balloons on a test conversation refuses the model in one line (exit 2,
as any other bad model folder) within seconds, through `audiodata caption`."""
from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from audio_dataset.caption.template_guard import MAX_PROMPT_CHARS, RENDER_SECONDS, TemplateLimit, bounded
from audio_dataset.cli import main
from test_k2c import _sample, _write_input  # tests/ is on sys.path

pytestmark = pytest.mark.usefixtures("ray_local", "one_torch_thread")

# Ten billion loop turns: hours, had nothing bounded it (the sandbox caps each range at 100,000).
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUNDRED_MB = "{{ 'x' * 100000000 }}"
# The sandbox refuses this range at once; the test render turns that into the same refusal.
HUGE_RANGE = "{% for i in range(10**9) %}x{% endfor %}"
# One operation in C, between two trace events: hours of CPU (jinja folds the constant at compile time).
HUGE_POWER = "{{ 7**(10**9) % 3 }}"


@pytest.fixture(autouse=True, scope="module")
def jinja_loaded():
    """transformers' chat-template code and jinja imported and the guard installed before any
    traced render, as the steps do when a model loads (`precompile`)."""
    from audio_dataset.caption.template_guard import precompile

    precompile("{{ messages|length }}")


def _render(template: str) -> str:
    from transformers.utils.chat_template_utils import render_jinja_template

    return render_jinja_template([[{"role": "user", "content": "hi"}]], chat_template=template,
                                 add_generation_prompt=True)[0][0]


def test_bounded_stops_a_loop_at_its_deadline_and_restores_the_tracer():
    def tracer(frame, event, arg):
        return None

    sys.settrace(tracer)
    try:
        start = time.monotonic()
        with pytest.raises(TemplateLimit, match="took over 0.5 s"):
            bounded(lambda: _render(LOOPS), seconds=0.5)
        assert time.monotonic() - start < 5
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


@pytest.mark.parametrize("template", [
    HUNDRED_MB,
    "{% for i in range(100000) %}{{ range(100000)|join }}{% endfor %}",  # stopped as it is written out
    "{% set s = 'x' * 10**8 %}{% set t = s ~ s %}ok",  # held in a variable, never written
])
def test_bounded_stops_a_template_that_builds_too_much(template):
    with pytest.raises(TemplateLimit, match=f"more than {MAX_PROMPT_CHARS:,} characters"):
        bounded(lambda: _render(template))


@pytest.mark.timeout(60)  # unchecked, each computes or allocates in one C call, never seeing the trace
@pytest.mark.parametrize("template, reason", [
    (HUGE_POWER, "made a number of more than"),
    ("{% set n = 7 %}{{ n**(10**9) % 3 }}", "made a number of more than"),
    ("{% set ns = namespace(x=3) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x % 7 }}",
     "made a number of more than"),
    ("{{ 'x' * 10**11 }}", "built more than"),
    ("{% set n = 10**11 %}{{ (range(10)|list) * n }}", "built more than"),
])
def test_one_operation_in_c_is_checked_before_it_runs(template, reason):
    from audio_dataset.caption.template_guard import precompile

    start = time.monotonic()
    with pytest.raises(TemplateLimit, match=reason):
        precompile(template)
        bounded(lambda: _render(template))
    assert time.monotonic() - start < 5
    precompile("{{ 2**10 }} {{ 'ab' * 3 }} {{ 3 * 'c' }} {{ 2.5 ** 2 }} {{ [1] * 2 }}")
    assert bounded(lambda: _render("{{ 2**10 }} {{ 'ab' * 3 }} {{ 3 * 'c' }} {{ 2.5 ** 2 }} {{ [1] * 2 }}")) \
        == "1024 ababab ccc 6.25 [1, 1]"


@pytest.mark.parametrize("template", [
    "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "{% set ns = namespace(l=[0]) %}{% for i in range(40) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
    "{% macro f(l, n) %}{{ f(l + l, n + 1) if n < 40 }}{% endmacro %}{{ f([0], 0) }}",
])
def test_bounded_stops_a_value_doubling_out_of_sight_of_the_locals(template):
    """In a namespace or a list, a value doubled each turn: 2**40 characters, tens of gigabytes
    within the deadline (each turn is a line the trace sees; the size check read only str locals)."""
    import resource

    from audio_dataset.caption.template_guard import precompile

    precompile(template)  # as the steps do: the render alone is timed
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()  # torch maps gigabytes
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 4 * 2**30, hard))  # unchecked, a MemoryError, not swap
    try:
        with pytest.raises(TemplateLimit, match=f"more than {MAX_PROMPT_CHARS:,} characters"):
            bounded(lambda: _render(template))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_bounded_passes_a_chat_template_through():
    from audio_dataset.caption.tiny_llm import CHATML_TEMPLATE

    assert bounded(lambda: _render(CHATML_TEMPLATE)) == _render(CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory) -> Path:
    return _write_input(tmp_path_factory.mktemp("template_in"),
                        {"train": [[_sample("456440__inspectorj__bird-whistling-robin-single-13", 2.0)]]})


def _with_template(source: Path, folder: Path, template: str) -> Path:
    shutil.copytree(source, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def _caption(one_clip: Path, out: Path, *args: str) -> int:
    return main(["caption", str(one_clip), "--out", str(out), *args, "--alm-max-new-tokens", "2",
                 "--max-new-tokens", "4", "--workers", "1", "--threads", "1", "--no-progress"])


@pytest.mark.timeout(120)  # unbounded, the first would render for hours
@pytest.mark.parametrize("template, reason", [
    (LOOPS, f"took over {RENDER_SECONDS:g} s"),
    (HUNDRED_MB, f"built more than {MAX_PROMPT_CHARS:,} characters"),
    (HUGE_RANGE, "OverflowError: Range too big"),
    (HUGE_POWER, "made a number of more than 1,000,000 bits"),
])
def test_an_llm_whose_template_hangs_or_balloons_is_refused_in_one_line(one_clip, caption_models, tmp_path,
                                                                        capsys, template, reason):
    folder = _with_template(caption_models["llm"], tmp_path / "llm", template)
    start = time.monotonic()
    assert _caption(one_clip, tmp_path / "out", "--steps", "write", "--llm", str(folder)) == 2
    assert time.monotonic() - start < 60  # the worker's start and the tokenizer's load included
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--llm {folder}: its chat template ({folder / 'chat_template.jinja'}) failed a test render: " \
        in err and reason in err, err


@pytest.mark.timeout(120)
def test_an_alm_whose_template_hangs_is_refused_in_one_line(one_clip, caption_models, tmp_path, capsys):
    folder = _with_template(caption_models["alm"], tmp_path / "alm", LOOPS)
    start = time.monotonic()
    assert _caption(one_clip, tmp_path / "out", "--steps", "listen", "--alm-model", str(folder)) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"--alm-model {folder}: its chat template ({folder / 'chat_template.jinja'})" in err, err
    assert f"failed a test render: took over {RENDER_SECONDS:g} s" in err, err


def test_the_tiny_models_still_caption_through_the_guard(one_clip, caption_models, tmp_path):
    out = tmp_path / "out"
    assert _caption(one_clip, out, "--steps", "listen,write", "--alm-model", str(caption_models["alm"]),
                    "--llm", str(caption_models["llm"])) == 0
    [row] = pq.read_table(out / "caption_manifest.parquet").to_pylist()
    assert row["status"] in ("captioned", "no_caption") and row["candidates"], row


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["one_sample", "every_sample"])
def test_a_template_that_hangs_on_one_samples_data_fails_that_sample_alone(caption_models, tmp_path, where):
    """The test render passes; the sample whose data trips the loop is llm_error, the other is written."""
    from audio_dataset.caption.types import WriteRequest
    from audio_dataset.caption.write import Decoding, WriterConfig, make_writer
    from audio_dataset.source import UserError

    trip = "{% if 'TRIPWIRE' in messages[-1]['content'] %}" + LOOPS + "{% endif %}" if where == "one_sample" else LOOPS
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}" + trip + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    folder = _with_template(caption_models["llm"], tmp_path / "llm", template)
    config = WriterConfig(llm=str(folder), device="cpu", language=None, decoding=Decoding(max_new_tokens=2))
    if where == "every_sample":
        with pytest.raises(UserError, match="took over"):
            make_writer(config)
        return
    bad, good = make_writer(config).write([WriteRequest("bad", {"title": "TRIPWIRE"}),
                                           WriteRequest("good", {"title": "a dog"})], 1, 0)
    assert [c.outcome for c in bad] == ["llm_error"] and "TemplateLimit: took over" in bad[0].raw
    assert good and good[0].outcome != "llm_error"


def _long_template(blocks: int) -> str:
    """A legitimate template, long: `blocks` branches on the role, then ChatML."""
    from audio_dataset.caption.tiny_llm import CHATML_TEMPLATE

    return "".join(f"{{% if messages[0]['role'] == 'r{i}' %}}{i}{{% endif %}}" for i in range(blocks)) + CHATML_TEMPLATE


def test_compiling_happens_outside_the_deadline():
    """Traced, jinja's compiler would spend the render's deadline on a long template; compiled first
    (as the steps do when the model loads), the render alone is timed."""
    from audio_dataset.caption.template_guard import precompile

    template = _long_template(600)
    with pytest.raises(TemplateLimit, match="took over"):
        bounded(lambda: _render(template), seconds=0.2)  # compiling inside the trace
    precompile(template)
    assert bounded(lambda: _render(template), seconds=0.2).endswith("<|im_start|>assistant\n")


def test_a_template_past_its_length_cap_is_refused_before_compiling(caption_models, tmp_path):
    from audio_dataset.caption.template_guard import MAX_TEMPLATE_CHARS
    from audio_dataset.caption.write import Decoding, WriterConfig, make_writer
    from audio_dataset.source import UserError

    template = "{# " + "x" * MAX_TEMPLATE_CHARS + " #}" + _long_template(0)
    folder = _with_template(caption_models["llm"], tmp_path / "llm", template)
    with pytest.raises(UserError, match=f"chat_template.jinja\\) failed a test render: is {len(template):,} characters"):
        make_writer(WriterConfig(llm=str(folder), device="cpu", decoding=Decoding(max_new_tokens=2)))


S = "{% set s = 'x' * 900000 %}"  # within the bound: each call below would build far past it in one C call


@pytest.mark.timeout(60)
@pytest.mark.parametrize("template", [
    "{{ 'x'|center(10**10) }}", "{{ 'x'.center(10**10) }}", "{{ 'x'.ljust(10**10) }}", "{{ '7'.zfill(10**10) }}",
    "{{ 'a\nb'|indent(10**10) }}", S + "{{ ([s] * 10**4)|join }}", S + "{{ ''.join([s] * 10**4) }}",
    S + "{{ ([s] * 10**4)|join(',') }}", S + "{{ s|replace('x', s) }}", S + "{{ s.replace('', 'yy') }}",
    "{{ '%9999999999d' % 1 }}", "{{ '%*d' % (10**10, 1) }}", "{{ '{:>9999999999}'.format(1) }}",
    "{{ '%9999999999d'|format(1) }}",
])
def test_a_call_that_would_build_past_the_bound_is_refused_before_it_runs(template):
    """Each of these allocates gigabytes in one C call from arguments within the bound: refused
    before the call, in well under the deadline, with no such allocation."""
    _refused_before_it_runs(template)


def _refused_before_it_runs(template: str) -> None:
    """The template refused (TemplateLimit) within the deadline, under a 2 GB address-space limit
    (unchecked, its call is a MemoryError, not swap)."""
    import resource

    from audio_dataset.caption.template_guard import precompile

    precompile(template)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 2 * 2**30, hard))
    try:
        start = time.monotonic()
        with pytest.raises(TemplateLimit, match="more than"):
            bounded(lambda: _render(template))
        assert time.monotonic() - start < RENDER_SECONDS
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_calls_within_the_bound_render_as_before():
    from audio_dataset.caption.template_guard import precompile

    template = ("{{ 'ab'|center(6) }}|{{ 'x'.ljust(3) }}|{{ ['a', 'b']|join(',') }}|{{ '-'.join(['c', 'd']) }}|"
                "{{ 'aXb'|replace('X', 'yy') }}|{{ '%03d' % 7 }}|{{ '{:>4}'.format(5) }}|{{ '%s-%s'|format(1, 2) }}|"
                "{{ 'a\nb'|indent(2) }}|{{ messages|length }}")
    precompile(template)
    assert bounded(lambda: _render(template)) == "  ab  |x  |a,b|c-d|ayyb|007|   5|1-2|a\n  b|1"


def test_a_limit_caught_and_wrapped_on_its_way_out_is_still_the_limit():
    """The deadline can fire inside code that catches any exception and raises its own (jinja's
    lexer turns it into TemplateSyntaxError "took over 0.2 s" when compiling is traced): the
    caller still gets the TemplateLimit."""
    source = ("def render():\n    try:\n        while True:\n            pass\n"
              "    except Exception as exc:\n        raise ValueError(\"jinja's own error\") from exc\n")
    scope: dict = {}
    exec(compile(source, "<template>", "exec"), scope)  # as jinja compiles a template: its code's name
    render = scope["render"]

    with pytest.raises(TemplateLimit, match="took over 0.1 s"):
        bounded(render, seconds=0.1)
    with pytest.raises(ValueError, match="no limit here"):  # an error of its own passes as it is
        bounded(lambda: (_ for _ in ()).throw(ValueError("no limit here")))


DAG = "{% set ns = namespace(l=[1], t=(1,)) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}" \
      "{% set ns.t = (ns.t, ns.t) %}{% endfor %}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("template", [
    "{{ 'x'.encode() * 10**10 }}", "{{ 'x'.encode().ljust(10**10) }}", "{{ (1).to_bytes(10**10, 'big') }}",
    "{{ [1]|tojson(indent=10**10) }}",  # transformers' own tojson, set after the environment is made
    "{{ '{:{}}'.format(1, '9999999999') }}", "{{ '{a:{w}}'.format_map({'a': 1, 'w': 10**10}) }}",
    "{{ ('%999999s' * 3000) % ((1,) * 3000) }}",
    "{{ ('\t' * 1000000).expandtabs(1000000) }}", S + "{{ s.translate({120: s}) }}",
    S + "{{ ('a\n' * 400000)|indent(s, blank=true) }}",
    S + "{{ [s] * 10000 }}", S + "{{ ([s] * 10000)|tojson|length }}",  # the list is short, its text is not
    DAG + "{{ ns.l }}", DAG + "{{ [ns.t]|unique|list|length }}",  # 2**40 leaves: a repr or a hash for hours
    "{% set l = [0] * 1000000 %}{{ ([l] * 1000)|sum(start=[])|length }}",
])
def test_more_calls_that_would_build_past_the_bound_are_refused_before_they_run(template):
    """Bytes, an int's to_bytes, a filter transformers adds, a nested or repeated width, a tab
    size or a translation times the text, a container whose text or tree is huge though its len is
    small: each one C call of gigabytes or hours, refused before it runs."""
    _refused_before_it_runs(template)


CONCAT = S + "{{ " + " ~ ".join(["s"] * 3000) + " }}"  # one C join of 3 GB from 3000 operands in bounds


@pytest.mark.timeout(120)
@pytest.mark.parametrize("template", [
    CONCAT,
    "{{ range(5000)|map('string')|map('center', 999999)|list|length }}",  # many calls, each within bounds
    "{% set l = [" + ", ".join(["'x' * 999999"] * 3000) + "] %}{{ l|length }}",  # a literal of fresh strings
])
def test_memory_built_a_bound_at_a_time_is_refused_before_it_adds_up(template):
    """A `~` chain of thousands of operands (one C join), a filter over a long sequence whose items
    are each within the bound, a list literal of thousands of fresh strings: each within bounds per
    operation and gigabytes together. The guard counts what a render makes in all, and a join's
    operands before it joins them."""
    _refused_before_it_runs(template)


QWEN2 = """{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}\
{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- "\\n\\n# Tools\\n\\n<tools>" }}{%- for tool in tools %}\
{{- "\\n" }}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}{%- else %}\
{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\
{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}\
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}\
{%- if ns.multi_step_tool and message.role == "user" %}{%- set ns.multi_step_tool = false %}\
{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}\
{%- for message in messages %}{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\
{%- elif message.role == "assistant" %}{{- '<|im_start|>' + message.role + '\\n' + message.content }}\
{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}{%- if tool_call.function %}\
{%- set tool_call = tool_call.function %}{%- endif %}{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}\
{{- '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{%- endif %}\
{{- '<|im_end|>\\n' }}{%- elif message.role == "tool" %}{{- '<|im_start|>user\\n<tool_response>\\n' }}\
{{- message.content }}{{- '\\n</tool_response><|im_end|>\\n' }}{%- endif %}{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
LLAMA3 = """{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}\
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}\
{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}\
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{{- "Today Date: " + date_string + "\\n\\n" }}\
{%- if tools is not none %}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}{%- endif %}\
{{- system_message }}{{- "<|eot_id|>" }}{%- for message in messages %}\
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\
{%- elif 'tool_calls' in message %}{%- set tool_call = message.tool_calls[0].function %}\
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{{- '{"name": "' + tool_call.name + '", ' }}\
{{- '"parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}" }}{{- "<|eot_id|>" }}\
{%- else %}{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}{{- message.content | tojson }}\
{{- "<|eot_id|>" }}{%- endif %}{%- endfor %}\
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
MISTRAL = """{{- bos_token }}{%- for message in messages %}\
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}\
{%- if message['role'] == 'user' %}{{- '[INST] ' + message['content'] + ' [/INST]' }}\
{%- elif message['role'] == 'assistant' %}{{- message['content'] + eos_token }}\
{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}{%- endfor %}"""
GEMMA = """{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}\
{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}\
{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim \
+ '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}\
{{ '%s|%d|%5.2f'|format('a', 1700000000, 2.5) }}{{ '%d-%s' % (1700000000, 'x') }}\
{{ '{}/{:,}'.format(1700000000, 1234567) }}{{ ' ab '|center(8) }}{{ 'a\tb'.expandtabs(4) }}{{ [1, [2, 3]] }}"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "qwen2": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Oslo?"},
              {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
                  "name": "get_weather", "arguments": {"city": "Oslo"}}}]},
              {"role": "tool", "content": "{\"t\": 3}"}, {"role": "user", "content": "Thanks " + "y" * 5000}],
}


@pytest.mark.parametrize("name, template", [("qwen2", QWEN2), ("llama3", LLAMA3), ("mistral", MISTRAL),
                                            ("gemma", GEMMA)])
def test_real_chat_templates_render_as_unguarded(name, template):
    """Qwen2 (tools, namespace, tojson), Llama 3.1 (tojson with indent), Mistral (raise_exception,
    loop.index0), Gemma (trim; plus %, format and format's filter with values past a million): the
    guarded render equals transformers' own, unguarded."""
    import jinja2.sandbox
    from transformers.utils import chat_template_utils

    from audio_dataset.caption.template_guard import precompile

    messages = CONVERSATIONS.get(name, [{"role": "user", "content": "Describe the sound " + "z" * 3000},
                                        {"role": "assistant", "content": "A dog."}, {"role": "user", "content": "ok"}])
    kwargs = dict(add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    guarded = chat_template_utils.ImmutableSandboxedEnvironment
    chat_template_utils.ImmutableSandboxedEnvironment = jinja2.sandbox.ImmutableSandboxedEnvironment
    try:
        plain = chat_template_utils._cached_compile_jinja_template(template)
    finally:
        chat_template_utils.ImmutableSandboxedEnvironment = guarded
    expected = plain.render(messages=messages, tools=TOOLS, **kwargs)
    precompile(template)
    compiled = chat_template_utils._compile_jinja_template(template)
    assert compiled.environment.__class__.__name__ == "_Guarded"
    assert bounded(lambda: compiled.render(messages=messages, tools=TOOLS, **kwargs)) == expected
    if name == "mistral":  # raise_exception still raises its own error through the guard
        import jinja2

        with pytest.raises(jinja2.TemplateError, match="must alternate"):
            bounded(lambda: compiled.render(messages=messages[1:], **kwargs))
