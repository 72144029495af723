"""The README's Ray cluster recipe, run as written: two nodes started with `ray start` on this
machine (HEAD is 127.0.0.1, the port a free one) and a build through `--ray-address`."""
from __future__ import annotations

import os
import re
import shlex
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

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Only for the test: each node stays in the foreground of its own session (--block), so the test
# stops exactly its own processes (`ray stop` would stop every Ray on the machine).
TEST_NODE_FLAGS = ["--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def readme_recipe() -> list[str]:
    """The commands between the README's `ci:cluster` markers, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("<!-- ci:cluster -->"):text.index("<!-- /ci:cluster -->")]
    lines = [line.strip() for line in block.splitlines()]
    return [re.sub(r"\s+#.*$", "", line) for line in lines if line and not line.startswith(("<!--", "```", "#"))]


def _recipe_env(export: str) -> dict[str, str]:
    """The environment after the recipe's `export` line, as a shell on each node would have it."""
    assert export.startswith("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=")
    shell = subprocess.run(["bash", "-c", f'{export}; printf "%s %s" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN"'],
                           capture_output=True, text=True, check=True,
                           env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}).stdout
    mode, token = shell.split(" ")
    assert mode == "token" and len(token) == 32
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing but the recipe's
    return {**env, "RAY_AUTH_MODE": mode, "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{env['PATH']}"}


def _argv(line: str, address: str, out: Path) -> list[str]:
    argv = shlex.split(line.replace("HEAD:6379", address).replace("--port 6379", f"--port {address.split(':')[1]}"))
    return [str(out) if a == "OUT" else a for a in argv]


def _ray_node(argv: list[str], tmp: Path, name: str, env: dict[str, str]) -> subprocess.Popen:
    assert argv[:2] == ["ray", "start"]
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([str(BIN / "ray"), *argv[1:], *TEST_NODE_FLAGS], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env)


def _nodes_alive(address: str, want: int, env: dict[str, str]) -> bool:
    # Joined the way audiodata joins (start_ray), given only the token: it turns token mode on itself.
    probe = ("import ray; from audio_dataset.raystart import start_ray; start_ray(%r); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    token_only = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=token_only)
    return result.returncode == 0 and result.stdout.strip().endswith(str(want))


@pytest.fixture
def recipe_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], str]]:
    """The recipe's two `ray start` lines running; yields the address, the environment and the build line."""
    export, head_line, worker_line, build_line = readme_recipe()
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = _recipe_env(export)
    head = _ray_node(_argv(head_line, address, tmp_path), tmp_path, "head", env)
    nodes = [head]
    try:
        time.sleep(3)
        nodes.append(_ray_node(_argv(worker_line, address, tmp_path), tmp_path, "worker", env))
        deadline = time.time() + 90
        while not _nodes_alive(address, 2, env):
            assert time.time() < deadline, [(tmp_path / f"{n}.log").read_text()[-1500:] for n in ("head", "worker")]
            time.sleep(2)
        yield address, env, build_line
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


@pytest.mark.slow  # the CI's second pytest line runs it (README: set up, test, run)
def test_the_readme_recipe_builds_over_both_nodes(tmp_path: Path,
                                                  recipe_cluster: tuple[str, dict[str, str], str]) -> None:
    address, env, build_line = recipe_cluster
    out = tmp_path / "out"
    argv = _argv(build_line, address, out)
    assert argv[0] == "audiodata" and "--ray-address" in argv
    result = subprocess.run([str(BIN / "audiodata"), *argv[1:], "--no-progress"], capture_output=True, text=True,
                            timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "InvalidAuthToken" not in result.stderr and "Token authentication" not in result.stderr
    line = next(l for l in result.stdout.splitlines() if l.startswith("shards per node: "))
    counts = [int(part.split("=")[1]) for part in line.removeprefix("shards per node: ").split(", ")]
    assert len(counts) == 2 and all(c > 0 for c in counts) and sum(counts) == 10
    assert verify(out).ok
