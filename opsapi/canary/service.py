"""Canary state in the database: load and lock, map rows to the machine and back.

Never commits, and knows nothing of HTTP: a refused event is raised as `Refused`, a domain value
that the HTTP layer maps to a problem.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.canary import machine
from opsapi.canary.freezes import FreezeWindow, holds_for
from opsapi.canary.machine import GatePhase, GateStatus, Refusal, RefusalCode, Step
from opsapi.canary.models import (
    FreezeRecord,
    Incident,
    RejectedVersion,
    RolloutRecord,
    ServiceRecord,
)
from opsapi.canary.policy import Policy
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.pagerduty.models import OutboxMessage
from opsapi.routers.base import slot_names
from opsapi.storage import rows

OPEN_STATE_VALUES = [state.value for state in machine.OPEN_STATES]


class Refused(Exception):
    """The machine (or the service layer) refused an event: nothing changed."""

    def __init__(self, refusal: Refusal, record: RolloutRecord | None = None) -> None:
        super().__init__(refusal.detail)
        self.refusal = refusal
        self.rollout_id = record.id if record is not None else None
        self.state = record.state if record is not None else None
        self.current_weight = record.desired_weight if record is not None else None


# Policies -------------------------------------------------------------------------------------


async def load_policy(service: str, *, default: Policy, session: AsyncSession) -> Policy:
    """The service's stored policy, or `default` for a service never configured."""
    record = await session.get(ServiceRecord, service)
    return policy_of(record, default)


def policy_of(record: ServiceRecord | None, default: Policy) -> Policy:
    """The policy a service row stores, or `default` when it stores none."""
    # A row created only to hold lifecycle state stores {}: it has no policy of its own.
    if record is None or not record.policy:
        return default
    try:
        key = orjson.dumps(record.policy, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # what orjson cannot write (an integer past 64 bits): not cached
        return Policy.model_validate(record.policy)
    # Every transition of a service reads its stored policy: validated once per document, not
    # per transition (policies are frozen and never changed in place, as the default one).
    found = _POLICIES.get(key)
    if found is None:
        found = Policy.model_validate(record.policy)
        if len(_POLICIES) >= _POLICIES_KEPT:
            _POLICIES.pop(next(iter(_POLICIES)))  # the oldest first
        _POLICIES[key] = found
    return found


# Validated policies by their stored document (sorted JSON), a bounded number of them.
_POLICIES: dict[bytes, Policy] = {}
_POLICIES_KEPT = 1024


async def save_policy(
    service: str,
    policy: Policy,
    *,
    default: Policy,
    actor: str,
    now: datetime,
    session: AsyncSession,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store `policy` for `service`; return the policy documents before and after."""
    record = await lock_service(service, now=now, session=session)
    before = policy_of(record, default).document()
    record.policy = policy.model_dump(mode="json", by_alias=True, exclude_none=True)
    record.updated_at = now
    record.updated_by = actor
    session.add(record)
    await session.flush()
    return before, policy.document()


# Services: lifecycle state ----------------------------------------------------------------------


async def lock_service(name: str, *, now: datetime, session: AsyncSession) -> ServiceRecord:
    """The service's row, created if missing (no policy of its own), locked for update."""
    # Transitions lock the service before its rollout. The row almost always exists: lock it
    # in one round trip; only a service's first writer creates it.
    found = await rows.lock_records(session, ServiceRecord, _LOCK_SERVICE, name)
    if found:
        return found[0]
    await _create_service(name, now=now, session=session)
    (record,) = await rows.lock_records(session, ServiceRecord, _LOCK_SERVICE, name)
    return record


async def _create_service(name: str, *, now: datetime, session: AsyncSession) -> None:
    # Concurrent first writers must not collide on the insert: create the row if missing,
    # then everyone locks the same row.
    dialect = session.bind.dialect.name if session.bind else "postgresql"
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    await session.exec(
        insert(ServiceRecord)
        .values(name=name, policy={}, updated_at=now, updated_by="system")
        .on_conflict_do_nothing(index_elements=["name"])
    )


_LOCK_SERVICE = "SELECT * FROM service WHERE name = $1 FOR UPDATE"


@dataclass
class Locked:
    """What a transition works on: the service's row and its latest rollout, locked in that
    order (stored records that `rows.save` writes), with what was read beside them when asked."""

    row: ServiceRecord
    record: RolloutRecord | None
    # The rollout's alerts and notifications as locked (None: not read).
    messages: list[OutboxMessage] | None = None
    # Rejections and holds at the lock's instant (None: not read).
    safety: Safety | None = None
    # The id a rollout this transition starts takes (None: not drawn; `rows.save` gives one).
    next_rollout_id: int | None = None


async def lock_for_transition(
    name: str,
    *,
    now: datetime,
    session: AsyncSession,
    outbox: bool = False,
    windows: Sequence[FreezeWindow] | None = None,
    new_rollout: bool = False,
) -> Locked:
    """The service's row and latest rollout, locked in that order; with the rollout's outbox
    rows when `outbox`, the service's safety when `windows` (the server's freeze windows)
    is given, and the id of a rollout to start when `new_rollout`. One round trip on
    PostgreSQL (migrations 0017, 0018), the same reads one by one on SQLite (no id drawn)."""
    if await rows.dialect_name(session) != "postgresql":
        row = await lock_service(name, now=now, session=session)
        record = await lock_latest_rollout(name, session=session)
        messages = (
            await pagerduty_outbox.of_rollout(session, record.id) if outbox and record else None
        )
        safety = None
        if windows is not None:
            safety = await safety_of(name, now=now, windows=windows, session=session)
        return Locked(row, record, messages, safety)
    args = (name, outbox, windows is not None, new_rollout)
    found, dialect = await rows.fetch(session, _TRANSITION_LOCK, *args)
    if not found:
        await _create_service(name, now=now, session=session)
        found, dialect = await rows.fetch(session, _TRANSITION_LOCK, *args)
    (locked,) = found
    read = _Read(locked, dialect)
    stored = read.one(ServiceRecord, "service_row")
    assert stored is not None  # the function returns no row without one
    row = rows.persistent(stored)
    record = read.one(RolloutRecord, "rollout_row")
    if record is not None:
        record = rows.persistent(record)
    messages = read.all(OutboxMessage, "outbox_rows") if outbox and record is not None else None
    safety = None
    if windows is not None:
        safety = Safety(frozenset(locked["rejected"]), read.holds(name, windows, now))
    return Locked(row, record, messages, safety, locked["next_rollout_id"])


@dataclass
class _Read:
    """One row of `transition_lock` or `_STATUS`: table rows (composite values) as records."""

    found: rows.Row
    dialect: Dialect

    def one(self, model: type[rows.ModelT], column: str) -> rows.ModelT | None:
        value = self.found[column]
        return None if value is None else rows.record_of(model, value, self.dialect)

    def all(self, model: type[rows.ModelT], column: str) -> list[rows.ModelT]:
        return [rows.record_of(model, value, self.dialect) for value in self.found[column] or ()]

    def holds(
        self, name: str, windows: Sequence[FreezeWindow], now: datetime
    ) -> tuple[machine.Hold, ...]:
        freezes = [window_of(record) for record in self.all(FreezeRecord, "freezes")]
        return _holds(name, self.all(Incident, "incidents"), [*windows, *freezes], now)


_TRANSITION_LOCK = "SELECT * FROM transition_lock($1, $2, $3, $4)"


@dataclass
class Status:
    """What a service's status shows, read together: its row (None: never seen), its latest
    rollout (None: none yet), that rollout's outbox rows and what holds the service now."""

    row: ServiceRecord | None
    record: RolloutRecord | None
    messages: list[OutboxMessage]
    holds: tuple[machine.Hold, ...]


async def status_of(
    name: str, *, now: datetime, windows: Sequence[FreezeWindow], session: AsyncSession
) -> Status:
    """The service's status rows (nothing locked). On PostgreSQL one statement, one snapshot,
    outside any transaction; on SQLite the same reads one by one."""
    if await rows.dialect_name(session) != "postgresql":
        record = await latest_rollout(name, session=session)
        row = await service_row(name, session=session)
        messages = await pagerduty_outbox.of_rollout(session, record.id) if record else []
        holds = await holds_of(name, now=now, windows=windows, session=session)
        return Status(row, record, messages, holds)
    (found,), dialect = await rows.fetch_alone(session, _STATUS, name)
    read = _Read(found, dialect)
    return Status(
        read.one(ServiceRecord, "service_row"),
        read.one(RolloutRecord, "rollout_row"),
        read.all(OutboxMessage, "outbox_rows"),
        read.holds(name, windows, now),
    )


_STATUS = (
    "SELECT (SELECT s FROM service s WHERE s.name = $1) AS service_row, "
    "(SELECT r FROM rollout r WHERE r.service = $1 ORDER BY r.id DESC LIMIT 1) AS rollout_row, "
    "ARRAY(SELECT o FROM outbox o WHERE o.rollout_id = "
    "(SELECT max(r.id) FROM rollout r WHERE r.service = $1) ORDER BY o.id) AS outbox_rows, "
    "ARRAY(SELECT i FROM incident i WHERE i.service = $1 AND i.resolved_at IS NULL "
    "ORDER BY i.opened_at) AS incidents, "
    "ARRAY(SELECT f FROM freeze_window f WHERE f.deleted_at IS NULL ORDER BY f.id) AS freezes"
)


def service_state(
    name: str,
    record: ServiceRecord | None,
    router: Mapping[str, Any],
    safety: Safety | None = None,
) -> machine.ServiceState:
    """The machine's view of a service, with the slots its router policy names, the versions
    it rejected and what holds changes to it now."""
    rejected, holds = (safety.rejected, safety.holds) if safety else (frozenset(), ())
    if record is None:
        return machine.ServiceState(name=name, slots=slot_names(router), rejected=rejected,
                                    holds=holds)  # fmt: skip
    return machine.ServiceState(
        name=record.name,
        slots=slot_names(router),
        stable_version=record.stable_version,
        stable_slot=record.stable_slot,
        previous_version=record.previous_version,
        previous_slot=record.previous_slot,
        rejected=rejected,
        holds=holds,
    )


@dataclass(frozen=True)
class Safety:
    """What stops changes to a service beyond its rollout: rejected versions and holds."""

    rejected: frozenset[str]
    holds: tuple[machine.Hold, ...]


async def safety_of(
    name: str, *, now: datetime, windows: Sequence[FreezeWindow], session: AsyncSession
) -> Safety:
    """The service's standing rejections, open incidents and freeze windows at `now`."""
    rejected, _ = await rows.fetch(
        session,
        "SELECT version FROM rejected_version WHERE service = $1 AND lifted_at IS NULL",
        name,
    )
    holds = await holds_of(name, now=now, windows=windows, session=session)
    return Safety(frozenset(row["version"] for row in rejected), holds)


async def holds_of(
    name: str, *, now: datetime, windows: Sequence[FreezeWindow], session: AsyncSession
) -> tuple[machine.Hold, ...]:
    """What holds starts and promotions of the service at `now`: open incidents, freezes."""
    incidents = await rows.fetch_records(
        session,
        Incident,
        "SELECT * FROM incident WHERE service = $1 AND resolved_at IS NULL ORDER BY opened_at",
        name,
    )
    return _holds(name, incidents, [*windows, *await api_windows(session)], now)


def _holds(
    name: str, incidents: Sequence[Incident], windows: Sequence[FreezeWindow], now: datetime
) -> tuple[machine.Hold, ...]:
    holds = [
        machine.Hold(machine.HoldKind.INCIDENT_OPEN, incident_detail(incident))
        for incident in incidents
    ]
    holds += holds_for(name, windows, now)
    return tuple(holds)


def incident_detail(incident: Incident) -> str:
    """How a hold names an open incident."""
    number = f" #{incident.number}" if incident.number is not None else ""
    detail = f"PagerDuty incident{number} ({incident.id}) is {incident.status}: {incident.title}"
    return detail + (f" {incident.html_url}" if incident.html_url else "")


async def api_windows(session: AsyncSession) -> list[FreezeWindow]:
    """The freeze windows admins set through the API (not deleted)."""
    records = await rows.fetch_records(
        session, FreezeRecord, "SELECT * FROM freeze_window WHERE deleted_at IS NULL ORDER BY id"
    )
    return [window_of(record) for record in records]


def window_of(row: FreezeRecord) -> FreezeWindow:
    """A stored freeze window as the pure evaluation sees it."""
    return FreezeWindow(
        name=row.name,
        services=tuple(row.services),
        reason=row.reason,
        starts_at=row.starts_at,
        ends_at=row.ends_at,
        cron=row.cron,
        duration=timedelta(seconds=row.duration_seconds) if row.duration_seconds else None,
        timezone=row.timezone,
        source="api",
        id=row.id,
    )


async def reject(
    record: RolloutRecord, version: str, reason: str, *, now: datetime, session: AsyncSession
) -> None:
    """Mark `version` rejected for the rollout's service (once; a standing one stays)."""
    dialect = session.bind.dialect.name if session.bind else "postgresql"
    insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    await session.exec(
        insert(RejectedVersion)
        .values(service=record.service, version=version, rollout_id=record.id,
                reason=reason[:2000], rejected_at=now)
        .on_conflict_do_nothing(
            index_elements=["service", "version"], index_where=sa.text("lifted_at IS NULL")
        )
    )  # fmt: skip


def store_service(record: ServiceRecord, state: machine.ServiceState, now: datetime) -> None:
    """Write the machine's new lifecycle state into the service row (untouched, `updated_at`
    included, when the state is the same)."""
    if rows.assign(
        record,
        stable_version=state.stable_version,
        stable_slot=state.stable_slot,
        previous_version=state.previous_version,
        previous_slot=state.previous_slot,
    ):
        record.updated_at = now


# Rollouts: loading ------------------------------------------------------------------------------


async def open_rollout(
    service: str, *, session: AsyncSession, lock: bool = False
) -> RolloutRecord | None:
    """The service's open rollout, locked for update when `lock` is set."""
    query = select(RolloutRecord).where(
        RolloutRecord.service == service, col(RolloutRecord.state).in_(OPEN_STATE_VALUES)
    )
    if lock:
        # Refresh what the session may already hold: decide on the row as locked, never on an
        # earlier, unlocked read of it.
        query = query.with_for_update().execution_options(populate_existing=True)
    return (await session.exec(query)).first()


async def latest_rollout(service: str, *, session: AsyncSession) -> RolloutRecord | None:
    """The service's most recent rollout, open or finished, as read (not tracked: to change
    it, `lock_latest_rollout`)."""
    found = await rows.fetch_records(session, RolloutRecord, _LATEST_ROLLOUT, service)
    return found[0] if found else None


async def lock_latest_rollout(service: str, *, session: AsyncSession) -> RolloutRecord | None:
    """The service's most recent rollout, locked for update and tracked by the session."""
    sql = f"{_LATEST_ROLLOUT} FOR UPDATE"
    found = await rows.lock_records(session, RolloutRecord, sql, service)
    return found[0] if found else None


_LATEST_ROLLOUT = "SELECT * FROM rollout WHERE service = $1 ORDER BY id DESC LIMIT 1"


async def service_row(name: str, *, session: AsyncSession) -> ServiceRecord | None:
    """The service's row as read (not tracked), None for a service never seen."""
    found = await rows.fetch_records(
        session, ServiceRecord, "SELECT * FROM service WHERE name = $1", name
    )
    return found[0] if found else None


async def list_open(*, session: AsyncSession) -> Sequence[RolloutRecord]:
    """Every open rollout, by service name."""
    query = (
        select(RolloutRecord)
        .where(col(RolloutRecord.state).in_(OPEN_STATE_VALUES))
        .order_by(col(RolloutRecord.service))
    )
    return (await session.exec(query)).all()


async def history(
    service: str, *, limit: int, before_id: int | None, session: AsyncSession
) -> Sequence[RolloutRecord]:
    """The service's rollouts, newest first, keyset-paginated by id."""
    query = select(RolloutRecord).where(RolloutRecord.service == service)
    if before_id is not None:
        query = query.where(col(RolloutRecord.id) < before_id)
    query = query.order_by(col(RolloutRecord.id).desc()).limit(limit)
    return (await session.exec(query)).all()


async def claim_due(
    *, now: datetime, limit: int, lease_until: datetime, session: AsyncSession
) -> list[tuple[RolloutRecord, datetime]]:
    """Open rollouts whose next evaluation is due, each with when it was due, leased until
    `lease_until` (their next evaluation pushed there) so no other replica takes them.
    Locked rows another replica holds are skipped. One statement on PostgreSQL."""
    if await rows.dialect_name(session) == "postgresql":
        found, dialect = await rows.fetch(
            session, _CLAIM_DUE, OPEN_STATE_VALUES, now, limit, lease_until
        )
        return [(rows.record_of(RolloutRecord, row, dialect), row["due_at"]) for row in found]
    query = (
        select(RolloutRecord)
        .where(
            col(RolloutRecord.state).in_(OPEN_STATE_VALUES),
            col(RolloutRecord.next_evaluation_at) <= now,
        )
        .order_by(col(RolloutRecord.next_evaluation_at))
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    claimed = []
    for record in (await session.exec(query)).all():
        claimed.append((record, record.next_evaluation_at or now))
        record.next_evaluation_at = lease_until
        session.add(record)
    return claimed


_CLAIM_DUE = """
WITH due AS (
    SELECT id, next_evaluation_at FROM rollout
    WHERE state = ANY($1::varchar[]) AND next_evaluation_at <= $2
    ORDER BY next_evaluation_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE rollout SET next_evaluation_at = $4
FROM due WHERE rollout.id = due.id
RETURNING rollout.*, due.next_evaluation_at AS due_at
"""


def no_rollout(service: str) -> Refused:
    """The refusal for a service that never had a rollout."""
    return Refused(Refusal(RefusalCode.NO_ROLLOUT, f"{service} has no rollout"))


# Rollouts: mapping ------------------------------------------------------------------------------


def to_machine(record: RolloutRecord) -> machine.Rollout:
    """The state machine's view of a stored rollout."""
    # Read from the record's loaded values: each read through the ORM's attribute descriptor
    # costs ten times a dict lookup, and every transition and answer builds this view.
    values = rows.loaded(record)
    lease_seconds = values["lease_seconds"]
    return machine.Rollout(
        service=values["service"],
        canary_version=values["canary_version"],
        stable_version=values["stable_version"],
        steps=_steps(tuple((step["weight"], step["wait"]) for step in values["steps"])),
        state=values["state"],
        step_index=values["step_index"],
        desired_weight=values["desired_weight"],
        step_started_at=values["step_started_at"],
        triggered_by=machine.Trigger(values["triggered_by"]),
        auto_promote=values["auto_promote"],
        paused_at=values["paused_at"],
        paused_for=timedelta(seconds=values["paused_seconds"]),
        reason=values["reason"],
        gates=tuple(gate_from_json(gate) for gate in values["gates"]),
        finished_at=values["finished_at"],
        stable_slot=values["stable_slot"],
        canary_slot=values["canary_slot"],
        lease=timedelta(seconds=lease_seconds) if lease_seconds else None,
    )


@functools.lru_cache(maxsize=4096)
def _steps(pairs: tuple[tuple[int, float], ...]) -> tuple[Step, ...]:
    # Policies repeat: the same steps are read on every transition of every rollout.
    return tuple(Step(weight, timedelta(seconds=wait)) for weight, wait in pairs)


def gate_from_json(gate: Mapping[str, Any]) -> GateStatus:
    """A stored gate status."""
    failing_since = gate.get("failing_since")
    return GateStatus(
        name=gate["name"],
        phase=GatePhase(gate.get("phase", GatePhase.PENDING)),
        value=gate.get("value"),
        threshold=gate.get("threshold"),
        failing_since=datetime.fromisoformat(failing_since) if failing_since else None,
        breached=gate.get("breached", False),
        detail=gate.get("detail"),
    )


def _gate_to_json(gate: GateStatus) -> dict[str, Any]:
    return {
        "name": gate.name,
        "phase": gate.phase.value,
        "value": gate.value,
        "threshold": gate.threshold,
        "failing_since": gate.failing_since.isoformat() if gate.failing_since else None,
        "breached": gate.breached,
        "detail": gate.detail,
    }


def store(record: RolloutRecord, rollout: machine.Rollout, now: datetime) -> None:
    """Write the machine's rollout into its row (desired weight included; applied untouched)."""
    rows.assign(
        record,
        state=rollout.state,
        stable_version=rollout.stable_version,
        stable_slot=rollout.stable_slot,
        canary_slot=rollout.canary_slot,
        step_index=rollout.step_index,
        desired_weight=rollout.desired_weight,
        step_started_at=rollout.step_started_at,
        paused_at=rollout.paused_at,
        paused_seconds=rollout.paused_for.total_seconds(),
        triggered_by=rollout.triggered_by.value,
        reason=rollout.reason,
        gates=[_gate_to_json(gate) for gate in rollout.gates],
        finished_at=rollout.finished_at,
        lease_seconds=rollout.lease.total_seconds() if rollout.lease else None,
        updated_at=now,
        next_evaluation_at=machine.next_due(
            rollout, now, timedelta(seconds=record.interval_seconds)
        ),
    )


def new_record(
    rollout: machine.Rollout,
    policy: Policy,
    *,
    created_by: str,
    now: datetime,
    id: int | None = None,
) -> RolloutRecord:
    """The row of a rollout the machine just started under `policy` (not yet stored); `id`:
    the one drawn for it (`Locked.next_rollout_id`), else `rows.save` gives one."""
    # Trusted values (the machine's, the validated policy's): built without validation.
    return rows.new(
        RolloutRecord,
        id=id,
        service=rollout.service,
        state=rollout.state,
        canary_version=rollout.canary_version,
        stable_version=rollout.stable_version,
        stable_slot=rollout.stable_slot,
        canary_slot=rollout.canary_slot,
        steps=[{"weight": s.weight, "wait": s.wait.total_seconds()} for s in rollout.steps],
        step_index=rollout.step_index,
        # Nothing is applied yet: the start's SetWeight raises it.
        desired_weight=0,
        step_started_at=now,
        auto_promote=policy.auto_promote,
        interval_seconds=policy.interval.total_seconds(),
        router=policy.router.model_dump(mode="json"),
        gates=[],
        gate_policy=policy.model_dump(
            mode="json", by_alias=True, include={"gates", "min_sample"}, exclude_none=True
        ),
        triggered_by=rollout.triggered_by.value,
        lease_seconds=rollout.lease.total_seconds() if rollout.lease else None,
        created_by=created_by,
        created_at=now,
        updated_at=now,
    )
