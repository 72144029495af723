"""Ctrl-C or SIGTERM while Ray starts: ray.init is let finish (interrupted inside, it leaves a
half-made core worker whose teardown at exit can crash the interpreter, exit 139), the Ray this
call started is shut down, and the signal then reaches the caller's handler."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from audio_dataset.raystart import start_ray
from conftest import REAL_AUDIO_DIR


class Stopped(Exception):
    pass


@pytest.fixture
def fake_ray(monkeypatch):
    """ray.init that receives `signum` half way; records what start_ray calls."""
    import ray

    calls: list[str] = []

    def init(**_kwargs) -> None:
        calls.append("init started")
        os.kill(os.getpid(), fake_ray_signal[0])
        time.sleep(0.2)  # a handler that raises would raise here, inside ray.init
        calls.append("init done")

    fake_ray_signal = [signal.SIGINT]
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    return calls, fake_ray_signal


def test_ctrl_c_while_ray_starts_is_raised_after_ray_started_and_stopped(fake_ray):
    calls, _ = fake_ray
    with pytest.raises(KeyboardInterrupt):
        start_ray(None)
    assert calls == ["init started", "init done", "shutdown"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_while_ray_starts_reaches_the_callers_handler(fake_ray):
    calls, which = fake_ray
    which[0] = signal.SIGTERM

    def on_sigterm(_signum, _frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with pytest.raises(Stopped):
            start_ray("127.0.0.1:6379")
        assert signal.getsignal(signal.SIGTERM) is on_sigterm  # ray.init's own handler is not left behind
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert calls == ["init started", "init done", "shutdown"]


def _ray_started(proc: psutil.Process) -> bool:
    try:
        return any("gcs_server" in child.name() or "raylet" in child.name() for child in proc.children(recursive=True))
    except psutil.Error:
        return False


@pytest.mark.parametrize("later", [0.0, 0.4, 1.0], ids=["gcs-up", "raylet-starting", "driver-connecting"])
def test_ctrl_c_while_a_build_starts_ray_is_one_line_and_leaves_no_ray(tmp_path, later):
    """The real thing: Ctrl-C to `audiodata build`'s process group while its Ray comes up."""
    argv = [sys.executable, "-m", "audio_dataset.cli", "build", "--source", "local", "--input", str(REAL_AUDIO_DIR),
            "--out", str(tmp_path / "out"), "--limit", "2", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    watched = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    while not _ray_started(watched) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(later)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, stderr[-2000:])  # not -2 or 139: killed on the way out
    assert stderr.strip().splitlines()[-1] == "audiodata: interrupted; rerun the same command to resume", stderr
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 30  # Ray's processes (its own session's: they were started inside it) go too
    while _session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _session_processes(proc.pid)


def _session_processes(sid: int) -> list[str]:
    found = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                found.append(psutil.Process(pid).name())
        except (OSError, psutil.Error):
            continue
    return found
