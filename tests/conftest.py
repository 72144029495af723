"""Shared pytest fixtures. Each owner keeps their fixtures in a marked block."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

# No network in tests: models load from local folders only. Set before any import of the HF
# libraries, and inherited by the Ray workers the tests start.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

DATA_DIR = Path(__file__).parent / "data"
REAL_AUDIO_DIR = DATA_DIR / "real-audio"

# ---- loopback HTTP server (owner: http layer / web sources) --------------------------------------
# Test modules import the server as `from loopback import ...` whether or not tests/ is a package.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def loopback() -> Iterator["LoopbackServer"]:
    """A started loopback HTTP server; routes and faults are added by the test."""
    from loopback import LoopbackServer

    with LoopbackServer() as server:
        yield server


@pytest.fixture(scope="session")
def real_clips() -> dict[str, bytes]:
    """The real recordings in tests/data/real-audio, by file stem (OGG Vorbis bytes)."""
    return {path.stem: path.read_bytes() for path in sorted(REAL_AUDIO_DIR.glob("*.ogg"))}


@pytest.fixture
def fast_http_config():
    """An HttpConfig with test-sized backoff and timeouts (real policy, shorter clocks)."""
    from audio_dataset.http import HttpConfig

    return HttpConfig(connect_timeout=2.0, stall_timeout=0.5, retries=3, backoff_base=0.01,
                      backoff_cap=0.05, max_retry_after=5.0, max_consecutive_failures=20)

# ---- end loopback HTTP server block --------------------------------------------------------------


# ---- core: Ray, audio formats, builds (owner: lead) ------------------------------------------------
@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray instance for the whole test session (starting Ray costs seconds)."""
    import logging

    import ray

    started = not ray.is_initialized()
    if started:
        # "local": never join a cluster another process left running on this machine.
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def two_shard_build(tmp_path_factory, ray_local) -> Path:
    """The ten real clips built once, in two train shards of five. Read only: tests that change a
    dataset work on a copy."""
    from audio_dataset.build import BuildOptions, build
    from audio_dataset.source import SourceConfig

    out = tmp_path_factory.mktemp("two_shards") / "clean"
    build(BuildOptions(source="local", out=out, source_config=SourceConfig(input=str(REAL_AUDIO_DIR)),
                       split_ratios={"train": 1.0}, samples_per_shard=5, workers=2, progress=False))
    return out


def ffmpeg_convert(src: Path, dst: Path, *args: str) -> Path:
    """Convert with the pip-shipped ffmpeg binary (imageio-ffmpeg), as a user's files would be made."""
    import subprocess

    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-i", str(src), *args, str(dst)]
    subprocess.run(cmd, check=True)
    return dst


@pytest.fixture(scope="session")
def robin_path() -> Path:
    return REAL_AUDIO_DIR / "456440__inspectorj__bird-whistling-robin-single-13.ogg"
# ---- end core block ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module: on small shared machines oversubscribed threads are far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BUCKET = "audiodata-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_env() -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback; the standard AWS variables point every client at it. One for the
    whole run: fsspec caches its S3 clients, so a second server (a new endpoint) would not be seen."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield {**os.environ, **env}
    finally:
        server.terminate()
        server.wait()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def large_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """tmp_path for model-sized files (a full msclap checkpoint is 0.6-0.8 GB): emptied after the
    test, pass or fail, so the suite does not leave gigabytes in the temp folder."""
    import shutil

    yield tmp_path
    for child in tmp_path.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


# ---- caption stage (owner: cap-stage) --------------------------------------------------------------
@pytest.fixture(scope="session")
def caption_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny random-weight models `python -m audio_dataset.caption.tiny_models` makes, built once:
    {"alm": folder, "llm": folder, "clap": checkpoint}; tests load them through the users' flags."""
    from audio_dataset.caption.tiny_models import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("caption_models"))
# ---- end caption stage block -----------------------------------------------------------------------


# ---- a small trained CLAP (shared by test_curate_search and test_caption_check) ---------------------
@pytest.fixture(scope="session")
def trained_tiny_clap(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset, checkpoint): ten 2 s real clips in DATASET/train (two shards of five) and the `tiny`
    preset trained on them for 80 steps, at ROOT/run/latest.pt with clap-train's results.jsonl beside
    it. Trained once a session: a minute of CPU. The shards are read only; test_curate_search adds
    an `embed` run beside them (DATASET/embed), which the other users do not read."""
    import torch

    from clap_model import main as clap_main
    from test_clap_data import build_clap_shards

    root = tmp_path_factory.mktemp("trained_tiny_clap")
    dataset = root / "dataset"
    build_clap_shards(dataset / "train", clips=10, seconds=2.0, per_shard=5, augment=False)
    pattern = f"{dataset}/train/{{000000..000001}}.tar"
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread, as the tests that use it ran it: the same numbers
    try:
        assert clap_main.main(["--train-data", pattern, "--val-data", pattern, "--model", "tiny", "--batch-size", "10",
                               "--workers", "1", "--out", str(root / "run"), "--shuffle-buffer", "10",
                               "--log-every", "100", "--seed", "3", "--epochs", "8", "--train-num-samples", "100",
                               "--lr", "3e-3", "--warmup", "5"]) == 0
    finally:
        torch.set_num_threads(before)
    return dataset, root / "run" / "latest.pt"
# ---- end trained CLAP block ------------------------------------------------------------------------
