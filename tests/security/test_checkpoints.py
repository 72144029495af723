"""A checkpoint from a stranger cannot run code, write outside OUT, hang, or take the memory: every
hostile file (tests/security/hostile_checkpoints.py) is refused in one line with exit status 2 by the
commands that read checkpoints, run as a user runs them, under an address-space cap."""
from __future__ import annotations

import hashlib
import os
import pickle
import resource
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import hostile_checkpoints as hostile  # noqa: E402

from clap_model import checkpoint as ckpt  # noqa: E402
from clap_model.config import UsageError  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# torch imports within 1 GiB of address space here; every memory bomb below asks for 3 GB or more.
ADDRESS_SPACE_CAP = 2 << 30
COMMAND_TIMEOUT = 240  # a FIFO that blocked a command would hang it: the timeout says so


# ---- the victim's surroundings ------------------------------------------------------------------

class Scene:
    """tmp_path: VICTIM and the marker's place (outside every command's output), IN (the hostile
    files), OUT (what commands may write), TMP (the commands' TMPDIR), a dataset and val shard."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.victim = root / hostile.VICTIM
        self.victim.write_text("nobody may change me\n")
        self.victim.chmod(0o644)
        self.marker = root / hostile.MARKER
        self.inputs, self.out, self.tmp = root / "in", root / "out", root / "tmp"
        for folder in (self.inputs, self.out, self.tmp):
            folder.mkdir()
        self.dataset = root / "dataset"
        (self.dataset / "train").mkdir(parents=True)
        (self.dataset / "train" / "sizes.json").write_text('{"000000.tar": 1}')
        (self.dataset / "train" / "000000.tar").write_bytes(b"")
        self.before: dict[str, tuple] = {}

    def snapshot(self) -> dict[str, tuple]:
        """Every entry outside OUT: type and mode, bytes and mtime of files."""
        found = {}
        for path in sorted(self.root.rglob("*")):
            if any(folder in path.parents or path == folder for folder in (self.out, self.tmp)):
                continue
            info = path.lstat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() and not path.is_symlink() else ""
            found[str(path.relative_to(self.root))] = (info.st_mode, info.st_mtime_ns, digest)
        return found

    def freeze(self) -> None:
        self.before = self.snapshot()

    def assert_untouched(self) -> None:
        assert not self.marker.exists(), "a payload ran"
        assert self.snapshot() == self.before, "something outside OUT changed"
        assert not any(self.tmp.iterdir()), "temporary files were left behind"


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_CAP, ADDRESS_SPACE_CAP))


COMMANDS = {
    "clap-eval": lambda s, p: ["-m", "clap_model.evaluate", "--checkpoint", str(p), "--val-data",
                               str(s.dataset / "train" / "000000.tar")],
    "clap-export": lambda s, p: ["-m", "clap_model.export", "--checkpoint", str(p), "--format", "laion",
                                 "--out", str(s.out / "x.pt")],
    "embed": lambda s, p: ["-m", "audio_dataset.cli", "embed", str(s.dataset), "--checkpoint", str(p),
                           "--out", str(s.out / "embed")],
    "clap-train": lambda s, p: ["-m", "clap_model.main", "--train-data", str(s.dataset / "train" / "000000.tar"),
                                "--train-num-samples", "1", "--batch-size", "1", "--model", "tiny",
                                "--out", str(s.out / "run"), "--pretrained", str(p)],
}
PROGRAMS = {"clap-eval": "clap-eval", "clap-export": "clap-export", "embed": "audiodata", "clap-train": "clap-train"}


def _launch(scene: Scene, command: str, path: Path, *extra: str) -> subprocess.CompletedProcess:
    """COMMAND on PATH as a user runs it: a fresh interpreter, under the address-space cap."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scene.tmp), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *COMMANDS[command](scene, path), *extra], cwd=scene.out, env=env,
                          preexec_fn=_cap_memory, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def _refusal_line(scene: Scene, command: str, done: subprocess.CompletedProcess) -> str:
    """Asserts the refusal's shape (exit 2, one line, the program's prefix, nothing outside OUT
    changed) and returns its one line."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"{PROGRAMS[command]}: error: "), lines[0]
    scene.assert_untouched()
    return lines[0]


# ---- the main tricks, through the commands ------------------------------------------------------

MAIN_TRICKS = {
    "code-global": (lambda f: hostile.code_global(f, 4, True), "the first: posix.system"),
    "numpy-object-scalar": (hostile.numpy_object_scalar, "NumPy dtype other than a plain number"),
    "numpy-flags": (hostile.numpy_flags_on_float, "NumPy dtype with state other than a byte order"),
    "tar-hardlink": (lambda f: hostile.legacy_tar(f, "hardlink"), "tar format"),
    "tar-chardev": (lambda f: hostile.legacy_tar(f, "chardev"), "tar format"),
    "tar-fifo": (lambda f: hostile.legacy_tar(f, "fifo"), "tar format"),
    "bytearray-bomb": (hostile.bytearray_bomb, "bytearray of something other than its bytes"),
    "legacy-storage-bomb": (hostile.legacy_storage_bomb, "storages declare more bytes than the file holds"),
    "zip-storage-bomb": (hostile.zip_storage_bomb, "declares 4000000000 bytes; its zip member holds 4"),
    "none": (lambda f: hostile.saved(f, "none.pt", None), "holds a NoneType, not a checkpoint dict"),
}


EVERY_COMMAND = [("clap-export", "tar-hardlink"), ("clap-export", "numpy-object-scalar"), ("embed", "tar-hardlink"),
                 ("embed", "bytearray-bomb"), ("clap-train", "none"), ("clap-train", "zip-storage-bomb")]


def _fifo(folder: Path) -> Path:
    fifo = folder / "ckpt.pt"
    os.mkfifo(fifo)
    return fifo


# What the refusal tests below run: name -> (command, the file made in its scene's IN, extra arguments).
REFUSALS: dict[str, tuple[str, Callable[[Path], Path], tuple[str, ...]]] = {
    **{f"clap-eval:{trick}": ("clap-eval", make, ()) for trick, (make, _) in MAIN_TRICKS.items()},
    **{f"{command}:{trick}": (command, MAIN_TRICKS[trick][0], ()) for command, trick in EVERY_COMMAND},
    "clap-eval:fifo": ("clap-eval", _fifo, ()),
    "clap-eval:budget": ("clap-eval", hostile.benign_zip, ("--max-checkpoint-bytes", "4K")),
    "clap-export:budget": ("clap-export", hostile.benign_zip, ("--max-checkpoint-bytes", "4096")),
}


@dataclass
class Refusal:
    scene: Scene
    command: str
    path: Path
    done: subprocess.CompletedProcess

    def line(self) -> str:
        return _refusal_line(self.scene, self.command, self.done)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory) -> Iterator[dict[str, Future[Refusal]]]:
    """Every command of REFUSALS on its hostile file, each in a scene of its own, run a few at once
    in the order of the tests below: each is a fresh interpreter that spends seconds importing torch,
    so side by side they take about a core's share of the time. Each test waits for and checks its
    own run (so no one test waits for them all)."""
    planned = {}
    for name, (command, make, extra) in REFUSALS.items():
        scene = Scene(tmp_path_factory.mktemp("scene"))
        path = make(scene.inputs)
        scene.freeze()
        planned[name] = (scene, command, path, extra)

    def run(name: str) -> Refusal:
        scene, command, path, extra = planned[name]
        return Refusal(scene, command, path, _launch(scene, command, path, *extra))

    pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)))
    try:
        yield {name: pool.submit(run, name) for name in planned}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("trick", list(MAIN_TRICKS))
def test_clap_eval_refuses_each_trick_in_one_line(refusals, trick):
    _, reason = MAIN_TRICKS[trick]
    assert reason in refusals[f"clap-eval:{trick}"].result().line()


@pytest.mark.parametrize("command,trick", EVERY_COMMAND)
def test_every_command_that_loads_checkpoints_refuses_them(refusals, command, trick):
    _, reason = MAIN_TRICKS[trick]
    refused = refusals[f"{command}:{trick}"].result()
    assert reason in refused.line()
    assert not any(refused.scene.out.iterdir()), "a refused command wrote output"


def test_a_fifo_named_as_the_checkpoint_is_refused_not_waited_on(refusals):
    assert "not a regular file" in refusals["clap-eval:fifo"].result().line()


def test_the_memory_budget_is_an_option_and_counts(refusals):
    assert "--max-checkpoint-bytes 4096 bytes" in refusals["clap-eval:budget"].result().line()
    assert "--max-checkpoint-bytes 4096 bytes" in refusals["clap-export:budget"].result().line()
    assert ckpt.read(refusals["clap-eval:budget"].result().path, max_bytes=1 << 20)["w"].tolist() == [1.5, -2.0]


def test_our_checkpoint_still_exports(scene):
    """The good path through the same command: a clap-train checkpoint of the tiny model."""
    from clap_model.clap import CLAP
    from clap_model.config import get_preset

    cfg = get_preset("tiny")
    path = scene.inputs / "ours.pt"
    ckpt.save_atomic({"config": cfg.to_dict(), "state_dict": CLAP(cfg, pretrained_text=False).state_dict(),
                      "epoch": 1}, path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(scene.tmp)}
    done = subprocess.run([sys.executable, "-m", "clap_model.export", "--checkpoint", str(path), "--format", "msclap",
                           "--out", str(scene.out / "x.pth")], env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    # tiny is no msclap architecture: refused after loading, which proves the file loaded.
    assert done.returncode == 2 and "msclap's format holds only" in done.stderr, done.stderr[-2000:]


# ---- the long tail, in process ------------------------------------------------------------------

LONG_TAIL = {
    **{f"code-p{p}-{'zip' if z else 'legacy'}": (lambda f, p=p, z=z: hostile.code_global(f, p, z), "posix.system")
       for p in (2, 3, 4, 5) for z in (True, False)},
    "code-p0-zip": (hostile.code_global_protocol0, "posix.system"),
    "exec-inst": (hostile.exec_in_zip, "INST/OBJ"),
    "newobj-storage": (hostile.storage_newobj_bomb, "NEWOBJ"),
    "deflate-bomb": (hostile.deflate_bomb, "is compressed"),
    "declared-size": (hostile.declared_size_bomb, "declare more bytes than the file holds"),
    "opcode-bomb": (hostile.opcode_bomb, "--max-checkpoint-bytes"),
    "numpy-array-bomb": (hostile.numpy_array_bomb, "bytes do not fit its shape"),
    "tensor-past-storage": (hostile.tensor_past_storage, "reaching past its storage"),
    "build-on-tensor": (hostile.build_on_tensor, "sets the state of a Tensor"),
    "legacy-module-id": (hostile.legacy_module_id, "persistent id other than a storage"),
    "zip-symlink": (hostile.zip_symlink_member, "is a link or special file"),
    "zip-outside-prefix": (hostile.zip_outside_prefix, "is outside"),
    "zip-trailing-data": (hostile.zip_trailing_data, "no zip end record at its end"),
    "list": (lambda f: hostile.saved(f, "list.pt", [1, 2]), "holds a list, not a checkpoint dict"),
    **{name: (make, reason) for name, (make, reason) in MAIN_TRICKS.items() if name not in ("code-global",)},
}


class _Alarm:
    """In-process reads must not block (a FIFO): fail after SECONDS instead of hanging the suite."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def __enter__(self) -> None:
        def expire(*_):
            raise TimeoutError("blocked")
        signal.signal(signal.SIGALRM, expire)
        signal.alarm(self.seconds)

    def __exit__(self, *_) -> None:
        signal.alarm(0)


@pytest.mark.parametrize("trick", list(LONG_TAIL))
def test_read_refuses_in_one_line(scene, trick):
    make, reason = LONG_TAIL[trick]
    path = make(scene.inputs)
    scene.freeze()
    with _Alarm(120), pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.read(path)
    message = str(caught.value)
    assert reason in message and "\n" not in message, message
    scene.assert_untouched()


@pytest.mark.parametrize("name,reason", [
    ("list-config", "its config is a list, not a dict"),
    ("int-keys", "its state_dict is not a dict with names (str) as keys"),
    ("missing-audio", "the key 'audio' is missing"),
    ("config-type", "audio.embed_dim is '96', not int"),
])
def test_loaded_structure_is_checked_in_one_line(scene, name, reason):
    path = hostile.structural(scene.inputs)[name]
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.model_config_of(ckpt.read(path), None, None)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


def test_a_config_describing_a_model_far_larger_than_its_weights_is_refused_before_it_is_built(scene):
    files = hostile.structural(scene.inputs)
    with pytest.raises(ckpt.CheckpointError, match=r"audio.embed_dim is 1000000000,"):
        ckpt.model_config_of(ckpt.read(files["huge-config"]), None, None)
    checkpoint = ckpt.read(files["wide-config"])
    with pytest.raises(ckpt.CheckpointError, match=r"describes a model of 6\d\d\d MiB; its weights hold 0 MiB"):
        ckpt.model_from(checkpoint, ckpt.model_config_of(checkpoint, None, None))


def test_special_files_are_refused_not_read(scene):
    fifo = scene.inputs / "fifo.pt"
    os.mkfifo(fifo)
    for path, reason in ((fifo, "not a regular file"), (Path("/dev/zero"), "not a regular file"),
                         (scene.inputs, "not a regular file")):
        with _Alarm(60), pytest.raises(ckpt.CheckpointError, match=reason):
            ckpt.read(path)


def test_a_model_folder_with_a_fifo_is_refused_not_waited_on(scene):
    folder = scene.inputs / "hf"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "clap"}')
    os.mkfifo(folder / "model.safetensors")
    with _Alarm(60), pytest.raises(UsageError, match="model.safetensors is not a regular file"):
        ckpt.read(folder)
    (folder / "model.safetensors").unlink()
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")  # not taken for a model folder, and not opened
    with _Alarm(60), pytest.raises(ckpt.CheckpointError, match="not a regular file"):
        ckpt.read(folder)


@pytest.mark.parametrize("make", [hostile.benign_zip, hostile.benign_legacy], ids=["zip", "legacy"])
def test_the_generators_containers_load_when_benign(scene, make):
    """The controls: a refusal above is the guard's, not a malformed container's."""
    loaded = ckpt.read(make(scene.inputs))
    assert loaded["epoch"] == 3


def test_numpy_scalars_and_arrays_of_every_plain_kind_still_load(scene):
    import numpy as np

    state = {"state_dict": {"w": torch.ones(2)}, "lr": np.float64(0.5), "n": np.int32(3), "b": np.bool_(True),
             "c": np.complex64(1j), "arrays": [np.arange(4, dtype=np.uint8), np.zeros((2, 3), ">f4"), np.zeros(0)]}
    for protocol in (2, 4, 5):
        path = scene.inputs / f"np{protocol}.pt"
        torch.save(state, path, pickle_protocol=protocol)
        loaded = ckpt.read(path)
        assert loaded["lr"] == 0.5 and loaded["n"] == 3 and loaded["b"] and loaded["c"] == 1j
        assert [a.shape for a in loaded["arrays"]] == [(4,), (2, 3), (0,)]
        # As the standard unpickler reads it (NumPy's protocol 2 reduce drops the byte order itself).
        assert loaded["arrays"][1].dtype == pickle.loads(pickle.dumps(state["arrays"][1], protocol)).dtype
