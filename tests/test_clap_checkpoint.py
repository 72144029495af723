"""Checkpoint files as the field has them: LAION-CLAP's releases (pickle protocol 4, NumPy scalars
under NumPy 1's module names), legacy and zip torch formats, files that would run code, and
release files used with no network."""
from __future__ import annotations

import builtins
import os
import pickle
import socket
import sys
import time
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clap_model import checkpoint as ckpt
from clap_model import main as clap_main
from clap_model.clap import CLAP
from clap_model.config import RunFailure, TextConfig, UsageError, get_preset
from clap_model.inference import CLAPInference
from clap_model.text import build_text_model, known_text_config
from test_clap_data import build_clap_shards  # tests/ is on sys.path (rootdir-less prepend import)

ROOT = Path(__file__).parent.parent
REAL_AUDIO = ROOT / "tests" / "data" / "real-audio"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- files written as LAION-CLAP's training wrote them --------------------------------------------


def _numpy1_scalar(*args):  # stands in for numpy.core.multiarray.scalar while pickling only
    raise AssertionError("never called")


_numpy1_scalar.__module__, _numpy1_scalar.__qualname__ = "numpy.core.multiarray", "scalar"


class _Numpy1Pickler(pickle.Pickler):
    """Writes NumPy scalars as NumPy 1.x does (`numpy.core.multiarray.scalar`); the NumPy 2 here
    would write `numpy._core`."""

    def reducer_override(self, obj):
        if isinstance(obj, np.generic):
            return _numpy1_scalar, (obj.dtype, obj.tobytes())
        return NotImplemented


NUMPY1_PICKLE = types.SimpleNamespace(__name__="numpy1_pickle", Pickler=_Numpy1Pickler, dump=pickle.dump)


@pytest.fixture
def numpy1_names(monkeypatch):
    """pickle checks that a global's name finds the object: let `numpy.core.multiarray.scalar`
    find the stand-in while a test writes its file."""
    fake = types.ModuleType("numpy.core.multiarray")
    fake.scalar = _numpy1_scalar
    monkeypatch.setitem(sys.modules, "numpy.core.multiarray", fake)


def _pickle_bytes(path: Path) -> bytes:
    """The pickle a torch file holds: data.pkl of a zip, the whole file of the legacy format."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    return path.read_bytes()


def _optimizer_state(model: torch.nn.Module) -> dict:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    state = optimizer.state_dict()
    # LAION-CLAP's warm-up/cosine scheduler sets the learning rate to a NumPy float64.
    state["param_groups"][0]["lr"] = np.float64(7.5e-5)
    return state


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_release_files_load_for_every_protocol_and_format(tmp_path, numpy1_names, protocol, zipped):
    model = torch.nn.Linear(3, 2)
    state = {"epoch": 45, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
             "optimizer": _optimizer_state(model), "best": np.float32(0.25), "dtype": np.dtype("float64"),
             "steps": np.arange(3)}
    path = tmp_path / "release.pt"
    torch.save(state, path, pickle_module=NUMPY1_PICKLE, pickle_protocol=protocol,
               _use_new_zipfile_serialization=zipped)
    raw = _pickle_bytes(path)
    assert raw[:2] == bytes([0x80, protocol])
    assert b"numpy.core.multiarray" in raw  # the scalars' NumPy 1 name

    loaded = ckpt.read(path)
    lr = loaded["optimizer"]["param_groups"][0]["lr"]
    assert type(lr) is np.float64 and lr == 7.5e-5
    assert type(loaded["best"]) is np.float32 and loaded["best"] == 0.25
    assert loaded["dtype"] == np.dtype("float64") and loaded["steps"].tolist() == [0, 1, 2]
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    target = torch.nn.Linear(3, 2)
    target.load_state_dict({k[len("module."):]: v for k, v in loaded["state_dict"].items()})
    assert torch.equal(target.weight, model.weight)


class _Payload:
    def __init__(self, call, *args) -> None:
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_files_that_would_run_code_are_refused_and_nothing_runs(tmp_path, kind, zipped):
    marker = tmp_path / "ran"
    if kind == "os.system":
        payload, first = _Payload(os.system, f"touch {marker}"), f"{os.system.__module__}.system"
    else:
        payload, first = _Payload(builtins.eval, f"open({str(marker)!r}, 'w').close()"), "builtins.eval"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": torch.nn.Linear(2, 2).state_dict(), "epoch": payload}, path, pickle_protocol=4,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.read(path)
    message = str(caught.value)
    assert f"(the first: {first}); refused" in message and "\n" not in message
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit itself is deprecated
def test_a_torchscript_archive_is_no_checkpoint(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    with pytest.raises(ckpt.CheckpointError, match="TorchScript archive"):
        ckpt.read(path)


# ---- offline: text towers from known configs, audio from a release file ----------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: what runs here must need no network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network used: {args[1:] or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name, model_type, vocab, layers", [
    ("roberta-base", "roberta", 50265, 12), ("bert-base-uncased", "bert", 30522, 12), ("gpt2", "gpt2", 50257, 12),
])
def test_known_text_towers_build_offline(no_network, name, model_type, vocab, layers):
    config = known_text_config(name)
    assert config.model_type == model_type and config.vocab_size == vocab and config.num_hidden_layers == layers
    assert config.hidden_size == 768
    with torch.device("meta"):
        tower = build_text_model(TextConfig(name_or_path=name, model_type=model_type), pretrained=False)
    assert tower.config.model_type == model_type
    embeddings = tower.get_input_embeddings().weight
    assert tuple(embeddings.shape) == (vocab, 768)
    assert known_text_config("someone/unknown-model") is None


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Iterator[tuple[Path, CLAP]]:
    """htsat-tiny-roberta in LAION-CLAP's release layout, random weights: DDP's `module.` prefix,
    the obsolete position_ids buffer, an optimizer-like dict holding a NumPy float64, protocol 4."""
    torch.manual_seed(0)
    source = CLAP(get_preset("htsat-tiny-roberta"), pretrained_text=False).eval()
    # Each text weight is saved as one value repeated (stride 0): the tower's 125M numbers would
    # cost 500 MB of disk, and the audio embedding does not read them.
    state = {f"module.{k}": v.flatten()[:1].clone().expand_as(v) if k.startswith("text_branch.") else v
             for k, v in source.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514)[None]
    path = tmp_path_factory.mktemp("release") / "630k-audioset-best.pt"
    torch.save({"epoch": 45, "state_dict": state, "optimizer": {"param_groups": [{"lr": np.float64(1e-4)}]}},
               path, pickle_protocol=4)
    yield path, source
    path.unlink()  # 130 MB: not left in the temp folder


def test_a_release_file_embeds_audio_with_no_network(release, no_network):
    """The audio path needs neither tokenizer nor hub: the text tower is built from its known config."""
    path, source = release
    clips = sorted(REAL_AUDIO.glob("*.ogg"))[:1]  # a real recording
    embedding = CLAPInference.from_checkpoint(path, model="htsat-tiny-roberta", device="cpu").embed_audio(clips)
    expected = CLAPInference(source, device="cpu").embed_audio(clips)
    assert embedding.shape == (1, 512)
    assert torch.allclose(embedding, expected, atol=1e-6)


def test_a_release_file_embeds_text_with_a_local_text_model_folder(release, tmp_path, no_network):
    """`--text-model PATH` (a folder with the tower's config and tokenizer) is all text needs offline."""
    from clap_model.text import byte_tokenizer

    folder = tmp_path / "roberta-base"
    known_text_config("roberta-base").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)  # stands in for roberta-base's BPE: ids within its vocabulary
    clap = CLAPInference.from_checkpoint(release[0], model="htsat-tiny-roberta", text_model=str(folder), device="cpu")
    text = clap.embed_text(["a dog barks", "rain on a roof"])
    assert text.shape == (2, 512) and torch.isfinite(text).all()
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_clap_eval_of_a_release_without_its_tokenizer_is_one_line(release, tmp_path, capsys, monkeypatch):
    """Evaluation needs text: with the hub offline (as in every test) and an empty cache, one line
    names the way out, before the model is built."""
    from huggingface_hub import constants

    from clap_model import evaluate as clap_eval

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    shards = tmp_path / "shards"
    shards.mkdir()
    build_clap_shards(shards, clips=2, seconds=1.0, per_shard=2, augment=False)
    code = clap_eval.main(["--checkpoint", str(release[0]), "--model", "htsat-tiny-roberta",
                           "--val-data", str(shards), "--workers", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err  # the hub, not the command line: a run failure
    assert "'roberta-base' is not in the Hugging Face cache and the hub is offline" in err[0]
    assert "--text-model PATH" in err[0]


def test_clap_train_reads_pretrained_before_the_hub(tmp_path, capsys, no_network):
    """`--pretrained FILE`: a file that cannot load is the error, before any tokenizer or download."""
    shards = tmp_path / "shards"
    shards.mkdir()
    build_clap_shards(shards, clips=4, seconds=1.0, per_shard=4, augment=False)
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "x": _Payload(os.system, "true")}, evil, pickle_protocol=4)
    out = tmp_path / "run"
    code = clap_main.main(["--train-data", str(shards), "--model", "htsat-tiny-roberta", "--pretrained", str(evil),
                           "--batch-size", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"(the first: {os.system.__module__}.system)" in err[0], err
    assert not out.exists()


def test_clap_train_without_the_tokenizer_offline_fails_fast_in_one_line(tmp_path, capsys, monkeypatch, no_network):
    """Offline (HF_HUB_OFFLINE, as in every test), an endpoint nothing answers and an empty hub
    cache: one line naming the way out, within seconds (not transformers' retries), no --out left."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert constants.is_offline_mode()
    shards = tmp_path / "shards"
    shards.mkdir()
    build_clap_shards(shards, clips=4, seconds=1.0, per_shard=4, augment=False)
    out = tmp_path / "run"
    started = time.monotonic()
    code = clap_main.main(["--train-data", str(shards), "--model", "htsat-tiny-roberta", "--batch-size", "2",
                           "--workers", "0", "--out", str(out)])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "'roberta-base' is not in the Hugging Face cache" in err[0] and "--text-model PATH" in err[0], err
    assert elapsed < 10, elapsed
    assert not out.exists()


def test_tokenizer_from_an_unreachable_hub_is_one_line(monkeypatch, tmp_path):
    """Not offline but nothing answers: found by a quick connection, not transformers' minute of retries."""
    from huggingface_hub import constants

    from clap_model.text import Tokenize

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    started = time.monotonic()
    with pytest.raises(RunFailure, match=r"http://127.0.0.1:9 cannot be reached.*--text-model PATH"):
        Tokenize(TextConfig(name_or_path="someone/no-such-model-in-any-cache"))
    assert time.monotonic() - started < 5
