#!/bin/sh
# Refresh requirements.lock: every runtime dependency of pyproject.toml, and the build backend
# (its [build-system] requires, so that the image builds opsapi without fetching anything
# unpinned), resolved from PyPI for CPython 3.11 on every platform, each pinned with the sha256
# of every file PyPI serves for it. deploy/Dockerfile installs exactly this set.
#
#   deploy/refresh-lock.sh                    # newest versions allowed by pyproject.toml
#   deploy/refresh-lock.sh --upgrade-package starlette   # extra arguments go to uv
#
# Needs uv (pip install uv). Run it after changing dependencies in pyproject.toml; the tests
# (tests/deploy/test_lock.py) fail until the lock covers them.
set -eu
cd "$(dirname "$0")/.."
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' |
    uv pip compile pyproject.toml - \
        --generate-hashes --universal --python-version 3.11 \
        --custom-compile-command deploy/refresh-lock.sh \
        --output-file requirements.lock --quiet "$@"
