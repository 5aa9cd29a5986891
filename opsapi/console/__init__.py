"""The web console (docs/console.md): server-rendered pages over the API, under
`/internal/ops/console`."""

from __future__ import annotations

from starlette.routing import BaseRoute


def routes(prefix: str) -> list[BaseRoute]:
    """The console's routes for an API served under `prefix` (with `/` leading to it)."""
    from opsapi.console.views import Console

    return Console(prefix).routes()
