"""Leftovers of the untrusted-files work (docs/security.md): a checkpoint's config does not choose a
text model to load; a dataset's top-level files are copied in bounded chunks; opt-out signals are
asked of every host a download is redirected to; the clap-* commands' quick refusals (a misspelt
preset, a missing shard or checkpoint) come before torch is imported."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

# ---- 1. a checkpoint's text.name_or_path is data, not a path or hub id to follow -------------------


@pytest.fixture(scope="module")
def planted_text_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny checkpoint whose config names a local folder (outside anything the user named) as its
    text model; the folder holds a loadable tokenizer, so following it would work."""
    import shutil

    from clap_model import checkpoint as ckpt
    from clap_model.clap import CLAP
    from clap_model.config import get_preset
    from clap_model.text import SHIPPED_VOCABULARIES

    root = tmp_path_factory.mktemp("planted-text")
    victim = root / "elsewhere" / "tokenizer"
    shutil.copytree(SHIPPED_VOCABULARIES["audioset-bpe"], victim)
    cfg = get_preset("tiny")
    state = CLAP(cfg, pretrained_text=False).state_dict()
    cfg = replace(cfg, text=replace(cfg.text, name_or_path=str(victim)))
    path = root / "planted.pt"
    ckpt.save_atomic({"config": cfg.to_dict(), "state_dict": state}, path)
    (root / "data" / "train").mkdir(parents=True)
    (root / "data" / "train" / "sizes.json").write_text('{"000000.tar": 1}')
    (root / "data" / "train" / "000000.tar").write_bytes(b"")
    return path, victim


@pytest.fixture
def followed(monkeypatch) -> list[str]:
    """Every name transformers would be asked to load (tokenizer, config, weights)."""
    from clap_model import text
    from clap_model.config import UsageError

    names: list[str] = []

    def record(load, name, *args, **kwargs):
        names.append(name)
        raise UsageError(f"followed {name}")

    monkeypatch.setattr(text, "from_pretrained", record)
    return names


def _one_refusal(capsys, rc: int, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    assert "--text-model" in err[0] and "not a preset's hub id" in err[0], err
    return err[0]


def test_clap_eval_and_export_refuse_a_checkpoints_own_text_path(planted_text_checkpoint, followed, capsys,
                                                                 tmp_path):
    from clap_model import evaluate, export

    path, _ = planted_text_checkpoint
    shard = path.parent / "data" / "train" / "000000.tar"
    _one_refusal(capsys, evaluate.main(["--checkpoint", str(path), "--val-data", str(shard)]), "clap-eval")
    _one_refusal(capsys, export.main(["--checkpoint", str(path), "--format", "laion",
                                      "--out", str(tmp_path / "x.pt")]), "clap-export")
    assert followed == [] and not (tmp_path / "x.pt").exists()


def test_embed_and_searchs_loader_refuse_a_checkpoints_own_text_path(planted_text_checkpoint, followed, capsys,
                                                                     tmp_path):
    from audio_dataset import cli
    from clap_model.config import UsageError
    from clap_model.inference import CLAPInference

    path, _ = planted_text_checkpoint
    dataset = path.parent / "data"
    rc = cli.main(["embed", str(dataset), "--checkpoint", str(path), "--out", str(tmp_path / "embed")])
    _one_refusal(capsys, rc, "audiodata")
    with pytest.raises(UsageError, match="pass --text-model"):  # search's and embed workers' loader
        CLAPInference.from_checkpoint(path, device="cpu")
    assert followed == [] and not (tmp_path / "embed").exists()


def test_the_text_model_the_user_names_or_a_presets_hub_id_is_honoured(planted_text_checkpoint):
    from clap_model import checkpoint as ckpt

    path, victim = planted_text_checkpoint
    saved = ckpt.read(path)
    # The user names the folder: it is theirs to trust.
    assert ckpt.model_config_of(saved, None, str(victim)).text.name_or_path == str(victim)
    for hub_id in ("roberta-base", "bert-base-uncased", "gpt2"):
        saved["config"]["text"]["name_or_path"] = hub_id
        assert ckpt.model_config_of(saved, None, None).text.name_or_path == hub_id
    for planted in ("someone/else", "/etc", "../x", "https://example.com/m"):
        saved["config"]["text"]["name_or_path"] = planted
        with pytest.raises(ckpt.CheckpointError, match="not a preset's hub id"):
            ckpt.model_config_of(saved, None, None)
    # What read() made of a Hugging Face folder the user named keeps that folder as its text tower.
    folder = ckpt.FolderCheckpoint(config=dict(saved["config"], text=dict(saved["config"]["text"],
                                                                          name_or_path=str(victim))))
    assert ckpt.model_config_of(folder, None, None).text.name_or_path == str(victim)


# ---- 2. a stage copies the input's top-level files in bounded chunks -----------------------------

def test_a_large_top_level_file_is_copied_without_reading_it_whole(tmp_path):
    """A received dataset's top-level file (a manifest of gigabytes) is streamed: the copy's peak
    Python memory stays near one chunk, not the file's size, and the bytes arrive whole."""
    import filecmp
    import tracemalloc

    from upath import UPath

    from audio_dataset.stage_runner import _copy_dataset_files

    size = 64 << 20
    source, out = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    out.mkdir()
    big = source / "manifest.parquet"
    with open(big, "wb") as handle:  # sparse: cheap to make, 64 MiB to read
        handle.write(b"head")
        handle.truncate(size - 4)
        handle.seek(size - 4)
        handle.write(b"tail")
    tracemalloc.start()
    try:
        _copy_dataset_files(UPath(source), UPath(out))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"copying a {size >> 20} MiB file took {peak >> 20} MiB"
    assert filecmp.cmp(big, out / big.name, shallow=False)
    assert sorted(p.name for p in out.iterdir()) == [big.name], "a temp file was left behind"


# ---- 3. opt-outs are asked of every host a download is redirected to ------------------------------

def test_a_redirect_to_another_host_is_checked_against_that_hosts_opt_outs(loopback, real_clips):
    """Two loopback servers on different ports are two origins: a media fetch from A redirected to B
    is refused when B's robots.txt or tdmrep.json refuses the target, before B is asked for it."""
    import json

    from audio_dataset.http import HttpClient, HttpConfig
    from audio_dataset.source import ItemError
    from loopback import LoopbackServer, Response

    clip = real_clips["198-209-0000"]
    client = HttpClient(HttpConfig(honour_opt_outs=True, retries=0, stall_timeout=2.0))
    with LoopbackServer() as other:
        other.add("/robots.txt", b"User-agent: *\nDisallow: /private/\n", "text/plain")
        other.add("/.well-known/tdmrep.json", json.dumps([{"location": "/reserved/*", "tdm-reservation": 1}]).encode(),
                  "application/json")
        for path in ("/private/a.ogg", "/public/a.ogg", "/reserved/a.ogg"):
            other.add(path, clip, "audio/ogg")
            loopback.add_handler(path, lambda _req, path=path: Response(302, headers={"Location": other.url + path}))

        with pytest.raises(ItemError) as caught:
            client.get_bytes(loopback.url + "/private/a.ogg")
        assert caught.value.reason == "opted_out"
        assert "robots.txt Disallow: /private/" in caught.value.detail and "redirected from" in caught.value.detail
        with pytest.raises(ItemError, match="tdmrep.json tdm-reservation 1"):
            client.get_bytes(loopback.url + "/reserved/a.ogg")
        assert other.requests_to("/private/a.ogg") == [] and other.requests_to("/reserved/a.ogg") == []

        assert client.get_bytes(loopback.url + "/public/a.ogg") == clip  # B allows it: the redirect is followed
        assert len(other.requests_to("/robots.txt")) == 1  # asked once for the whole chain's host


# ---- 4. the clap-* commands' quick refusals come before torch is imported -------------------------

EARLY_REFUSALS = {  # name: (module, arguments, what the one line says); {d} is a folder of the test's
    "train-unknown-model": ("main", ["--train-data", "{d}/data/train/000000.tar", "--model", "nope",
                                     "--out", "{d}/run"], "unknown model 'nope'"),
    "train-missing-shard": ("main", ["--train-data", "{d}/data/train/{{000000..000001}}.tar", "--model", "tiny",
                                     "--out", "{d}/run"], "shard not found"),
    "train-missing-val-shard": ("main", ["--train-data", "{d}/data/train/000000.tar", "--model", "tiny",
                                         "--val-data", "{d}/nope.tar", "--out", "{d}/run"], "shard not found"),
    "train-missing-pretrained": ("main", ["--train-data", "{d}/data/train/000000.tar", "--model", "tiny",
                                          "--pretrained", "{d}/none.pt", "--out", "{d}/run"], "checkpoint not found"),
    "eval-missing-checkpoint": ("evaluate", ["--checkpoint", "{d}/none.pt", "--val-data", "{d}/data/train/000000.tar"],
                                "checkpoint not found"),
    "eval-unknown-model": ("evaluate", ["--checkpoint", "{d}/none.pt", "--model", "nope",
                                        "--val-data", "{d}/data/train/000000.tar"], "unknown model 'nope'"),
    "export-missing-checkpoint": ("export", ["--checkpoint", "{d}/none.pt", "--format", "laion",
                                             "--out", "{d}/x.pt"], "checkpoint not found"),
    "export-unknown-model": ("export", ["--checkpoint", "{d}/none.pt", "--model", "nope", "--format", "laion",
                                        "--out", "{d}/x.pt"], "unknown model 'nope'"),
}
_CHILD = """
import contextlib, io, json, sys
from importlib import import_module
found = {}
for name, (module, argv) in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = import_module("clap_model." + module).main(argv)
    found[name] = [rc, err.getvalue(), sorted(m for m in ("torch", "transformers") if m in sys.modules)]
print(json.dumps(found))
"""


def test_quick_refusals_come_before_torch_is_imported(tmp_path):
    """A typo in --model, a missing shard or checkpoint: one line, exit 2, with torch never imported
    (a torch import takes seconds to tens of seconds; these mistakes are found by looking at names)."""
    import json
    import os
    import subprocess
    import sys

    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "train" / "sizes.json").write_text('{"000000.tar": 1}')
    (tmp_path / "data" / "train" / "000000.tar").write_bytes(b"")
    cases = {name: (module, [arg.format(d=tmp_path) for arg in argv])
             for name, (module, argv, _) in EARLY_REFUSALS.items()}
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout)
    for name, (_, _, says) in EARLY_REFUSALS.items():
        rc, err, heavy = found[name]
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and says in lines[0], (name, err)
        assert heavy == [], f"{name}: refused only after importing {heavy}"
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.pt").exists()
