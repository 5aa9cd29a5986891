"""The hashed lock (`requirements.lock`) that the image installs: complete, pinned, and used."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
REFRESH = "deploy/refresh-lock.sh"
# The image's interpreter (python:3.11-slim on Linux); markers are judged for it.
IMAGE_ENVIRONMENT = {"python_version": "3.11", "python_full_version": "3.11.9",
                     "sys_platform": "linux", "platform_system": "Linux",
                     "implementation_name": "cpython",
                     "platform_python_implementation": "CPython", "os_name": "posix"}  # fmt: skip


@dataclass(frozen=True)
class Locked:
    """One entry of the lock."""

    name: str
    version: str
    marker: str
    hashes: tuple[str, ...]


def read_lock(text: str) -> dict[str, Locked]:
    """The entries of a `pip-compile`/`uv pip compile` lock (backslash-continued lines)."""
    logical = re.sub(r"\\\n", " ", text)
    entries = {}
    for line in logical.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)(?:\s*;\s*(.+?))?((?:\s+--hash=\S+)*)", line)
        assert match, f"not a pinned, hashed requirement: {line[:120]}"
        name, version, marker, hashes = match.groups()
        found = tuple(re.findall(r"--hash=(\S+)", hashes))
        entries[canonicalize_name(name)] = Locked(name, version, (marker or "").strip(), found)
    return entries


def project() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_entry_is_pinned_with_sha256_hashes() -> None:
    entries = read_lock(LOCK.read_text())
    assert len(entries) > 20
    for entry in entries.values():
        assert entry.hashes, f"{entry.name} has no hash"
        assert all(h.startswith("sha256:") and len(h) == 7 + 64 for h in entry.hashes), entry
        if entry.marker:
            Marker(entry.marker)  # parses


def test_every_runtime_and_build_dependency_is_locked_at_a_version_it_allows() -> None:
    data = project()
    entries = read_lock(LOCK.read_text())
    direct = [Requirement(text) for text in data["project"]["dependencies"]]  # type: ignore[index]
    build = [Requirement(text) for text in data["build-system"]["requires"]]  # type: ignore[index]
    missing, outside = [], []
    for requirement in [*direct, *build]:
        entry = entries.get(canonicalize_name(requirement.name))
        if entry is None:
            missing.append(str(requirement))
        elif not requirement.specifier.contains(entry.version, prereleases=True):
            outside.append(f"{requirement} locked at {entry.version}")
    assert missing == [], f"not in requirements.lock (run {REFRESH}): {missing}"
    assert outside == [], f"locked outside pyproject.toml's range (run {REFRESH}): {outside}"


def test_the_extras_of_runtime_dependencies_are_locked_too() -> None:
    # `sqlmodel[asyncio]` needs what sqlmodel's `asyncio` extra names (greenlet, via SQLAlchemy).
    entries = read_lock(LOCK.read_text())
    checked = 0
    for text in project()["project"]["dependencies"]:  # type: ignore[index]
        requirement = Requirement(text)
        for extra in requirement.extras:
            for line in metadata.requires(requirement.name) or []:
                inner = Requirement(line)
                if inner.marker is None or not inner.marker.evaluate(
                    {**IMAGE_ENVIRONMENT, "extra": extra}
                ):
                    continue
                if inner.marker.evaluate({**IMAGE_ENVIRONMENT, "extra": ""}):
                    continue  # not specific to the extra
                assert canonicalize_name(inner.name) in entries, f"{requirement}: {inner}"
                checked += 1
    assert checked, "no extra was checked"


def test_the_lock_names_its_refresh_command_and_the_command_exists() -> None:
    header = LOCK.read_text().splitlines()[:3]
    assert any(line.strip("# ").strip() == REFRESH for line in header), header
    script = ROOT / REFRESH
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "--generate-hashes" in text
    assert "requirements.lock" in text
    assert "build-system" in text  # the build backend is pinned too


def test_the_image_installs_the_lock_with_hashes_then_the_package_without_dependencies() -> None:
    dockerfile = (ROOT / "deploy/Dockerfile").read_text()
    instructions = re.sub(r"\\\n", " ", dockerfile).splitlines()

    def first(pattern: str) -> int:
        return next(i for i, line in enumerate(instructions) if re.search(pattern, line))

    copy_lock = first(r"^COPY\s+requirements\.lock\s")
    install_lock = first(r"pip install\s.*--require-hashes\s.*-r requirements\.lock")
    install_package = first(r"pip install\s.*--no-deps\s.*\s\.(\s|$)")
    assert copy_lock < install_lock < install_package
    # Nothing else is installed by name: every pip install reads the lock or the package.
    for line in instructions:
        for command in re.findall(r"pip install ([^&]*)", line):
            assert "-r requirements.lock" in command or re.search(r"\s\.(\s|$)", command + " ")
