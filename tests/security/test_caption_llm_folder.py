"""A `--llm` model folder is data: code it names (`auto_map` pointing at a module beside its
weights, as trust_remote_code models do) is never imported, by the model or by the tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from audio_dataset.caption.tiny_llm import make_tiny_llm
from audio_dataset.caption.write import Decoding, WriterConfig, make_writer
from audio_dataset.source import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# transformers would copy the module into its cache before importing it: the mark goes to a fixed path.
PLANTED = '''
from pathlib import Path
Path({mark!r}).write_text("the folder's code ran")
raise SystemExit("planted code ran")
'''


def _plant(folder: Path, mark: Path) -> None:
    (folder / "evil.py").write_text(PLANTED.format(mark=str(mark)))
    for name, key in (("config.json", "AutoModelForCausalLM"), ("tokenizer_config.json", "AutoTokenizer")):
        data = json.loads((folder / name).read_text())
        value = ["evil.EvilTokenizer", None] if key == "AutoTokenizer" else "evil.EvilModel"
        data["auto_map"] = {key: value}
        (folder / name).write_text(json.dumps(data))


def test_code_in_a_model_folder_never_runs(tmp_path):
    folder, mark = make_tiny_llm(tmp_path / "llm"), tmp_path / "RAN"
    _plant(folder, mark)
    try:
        writer = make_writer(WriterConfig(llm=str(folder), device="cpu", decoding=Decoding(max_new_tokens=2)))
    except UserError as exc:  # refusing the folder is fine too; running its code is not
        assert "cannot load --llm" in str(exc)
    else:
        assert type(writer.model).__module__.startswith("transformers.")
    assert not mark.exists()
