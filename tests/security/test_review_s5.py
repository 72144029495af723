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
