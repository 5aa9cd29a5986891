"""The `opsapi audit` commands: `archive` (export, checkpoint, remove) and `verify-archive`
(offline, no database). Kept apart from `archive.py` so that building the command line costs
no imports."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_HEAD = re.compile(r"([1-9][0-9]{0,17}):([0-9a-fA-F]{64})")
_KEY_ID = re.compile(r"[0-9a-fA-F]{64}")


def add_audit_commands(commands: Any) -> None:
    """Add `audit archive` and `audit verify-archive` to the `opsapi` subcommands."""
    audit = commands.add_parser("audit", help="archive old audit events; verify an archive")
    actions = audit.add_subparsers(dest="audit_command", required=True)
    archive = actions.add_parser(
        "archive",
        help="export the events older than DATE to FILE, checkpoint, then remove them",
        description="Export the audit events older than DATE (NDJSON with a manifest), verify "
        "the file, record a signed checkpoint, then remove the archived events. Safe to run "
        "again after an interruption.",
    )
    archive.add_argument(
        "--before",
        required=True,
        metavar="DATE",
        help="2026-01-01 (midnight UTC) or an RFC 3339 time with an offset",
    )
    archive.add_argument("--out", required=True, type=Path, metavar="FILE")
    archive.add_argument("--key", type=Path, metavar="PEM",
                         help="Ed25519 key signing the checkpoint (created if missing; default "
                              "OPSAPI_DATA_DIR/audit-archive-key.pem)")  # fmt: skip
    verify = actions.add_parser(
        "verify-archive",
        help="verify an archive file offline (no database)",
        description="Verify an archive: every event's hash and link, the manifest, and the "
        "signed checkpoint (FILE.checkpoint.json when present). Exit 0 intact, 1 not.",
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    verify.add_argument(
        "--checkpoint",
        type=Path,
        metavar="JSON",
        help="the signed checkpoint (default FILE.checkpoint.json if present)",
    )
    verify.add_argument("--key-id", metavar="HEX",
                        help="require the checkpoint to be signed by this key id")  # fmt: skip
    verify.add_argument("--expect-head", metavar="ID:HASH",
                        help="an event (an anchor kept earlier) the archive must hold")  # fmt: skip


def run_audit(args: argparse.Namespace) -> int:
    """Run an `opsapi audit` command; exit 0 done, 1 failed or not intact, 2 bad arguments."""
    if args.audit_command == "verify-archive":
        return _verify_archive(args)
    return _archive(args)


def _fail(message: str, code: int) -> int:
    print(f"opsapi audit: {message}", file=sys.stderr)
    return code


def _verify_archive(args: argparse.Namespace) -> int:
    from opsapi.audit.archive import Expected, companion_path, describe_break, verify_file
    from opsapi.audit.checkpoint import Checkpoint

    if args.key_id is not None and not _KEY_ID.fullmatch(args.key_id):
        return _fail("--key-id must be 64 hex digits (a checkpoint's key_id)", 2)
    head = None
    if args.expect_head is not None:
        match = _HEAD.fullmatch(args.expect_head)
        if match is None:
            return _fail("--expect-head must be ID:HASH (an event id and its 64-hex hash)", 2)
        head = (int(match.group(1)), match.group(2).lower())
    checkpoint_file = args.checkpoint
    if checkpoint_file is None and companion_path(args.file).exists():
        checkpoint_file = companion_path(args.file)
    checkpoint = None
    try:
        if checkpoint_file is not None:
            data = json.loads(checkpoint_file.read_text("utf-8"))
            if not isinstance(data, dict):
                return _fail(f"{checkpoint_file}: not a checkpoint (not a JSON object)", 1)
            checkpoint = Checkpoint.from_dict(data)
    except OSError as error:
        return _fail(f"cannot read {error.filename}: {error.strerror}", 1)
    except ValueError as error:
        return _fail(f"{checkpoint_file}: not a checkpoint ({error})", 1)
    try:
        report = verify_file(args.file, Expected(checkpoint, args.key_id, head))
    except OSError as error:
        return _fail(f"cannot read {error.filename}: {error.strerror}", 1)
    print(json.dumps(report, indent=2))
    if not report["intact"]:
        return _fail(f"verify-archive: {describe_break(report)}", 1)
    if checkpoint is None:
        print("opsapi audit: no checkpoint given: the chain in the file is intact, but nothing "
              "says it is the archive the database recorded", file=sys.stderr)  # fmt: skip
    return 0


def _before(raw: str) -> datetime:
    from opsapi.audit.query import parse_timestamp
    from opsapi.errors import Unprocessable

    if _DATE.fullmatch(raw):
        try:
            return datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            raise ValueError("--before is not a date") from None
    try:
        return parse_timestamp("--before", raw)
    except Unprocessable:
        raise ValueError(
            "--before must be a date (2026-01-01, midnight UTC) or an RFC 3339 time with an "
            "offset (2026-01-01T00:00:00Z)"
        ) from None


def _archive(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from opsapi.audit.archive import ArchiveError, archive
    from opsapi.audit.checkpoint import CheckpointKey
    from opsapi.cli import describe_failure, settings_problems
    from opsapi.config import Settings
    from opsapi.storage.db import create_engine

    try:
        before = _before(args.before)
    except ValueError as error:
        return _fail(str(error), 2)
    if before > datetime.now(UTC):
        return _fail("--before is in the future: only past events can be archived", 2)
    out: Path = args.out
    if not out.parent.is_dir():
        return _fail(f"--out: directory {out.parent} does not exist", 2)
    try:
        settings = Settings()
    except ValidationError as error:
        return _fail(f"invalid settings: {settings_problems(error)}", 2)

    def progress(line: str) -> None:
        print(f"opsapi audit archive: {line}", file=sys.stderr, flush=True)

    async def run() -> dict[str, Any]:
        key = CheckpointKey.load_or_create(args.key or settings.data_dir / "audit-archive-key.pem")
        engine = create_engine(settings.database_url, limits=settings.database_limits())
        try:
            return await archive(engine, before=before, out=out, key=key, progress=progress)
        finally:
            await engine.dispose()

    try:
        result = asyncio.run(run())
    except KeyboardInterrupt:
        return 130
    except ArchiveError as error:
        return _fail(f"archive: {error}", 1)
    except Exception as error:
        return _fail(f"archive: {describe_failure(error, settings)}", 1)
    print(json.dumps(result, indent=2))
    return 0
