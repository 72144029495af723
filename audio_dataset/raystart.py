"""Starting or joining Ray: the one way `build` and `k2c` do it."""
from __future__ import annotations

import logging
from typing import Any


def start_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Join the cluster at `address`, or start a private local instance; True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING, "configure_logging": True}
    if address:
        ray.init(address=address, **kwargs)
        return True
    # "local" starts a fresh instance rather than joining whatever `ray start` left behind.
    # Its token-auth notice is about clusters; a private local instance needs no such line.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return True
