"""Archiving old audit events: export, verify, checkpoint, and only then remove.

`archive()` moves the oldest part of the chain into an NDJSON file:

1. the range is the longest run of events from the latest checkpoint (or the chain's start),
   in id order, that are all older than `before` (an older event appended after a newer one
   waits for the next archive: the chain is cut at one place only);
2. the events are written to `FILE.partial`, one per line, with every column (`prev_hash`
   and `hash` included), in batches (memory stays flat), then a last line
   `{"manifest": {...}}`: first and last id, count, last hash, and the anchor the range
   starts from (the previous checkpoint's last id and hash, or none and 64 zeros);
3. the file is read back and verified (`verify_file`: every link from the anchor, every hash,
   the manifest), fsynced, and renamed to FILE;
4. a checkpoint signed with Ed25519 (`checkpoint.py`) is committed, with an `audit.archive`
   event, in one transaction; the database checks it against the events it covers;
5. the signed checkpoint is written next to the archive (`FILE.checkpoint.json`);
6. only then are the archived events removed, in batches, through the one path the database
   allows (`audit_archive_delete()` on PostgreSQL; on SQLite a DELETE of covered events).

Killed at any point, nothing is lost and running the same command again completes the work:
before step 4 the database is untouched and the export is simply redone (same range, same
bytes); after it, a re-run finishes the removal the checkpoint allows.
"""

from __future__ import annotations

import asyncio
import getpass
import hashlib
import json
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from opsapi.audit import chain
from opsapi.audit.chain import GENESIS, legacy_link, link
from opsapi.audit.checkpoint import (
    CHECKPOINTS,
    Checkpoint,
    CheckpointKey,
    latest_checkpoint,
    read_checkpoints,
    timestamp,
    unsigned,
)
from opsapi.audit.models import Outcome, Source
from opsapi.audit.query import AUDIT, COLUMNS, _document
from opsapi.audit.service import event_row

ARCHIVE_FORMAT = "opsapi-audit-archive/1"
ACTOR = "audit-archive"
_CHECKPOINT_LOCK = 724_113_003  # the lock the checkpoint insert trigger takes (migration 0011)
_HASH = re.compile(r"[0-9a-f]{64}")
_COLUMNS = frozenset(COLUMNS)

Progress = Callable[[str], None]


class ArchiveError(Exception):
    """The archive cannot go on; nothing that is not archived and checkpointed was removed."""


def companion_path(archive: Path) -> Path:
    """Where the signed checkpoint of `archive` is written: `FILE.checkpoint.json`."""
    return archive.with_name(archive.name + ".checkpoint.json")


def partial_path(path: Path) -> Path:
    """The name a file has while it is written (`FILE.partial`); renamed once complete."""
    return path.with_name(path.name + ".partial")


# --- offline verification -------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What a verification must also find: a checkpoint naming the file, a signing key, an
    event (an anchor kept earlier) with its hash."""

    checkpoint: Checkpoint | None = None
    key_id: str | None = None
    head: tuple[int, str] | None = None


def verify_file(path: Path, expected: Expected | None = None) -> dict[str, Any]:
    """The verification report of an archive file, read once, line by line (no database).

    Checks every event's link to the one before it (the first one's to the manifest's
    anchor), every event's hash, increasing ids, the manifest (last line) against the events,
    and, when given, the checkpoint (signature, the file's sha256, the same range), the key
    id and an expected event. The first problem is reported with its line number.
    """
    expected = expected or Expected()
    digest = hashlib.sha256()
    state = _Walk()
    manifest: dict[str, Any] | None = None
    number = 0
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            digest.update(raw)
            if manifest is not None:
                return _broken(path, number, None, "data after the manifest")
            try:
                item = json.loads(raw)
            except ValueError:
                return _broken(path, number, None, "not JSON")
            if isinstance(item, dict) and set(item) == {"manifest"}:
                if not isinstance(item["manifest"], dict):
                    return _broken(path, number, None, "manifest is not an object")
                manifest = item["manifest"]
                continue
            problem = state.step(item, expected.head)
            if problem is not None:
                return _broken(path, number, *problem)
    if manifest is None:
        return _broken(path, number, None, "no manifest: the archive is incomplete")
    problem_text = _manifest_problem(manifest, state)
    if problem_text is not None:
        return _broken(path, number, None, problem_text)
    sha256 = digest.hexdigest()
    report: dict[str, Any] = {
        "intact": True,
        "archive": path.name,
        "sha256": sha256,
        "events": state.count,
        "first_id": state.first_id,
        "last_id": state.last_id,
        "last_hash": state.last_hash,
        "anchor": manifest["anchor"],
    }
    if state.legacy:
        report["legacy_number_events"] = state.legacy
    checkpoint = expected.checkpoint
    if checkpoint is not None:
        problem_text = _checkpoint_problem(checkpoint, manifest, sha256, expected.key_id)
        if problem_text is not None:
            return _broken(path, None, None, problem_text)
        report["checkpoint"] = {"id": checkpoint.id, "key_id": checkpoint.key_id,
                                "signature": "valid"}  # fmt: skip
    elif expected.key_id is not None:
        return _broken(path, None, None, "a key id to check needs the checkpoint (--checkpoint)")
    if expected.head is not None:
        head_id, head_hash = expected.head
        found = state.head_found
        if found != head_hash:
            reason = f"expected head {'missing' if found is None else 'differs'}"
            return {**_broken(path, state.head_line, head_id, reason),
                    "expected": head_hash, "found": found}  # fmt: skip
        report["expected_head"] = {"id": head_id, "hash": head_hash, "matches": True}
    return report


class _Walk:
    """The chain as it is read: what the next event must link to, and what was seen."""

    def __init__(self) -> None:
        self.count = 0
        self.legacy = 0
        self.first_id: int | None = None
        self.first_prev: str | None = None
        self.last_id: int | None = None
        self.last_hash: str | None = None
        self.head_found: str | None = None
        self.head_line: int | None = None

    def step(
        self, item: Any, head: tuple[int, str] | None
    ) -> tuple[int | None, str, str | None, str | None] | None:
        """Check one event; (id, reason, expected, found) when it breaks the chain."""
        if not isinstance(item, dict) or not item.keys() >= _COLUMNS:
            return None, "not an audit event (missing columns)", None, None
        event_id, prev_hash, stored = item["id"], item["prev_hash"], item["hash"]
        if not (isinstance(event_id, int) and _is_hash(prev_hash) and _is_hash(stored)):
            return None, "not an audit event (id, prev_hash or hash malformed)", None, None
        if self.last_hash is not None and prev_hash != self.last_hash:
            return event_id, "prev_hash mismatch", self.last_hash, prev_hash
        if self.last_id is not None and event_id <= self.last_id:
            return event_id, "id not after the previous event's", None, None
        recomputed = link(prev_hash, item)
        if recomputed != stored:
            if not legacy_link(prev_hash, item, stored):
                return event_id, "hash mismatch", recomputed, stored
            self.legacy += 1
        if self.first_id is None:
            self.first_id, self.first_prev = event_id, prev_hash
        self.count += 1
        self.last_id, self.last_hash = event_id, stored
        if head is not None and event_id == head[0]:
            self.head_found, self.head_line = stored, self.count
        return None


def _is_hash(value: Any) -> bool:
    return isinstance(value, str) and _HASH.fullmatch(value) is not None


def _manifest_problem(manifest: dict[str, Any], walk: _Walk) -> str | None:
    anchor = manifest.get("anchor")
    if manifest.get("format") != ARCHIVE_FORMAT or not isinstance(anchor, dict):
        return f"manifest is not an {ARCHIVE_FORMAT} manifest"
    if walk.count == 0:
        return "no events"
    if anchor.get("hash") != walk.first_prev:
        return "the first event does not follow the manifest's anchor"
    facts = {"first_id": walk.first_id, "last_id": walk.last_id, "events": walk.count,
             "last_hash": walk.last_hash}  # fmt: skip
    for name, seen in facts.items():
        if manifest.get(name) != seen:
            return f"manifest {name} is {manifest.get(name)!r}, the events say {seen!r}"
    return None


def _checkpoint_problem(
    checkpoint: Checkpoint, manifest: dict[str, Any], sha256: str, key_id: str | None
) -> str | None:
    reason = checkpoint.problem()
    if reason is not None:
        return reason
    if key_id is not None and checkpoint.key_id != key_id.lower():
        return f"checkpoint signed by key {checkpoint.key_id}, not {key_id}"
    if checkpoint.archive_sha256 != sha256:
        return "the checkpoint names another file (sha256 differs)"
    anchor = manifest["anchor"]
    if (checkpoint.anchor_id, checkpoint.anchor_hash) != (anchor.get("id"), anchor.get("hash")):
        return "the checkpoint starts from another anchor than the manifest"
    for name in ("first_id", "last_id", "events", "last_hash"):
        if getattr(checkpoint, name) != manifest[name]:
            return f"checkpoint {name} differs from the manifest"
    return None


def _broken(
    path: Path,
    line: int | None,
    event_id: int | None,
    reason: str,
    expected: str | None = None,
    found: str | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {"intact": False, "archive": path.name, "line": line,
                              "id": event_id, "reason": reason}  # fmt: skip
    if expected is not None or found is not None:
        report["expected"], report["found"] = expected, found
    return report


def describe_break(report: dict[str, Any]) -> str:
    """One line naming where an archive is broken: `FILE line 42 (event 1041): hash
    mismatch`."""
    where = report["archive"]
    if report.get("line") is not None:
        where += f" line {report['line']}"
    if report.get("id") is not None:
        where += f" (event {report['id']})"
    return f"{where}: {report['reason']}"


# --- archiving ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    anchor_id: int | None
    anchor_hash: str
    last_id: int
    events: int


async def archive(
    engine: AsyncEngine,
    *,
    before: datetime,
    out: Path,
    key: CheckpointKey,
    progress: Progress = lambda _: None,
    batch_size: int = 5000,
    remove_batch: int = 10_000,
) -> dict[str, Any]:
    """Archive the events older than `before` into `out`, checkpoint, then remove them.

    Returns what was done: `archive`, `checkpoint` (signed, as stored), `removed`; with
    `resumed` when this run finished the removal of an earlier, interrupted one, or
    `archived: 0` when there was nothing to archive. Raises ArchiveError when it cannot go
    on (the chain is broken in the range, `out` holds another checkpoint's archive, …).
    """
    async with engine.connect() as connection:
        checkpoints = await read_checkpoints(connection)
    latest = checkpoints[-1] if checkpoints else None
    existing = await asyncio.to_thread(_sha256, out)
    if latest is not None and existing == latest.archive_sha256 and out.name == latest.archive_name:
        # The same command again (after an interruption, or after it completed).
        _write_companion(out, latest)
        removed = await _remove(engine, latest.last_id, remove_batch, progress)
        progress(f"archive {out} of checkpoint {latest.id} is complete")
        return {"archive": str(out), "checkpoint": latest.as_dict(), "removed": removed,
                "resumed": True}  # fmt: skip
    for checkpoint in checkpoints:
        if existing == checkpoint.archive_sha256:
            raise ArchiveError(
                f"{out} is the archive of checkpoint {checkpoint.id} (events "
                f"{checkpoint.first_id}-{checkpoint.last_id}); it is never overwritten: "
                "choose another --out"
            )
    removed = 0
    if latest is not None:
        # An earlier run committed its checkpoint but did not finish removing.
        removed = await _remove(engine, latest.last_id, remove_batch, progress)
    span = await _range(engine, latest, before)
    if span is None:
        after = f" after checkpoint {latest.id}" if latest else ""
        progress(f"nothing to archive: no event{after} is older than {timestamp(before)}")
        return {"archive": None, "archived": 0, "removed": removed}
    first = "the chain's start" if span.anchor_id is None else f"event {span.anchor_id}"
    progress(f"exporting {span.events} events after {first} up to {span.last_id} to {out}")
    partial = partial_path(out)
    await _export(engine, span, before, partial, batch_size)
    report = verify_file(partial)
    if not report["intact"]:
        raise ArchiveError(
            f"the exported events do not verify, nothing was removed: {describe_break(report)}"
        )
    if (report["last_id"], report["events"]) != (span.last_id, span.events):
        raise ArchiveError("the exported range changed while it was written; run again")
    os.replace(partial, out)
    _fsync_directory(out.parent)
    progress(f"exported and verified {report['events']} events, sha256 {report['sha256']}")
    checkpoint = await _commit_checkpoint(engine, span, report, before, out, key)
    progress(f"checkpoint {checkpoint.id} committed (key {checkpoint.key_id})")
    _write_companion(out, checkpoint)
    removed += await _remove(engine, checkpoint.last_id, remove_batch, progress)
    return {"archive": str(out), "checkpoint": checkpoint.as_dict(), "removed": removed}


async def _range(engine: AsyncEngine, latest: Checkpoint | None, before: datetime) -> _Range | None:
    anchor_id = latest.last_id if latest else None
    ids = AUDIT.c.id
    after = [ids > anchor_id] if anchor_id is not None else []
    async with engine.connect() as connection:
        head = await connection.scalar(sa.select(sa.func.max(ids)))
        if head is None:
            return None
        stop = await connection.scalar(
            sa.select(sa.func.min(ids)).where(*after, ids <= head, AUDIT.c.at >= _at(before))
        )
        bound = [ids <= head] if stop is None else [ids < stop]
        row = (
            await connection.execute(
                sa.select(sa.func.max(ids), sa.func.count())
                .select_from(AUDIT)
                .where(*after, *bound)
            )
        ).one()
    if row[0] is None:
        return None
    return _Range(anchor_id, latest.last_hash if latest else GENESIS, int(row[0]), int(row[1]))


def _at(value: datetime) -> sa.BindParameter[datetime]:
    from opsapi.storage.types import UTCDateTime

    return sa.bindparam(None, value, type_=UTCDateTime())


async def _export(
    engine: AsyncEngine, span: _Range, before: datetime, partial: Path, batch_size: int
) -> None:
    """Write the range's events, then the manifest, to `partial`; fsynced."""
    document = _document(engine.dialect.name)
    after = span.anchor_id
    first_id: int | None = None
    last_hash = span.anchor_hash
    count = 0
    # Opened without removing what is there: a leftover from a killed run is overwritten.
    with partial.open("wb") as out:
        while True:
            query = sa.select(AUDIT.c.id, AUDIT.c.hash, document).where(AUDIT.c.id <= span.last_id)
            if after is not None:
                query = query.where(AUDIT.c.id > after)
            async with engine.connect() as connection:
                rows = (
                    await connection.execute(query.order_by(AUDIT.c.id).limit(batch_size))
                ).all()
            if not rows:
                break
            out.write("".join([row[2] + "\n" for row in rows]).encode())
            if first_id is None:
                first_id = int(rows[0][0])
            count += len(rows)
            after, last_hash = int(rows[-1][0]), str(rows[-1][1])
        manifest = {
            "format": ARCHIVE_FORMAT,
            "anchor": {"id": span.anchor_id, "hash": span.anchor_hash},
            "first_id": first_id,
            "last_id": after,
            "events": count,
            "last_hash": last_hash,
            "before": timestamp(before),
        }
        out.write(json.dumps({"manifest": manifest}, separators=(",", ":")).encode() + b"\n")
        out.flush()
        os.fsync(out.fileno())


async def _commit_checkpoint(
    engine: AsyncEngine,
    span: _Range,
    report: dict[str, Any],
    before: datetime,
    out: Path,
    key: CheckpointKey,
) -> Checkpoint:
    """Record the signed checkpoint and its audit event in one transaction."""
    now = datetime.now(UTC)
    checkpoint = key.sign(
        unsigned(
            created_at=now,
            archived_before=before,
            anchor_id=span.anchor_id,
            anchor_hash=span.anchor_hash,
            first_id=report["first_id"],
            last_id=report["last_id"],
            last_hash=report["last_hash"],
            events=report["events"],
            archive_name=out.name,
            archive_sha256=report["sha256"],
        )
    )
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({_CHECKPOINT_LOCK})"))
        latest = await latest_checkpoint(connection)
        if (latest.last_id if latest else None) != span.anchor_id:
            raise ArchiveError("another archive recorded a checkpoint meanwhile; run again")
        insert = sa.insert(CHECKPOINTS).values(**checkpoint.row()).returning(CHECKPOINTS.c.id)
        checkpoint = replace(checkpoint, id=int((await connection.execute(insert)).scalar_one()))
        await _audit(connection, checkpoint, now)
    return checkpoint


async def _audit(connection: AsyncConnection, checkpoint: Checkpoint, now: datetime) -> None:
    details = {
        "checkpoint_id": checkpoint.id,
        "anchor": {"id": checkpoint.anchor_id, "hash": checkpoint.anchor_hash},
        "first_id": checkpoint.first_id,
        "last_id": checkpoint.last_id,
        "last_hash": checkpoint.last_hash,
        "events": checkpoint.events,
        "before": checkpoint.archived_before,
        "archive": checkpoint.archive_name,
        "archive_sha256": checkpoint.archive_sha256,
        "key_id": checkpoint.key_id,
        "os_user": _os_user(),
        "host": socket.gethostname(),
    }
    row = event_row(at=now, actor=ACTOR, source=Source.SYSTEM, action="audit.archive",
                    outcome=Outcome.SUCCESS, details=details)  # fmt: skip
    await chain.append(connection, [row])


def _os_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None


async def _remove(engine: AsyncEngine, upto: int, batch: int, progress: Progress) -> int:
    """Remove the events up to `upto` (a checkpoint's last id), a batch per transaction."""
    removed = 0
    while True:
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                statement = sa.text("SELECT audit_archive_delete(:upto, :rows)")
                count = int(
                    (
                        await connection.execute(statement, {"upto": upto, "rows": batch})
                    ).scalar_one()
                )
            else:
                statement = sa.text(
                    "DELETE FROM audit_event WHERE id IN"
                    " (SELECT id FROM audit_event WHERE id <= :upto ORDER BY id LIMIT :rows)"
                )
                count = (
                    await connection.execute(statement, {"upto": upto, "rows": batch})
                ).rowcount
        removed += count
        if count < batch:
            break
    if removed:
        progress(f"removed {removed} archived events (up to {upto})")
    return removed


def _write_companion(out: Path, checkpoint: Checkpoint) -> None:
    path = companion_path(out)
    partial = partial_path(path)
    with partial.open("w", encoding="utf-8") as file:
        json.dump(checkpoint.as_dict(), file, indent=2, sort_keys=True)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, path)
    _fsync_directory(out.parent)


def _sha256(path: Path) -> str | None:
    """The sha256 of the file at `path`, or None when there is none."""
    digest = hashlib.sha256()
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return None
    with file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(path: Path) -> None:
    # The rename itself must survive a crash, not only the file's bytes.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
