"""Which router instances exist (server configuration) and whether a policy may name one."""

from __future__ import annotations

from opsapi.canary.policy import RouterPolicy
from opsapi.config import Settings
from opsapi.errors import Unprocessable

PULL = "pull"


def instance_names(settings: Settings) -> set[str]:
    """The router instances this server knows: the built-in `pull` for now."""
    return {PULL}


def check_router(router: RouterPolicy, settings: Settings) -> None:
    """Refuse (422) a policy naming an unknown router instance or giving it bad parameters."""
    known = instance_names(settings)
    if router.name not in known:
        raise Unprocessable(
            f"unknown router {router.name!r}; this server knows: {', '.join(sorted(known))}",
            errors=[{"field": "router.name", "message": "unknown router instance"}],
        )
    if router.name == PULL and router.parameters():
        raise Unprocessable(
            "the pull router takes no parameters",
            errors=[{"field": "router", "message": "unexpected parameters"}],
        )
