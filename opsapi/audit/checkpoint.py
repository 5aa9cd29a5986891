"""Signed audit checkpoints: where the archived part of the chain ends and the kept part begins.

A checkpoint says "the events from the anchor (the previous checkpoint's last event, or the
chain's start) up to `last_id`, `events` of them, ending with hash `last_hash`, are in the
archive file `archive_name` whose sha256 is `archive_sha256`". It is signed with Ed25519: the
private key stays with whoever runs `opsapi audit archive` (`OPSAPI_AUDIT_ARCHIVE_KEY_FILE`,
by default in the data directory), while the public key travels with every checkpoint, so an
archive and its checkpoint can be verified anywhere, offline, without any secret — and a
verifier that can check a checkpoint cannot forge one (an HMAC key would let it). Pin the key
id (`key_id`, the sha256 of the raw public key) wherever you keep the chain's anchors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlmodel import SQLModel

from opsapi.audit.chain import GENESIS
from opsapi.audit.models import AuditCheckpoint

log = logging.getLogger("opsapi.audit")

CHECKPOINTS: sa.Table = SQLModel.metadata.tables[AuditCheckpoint.__tablename__]
# What a signature covers starts with this, so it can never pass for another message.
_DOMAIN = b"opsapi-audit-checkpoint/1\n"
SIGNED_FIELDS = (
    "created_at", "archived_before", "anchor_id", "anchor_hash", "first_id", "last_id",
    "last_hash", "events", "archive_name", "archive_sha256", "key_id",
)  # fmt: skip


def timestamp(value: datetime) -> str:
    """RFC 3339 UTC with microseconds, as checkpoints and archives write times."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint, as stored and as written next to its archive (`FILE.checkpoint.json`)."""

    id: int | None
    created_at: str
    archived_before: str
    anchor_id: int | None
    anchor_hash: str
    first_id: int
    last_id: int
    last_hash: str
    events: int
    archive_name: str
    archive_sha256: str
    key_id: str
    public_key: str
    signature: str

    def message(self) -> bytes:
        """The bytes the signature covers: the signed fields as sorted, compact JSON."""
        fields = {name: getattr(self, name) for name in SIGNED_FIELDS}
        return _DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()

    def problem(self) -> str | None:
        """Why the signature does not hold (None when it does): a key id that is not the
        public key's, an unreadable key or signature, or a signature over other values."""
        try:
            raw = base64.b64decode(self.public_key, validate=True)
            signature = base64.b64decode(self.signature, validate=True)
            if hashlib.sha256(raw).hexdigest() != self.key_id:
                return "checkpoint key_id is not the sha256 of its public key"
            Ed25519PublicKey.from_public_bytes(raw).verify(signature, self.message())
        except (binascii.Error, ValueError):
            return "checkpoint public key or signature unreadable"
        except InvalidSignature:
            return "checkpoint signature invalid"
        return None

    def as_dict(self) -> dict[str, Any]:
        """Every field, as JSON (the companion file, the CLI's answer)."""
        return asdict(self)

    def summary(self) -> dict[str, Any]:
        """What a verification answer shows of the checkpoint it starts from."""
        return {
            "id": self.id,
            "last_id": self.last_id,
            "last_hash": self.last_hash,
            "events": self.events,
            "created_at": self.created_at,
            "archive": self.archive_name,
            "archive_sha256": self.archive_sha256,
            "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        """A checkpoint from its JSON form; ValueError names what is missing or mistyped."""
        values: dict[str, Any] = {}
        for name, kind in _FIELD_TYPES.items():
            value = data.get(name)
            nullable = value is None and name in ("id", "anchor_id")
            if not nullable and (isinstance(value, bool) or not isinstance(value, kind)):
                raise ValueError(f"checkpoint field {name!r} missing or not {kind.__name__}")
            values[name] = value
        return cls(**values)

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Checkpoint:
        """A checkpoint from its table row."""
        return cls(
            id=int(row["id"]),
            created_at=timestamp(row["created_at"]),
            archived_before=timestamp(row["archived_before"]),
            anchor_id=None if row["anchor_id"] is None else int(row["anchor_id"]),
            anchor_hash=str(row["anchor_hash"]),
            first_id=int(row["first_id"]),
            last_id=int(row["last_id"]),
            last_hash=str(row["last_hash"]),
            events=int(row["events"]),
            archive_name=str(row["archive_name"]),
            archive_sha256=str(row["archive_sha256"]),
            key_id=str(row["key_id"]),
            public_key=str(row["public_key"]),
            signature=str(row["signature"]),
        )

    def row(self) -> dict[str, Any]:
        """The column values to insert (the database assigns `id`)."""
        values = {name: getattr(self, name) for name in SIGNED_FIELDS}
        values["created_at"] = _parse(self.created_at)
        values["archived_before"] = _parse(self.archived_before)
        values["public_key"] = self.public_key
        values["signature"] = self.signature
        return values


_FIELD_TYPES: dict[str, type] = {
    "id": int, "created_at": str, "archived_before": str, "anchor_id": int, "anchor_hash": str,
    "first_id": int, "last_id": int, "last_hash": str, "events": int, "archive_name": str,
    "archive_sha256": str, "key_id": str, "public_key": str, "signature": str,
}  # fmt: skip


def _parse(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


class CheckpointKey:
    """The Ed25519 key that signs checkpoints."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = base64.b64encode(raw).decode()
        self.key_id = hashlib.sha256(raw).hexdigest()

    def sign(self, unsigned: Checkpoint) -> Checkpoint:
        """`unsigned` with this key's id, public key and signature."""
        keyed = _replace(unsigned, key_id=self.key_id, public_key=self.public_key, signature="")
        signature = base64.b64encode(self._private.sign(keyed.message())).decode()
        return _replace(keyed, signature=signature)

    @classmethod
    def load_or_create(cls, path: Path) -> CheckpointKey:
        """The key at `path` (PKCS#8 PEM); a new one is generated and stored (mode 0600) when
        there is none."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls._create(path)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("checkpoint signing key %s is accessible to others (mode %o)", path, mode)
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def _create(cls, path: Path) -> CheckpointKey:
        private = Ed25519PrivateKey.generate()
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 under a temporary name, then linked into place: a crash leaves no key
        # or a whole one, and two processes racing end up sharing the one that won.
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as tmp:
                tmp.write(pem)
                tmp.flush()
                os.fsync(tmp.fileno())
            try:
                os.link(tmp_name, path)
            except FileExistsError:
                return cls.load_or_create(path)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
        log.info("generated the checkpoint signing key %s", path)
        return cls(private)


def _replace(checkpoint: Checkpoint, **changes: Any) -> Checkpoint:
    return Checkpoint(**{**asdict(checkpoint), **changes})


def unsigned(
    *,
    created_at: datetime,
    archived_before: datetime,
    anchor_id: int | None,
    anchor_hash: str,
    first_id: int,
    last_id: int,
    last_hash: str,
    events: int,
    archive_name: str,
    archive_sha256: str,
) -> Checkpoint:
    """A checkpoint still to be signed (`CheckpointKey.sign`)."""
    return Checkpoint(
        id=None,
        created_at=timestamp(created_at),
        archived_before=timestamp(archived_before),
        anchor_id=anchor_id,
        anchor_hash=anchor_hash,
        first_id=first_id,
        last_id=last_id,
        last_hash=last_hash,
        events=events,
        archive_name=archive_name,
        archive_sha256=archive_sha256,
        key_id="",
        public_key="",
        signature="",
    )


async def read_checkpoints(connection: AsyncConnection) -> list[Checkpoint]:
    """Every checkpoint, oldest first (one per archive run: a handful a year)."""
    result = await connection.execute(sa.select(CHECKPOINTS).order_by(CHECKPOINTS.c.last_id))
    return [Checkpoint.from_row(row._mapping) for row in result]


async def latest_checkpoint(connection: AsyncConnection) -> Checkpoint | None:
    """The checkpoint covering the most events, or None."""
    query = sa.select(CHECKPOINTS).order_by(CHECKPOINTS.c.last_id.desc()).limit(1)
    row = (await connection.execute(query)).first()
    return None if row is None else Checkpoint.from_row(row._mapping)


def chain_problem(checkpoints: Sequence[Checkpoint]) -> dict[str, Any] | None:
    """The first checkpoint (oldest first) whose signature fails or that does not continue the
    one before it (the first must start at the chain's start), as a `first_broken`; or None."""
    anchor_id: int | None = None
    anchor_hash = GENESIS
    for checkpoint in checkpoints:
        reason = checkpoint.problem()
        if reason is None and (checkpoint.anchor_id, checkpoint.anchor_hash) != (
            anchor_id,
            anchor_hash,
        ):
            reason = "checkpoint does not continue the previous one"
        if reason is not None:
            return {"id": checkpoint.last_id, "checkpoint_id": checkpoint.id, "reason": reason}
        anchor_id, anchor_hash = checkpoint.last_id, checkpoint.last_hash
    return None
