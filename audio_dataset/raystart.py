"""Starting or joining Ray: the one way `build` and `k2c` do it."""
from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


def _token_auth_as_ray_start_does() -> None:
    """`ray start` turns token authentication on by itself when it finds a token (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and RAY_AUTH_MODE is unset; a driver given an address
    does not, so the cluster recipe's nodes would refuse it (InvalidAuthToken). Apply Ray's own rule."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


@contextmanager
def _signals_held(held: list[int]) -> Iterator[None]:
    """SIGINT and SIGTERM noted in `held` instead of acted on; the caller's handlers are back
    afterwards. ray.init interrupted part way (a KeyboardInterrupt inside it) leaves a half-made
    core worker and its node processes, whose teardown at exit can crash the interpreter (exit 139
    instead of one line): it is let finish, and the signal acted on after. A second signal is
    acted on at once."""
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum: int, frame: Any) -> None:
        if not held:
            held.append(signum)
            return
        handler = previous[signum]  # a second one: the user insists (ray.init may wait on a cluster)
        if callable(handler):
            handler(signum, frame)
        raise KeyboardInterrupt

    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():  # ray.init replaces SIGTERM's with a bare exit: ours again
            signal.signal(sig, handler)


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a private local instance; True when this call started Ray.
    A SIGINT / SIGTERM while Ray starts is acted on once it has started, and shut down again."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    # Ray's token-auth notices are for whoever runs `ray start`; the driver's output stays ours.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    held: list[int] = []
    with _signals_held(held):
        if address:
            _token_auth_as_ray_start_does()
            ray.init(address=address, **kwargs)
        else:  # "local" starts a fresh instance rather than joining whatever `ray start` left behind.
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    if held:
        ray.shutdown()  # the caller never learns it owns this Ray
        os.kill(os.getpid(), held[0])  # to the caller's handler: KeyboardInterrupt, or SIGTERM's one line
    return True
