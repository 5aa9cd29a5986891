"""Which router instances a policy may name (server configuration) and with which parameters."""

from __future__ import annotations

from collections.abc import Mapping

from opsapi.canary.policy import RouterPolicy
from opsapi.errors import Unprocessable
from opsapi.routers.base import Router

PULL = "pull"


def check_router(router: RouterPolicy, routers: Mapping[str, Router]) -> None:
    """Refuse (422) a policy naming an unknown router instance or giving it bad parameters."""
    if router.name == PULL:
        if router.parameters():
            raise Unprocessable(
                "the pull router takes no parameters",
                errors=[{"field": "router", "message": "unexpected parameters"}],
            )
        return
    instance = routers.get(router.name)
    if instance is None:
        known = ", ".join(sorted({PULL, *routers}))
        raise Unprocessable(
            f"unknown router {router.name!r}; this server knows: {known}",
            errors=[{"field": "router.name", "message": "unknown router instance"}],
        )
    errors = instance.check_params(router.parameters())
    if errors:
        raise Unprocessable(f"invalid parameters for router {router.name!r}", errors=errors)
