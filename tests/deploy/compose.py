"""docker-compose.yml read as Compose reads it (merge keys resolved, `$$` unescaped), and the
files of the stack, for the compose tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.support import ROOT

COMPOSE = ROOT / "docker-compose.yml"
SHARED = "/run/opsapi-edge"  # the volume opsapi and nginx share (deploy/compose/routers.yaml)


def compose() -> dict[str, Any]:
    """The compose file (PyYAML resolves the `<<` merge keys as Compose does)."""
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]  # type: ignore[no-any-return]


def unescape(text: str) -> str:
    """A value as the container sees it: Compose turns `$$` into `$`."""
    return text.replace("$$", "$")


def default_of(value: str) -> str:
    """`${NAME:-default}` -> `default`; other values unchanged."""
    match = re.fullmatch(r"\$\{\w+:-([^}]*)\}", value)
    return match.group(1) if match else value


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> source (a repository path for `./…` binds, else the volume's name)."""
    found = {}
    for entry in service.get("volumes", []):
        source, target, *_ = entry.split(":")
        found[target] = source
    return found


def repo_path(source: str) -> Path:
    """The repository file a `./…` bind mount names."""
    assert source.startswith("./"), source
    return ROOT / source


def container_file(service: dict[str, Any], path: str) -> Path:
    """The repository file the container sees at `path` (through a file or directory bind)."""
    for target, source in sorted(mounts(service).items(), key=lambda m: -len(m[0])):
        if source.startswith("./") and (path == target or path.startswith(target + "/")):
            return repo_path(source) / path[len(target) :].lstrip("/")
    raise AssertionError(f"{path} is not mounted from the repository")


def listen_port(service: dict[str, Any]) -> int:
    """The port an opsapi-image service or a demo app listens on."""
    command = service.get("command") or ["serve", "--host", "0.0.0.0", "--port", "8080"]
    return int(command[command.index("--port") + 1])
