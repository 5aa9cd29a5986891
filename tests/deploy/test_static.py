"""The deployment files are checked statically (no Docker engine here)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.support.databases import unavailable

ROOT = Path(__file__).resolve().parents[2]
RULE_FILES = ("rules.yml", "alerts.yml")


def test_prometheus_rules_are_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool (Debian package prometheus)")
    assert promtool is not None
    result = subprocess.run(
        [promtool, "check", "rules", *(str(ROOT / "deploy/prometheus" / n) for n in RULE_FILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_parses_and_builds_the_image() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "postgres" in services or any(
        "postgres" in str(s.get("image", "")) for s in services.values()
    )
    built = [s for s in services.values() if "build" in s]
    assert built, "opsapi is built from deploy/Dockerfile"


def test_every_path_the_dockerfile_copies_exists() -> None:
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    sources = []
    for line in dockerfile.splitlines():
        match = re.match(r"^\s*COPY\s+(?!--from)(.+)$", line)
        if match:
            parts = [p for p in match.group(1).split() if not p.startswith("--")]
            sources.extend(parts[:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source


def test_the_image_entrypoint_and_command_are_the_package_console_script() -> None:
    import json
    import sys
    import tomllib

    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    (entrypoint,) = re.findall(r"^ENTRYPOINT (.+)$", dockerfile, re.M)
    (command,) = re.findall(r"^CMD (.+)$", dockerfile, re.M)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    (program,) = json.loads(entrypoint)
    assert scripts[program] == "opsapi.cli:main"
    arguments = json.loads(command)
    result = subprocess.run(
        [sys.executable, "-m", "opsapi", arguments[0], "--help"], capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr
    port = arguments[arguments.index("--port") + 1]
    assert f"EXPOSE {port}" in dockerfile
    assert f"127.0.0.1:{port}/healthz" in dockerfile
