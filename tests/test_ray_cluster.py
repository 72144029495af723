"""A build through `--ray-address` on a two-node Ray cluster started with `ray start` on this machine."""
from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from audio_dataset.verify import verify
from conftest import REAL_AUDIO_DIR

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_env() -> dict[str, str]:
    # Token authentication, as a real cluster should run: every node and the driver share it.
    return {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def _ray_node(args: list[str], tmp: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    # --block keeps each node in the foreground of its own session, so the test stops exactly
    # its own processes (`ray stop` would stop every Ray on the machine).
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([RAY, "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                             "--disable-usage-stats", *args], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _nodes_alive(address: str, want: int, env: dict[str, str]) -> bool:
    probe = ("import ray; ray.init(address=%r, logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env)
    return result.returncode == 0 and result.stdout.strip().endswith(str(want))


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = _cluster_env()
    head = _ray_node(["--head", "--port", str(port), "--include-dashboard=false"], tmp_path, "head", env)
    nodes = [head]
    try:
        time.sleep(3)
        nodes.append(_ray_node(["--address", address], tmp_path, "worker", env))
        deadline = time.time() + 90
        while not _nodes_alive(address, 2, env):
            assert time.time() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(2)
        yield address, env
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        # `ray start` records the cluster for later `ray.init()` calls; it is gone now.
        marker = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if marker.exists() and marker.read_text().strip().endswith(f":{port}"):
            marker.unlink()


def test_build_spreads_over_both_nodes(tmp_path: Path, two_node_cluster: tuple[str, dict[str, str]]) -> None:
    address, env = two_node_cluster
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "audio_dataset.cli", "build", "--source", "local", "--input",
                             str(REAL_AUDIO_DIR), "--out", str(out), "--samples-per-shard", "1",
                             "--ray-address", address, "--no-progress"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("shards per node: "))
    counts = [int(part.split("=")[1]) for part in line.removeprefix("shards per node: ").split(", ")]
    assert len(counts) == 2 and all(c > 0 for c in counts) and sum(counts) == 10
    assert verify(out).ok
