"""Starting or joining Ray: the one way `build` and `k2c` do it."""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any


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


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a private local instance; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    # Ray's token-auth notices are for whoever runs `ray start`; the driver's output stays ours.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # ray.init replaces the SIGTERM handler with a bare exit: keep ours (SIGTERM is Ctrl-C, one line).
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address:
            _token_auth_as_ray_start_does()
            ray.init(address=address, **kwargs)
            return True
        # "local" starts a fresh instance rather than joining whatever `ray start` left behind.
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
        return True
    finally:
        if on_sigterm is not None:
            signal.signal(signal.SIGTERM, on_sigterm)
