"""Ctrl-C or SIGTERM while Ray starts: ray.init is let finish (interrupted inside, it leaves a
half-made core worker whose teardown at exit can crash the interpreter, exit 139), the Ray this
call started is shut down, and the signal then reaches the caller's handler."""
from __future__ import annotations

import os
import signal
import time

import pytest

from audio_dataset.raystart import start_ray


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
