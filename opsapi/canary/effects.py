"""The one interpreter of the machine's plans, for every caller alike.

The API, the controller, the PagerDuty webhook, `/execute` and revert all change a rollout the
same way: `Effects.run` locks the service and its latest rollout, asks the machine, and — inside
the caller's transaction — writes the rollout and the service's lifecycle state (the slot swap of
a success or a revert), the transition's audit event, its pages and notifications (outbox rows)
and the desired weight. Nothing here commits. After the caller's commit, `Effects.finish` counts
the transition in the metrics and makes the desired weight real through the router (converge),
so that the answer is built once, from what was committed and what the router reported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from opsapi.audit import service as audit
from opsapi.audit.models import Outcome, Source
from opsapi.canary import machine, service
from opsapi.canary.dataplane import WeightCache
from opsapi.canary.freezes import FreezeWindow
from opsapi.canary.machine import (
    Audit,
    Event,
    Notify,
    Page,
    PageKind,
    Refusal,
    Reject,
    SetWeight,
    Start,
    State,
    SwapSlots,
)
from opsapi.canary.models import RolloutRecord, ServiceRecord
from opsapi.canary.policy import Policy
from opsapi.metrics import Metrics
from opsapi.notifications import outbox as notifications
from opsapi.notifications.messages import Message
from opsapi.pagerduty import outbox as pagerduty_outbox
from opsapi.pagerduty.models import OutboxMessage
from opsapi.routers.registry import PULL
from opsapi.routers.traffic import ApplyOutcome, Traffic
from opsapi.storage import rows

log = logging.getLogger("opsapi.canary")


@dataclass(frozen=True)
class Cause:
    """Who or what asks for a transition, and how its audit event reads."""

    actor: str
    source: Source
    roles: Sequence[str] = ()
    request_id: str | None = None
    client_address: str | None = None
    # The request's own audit action (`canary.promote`); None: the transition's (`rollout.ready`).
    action: str | None = None
    # What the request said (its body's fields), kept in the audit event beside the transition.
    details: Mapping[str, Any] = field(default_factory=dict)
    # When the cause was first seen: the request received, the incident received, the breach
    # measured. A rollback's time to safe counts from here.
    detected_at: datetime | None = None


@dataclass
class Applied:
    """A transition carried out in the caller's transaction."""

    record: RolloutRecord
    service: ServiceRecord
    transition: machine.Transition
    # The transition's audit details (also written into its audit event).
    details: dict[str, Any]
    # What the router reported after the commit (None until `finish` converged).
    converged: ApplyOutcome | None = None
    # The rollout's outbox rows as the transition left them (read when the caller asked).
    messages: list[OutboxMessage] | None = None

    @property
    def moved(self) -> bool:
        """Whether a router must apply something: a new weight, or new slot roles."""
        return any(isinstance(e, SetWeight | SwapSlots) for e in self.transition.effects)

    @property
    def changed(self) -> bool:
        """Whether anything was recorded (an audit event written)."""
        return _audited(self.transition)


class Effects:
    """Carries out the machine's plans; one instance serves every caller of a process."""

    def __init__(
        self,
        *,
        traffic: Traffic | None,
        metrics: Metrics,
        default_policy: Policy,
        freezes: Sequence[FreezeWindow] = (),
        weights: WeightCache | None = None,
    ) -> None:
        self.traffic = traffic
        self.metrics = metrics
        self.default_policy = default_policy
        # The server's own freeze windows (OPSAPI_FREEZES_FILE); admins add more through the API.
        self.freezes = tuple(freezes)
        # The data plane's copies of the weight answers, dropped when a transition commits.
        self.weights = weights

    async def decide(
        self,
        name: str,
        event: Event,
        *,
        now: datetime,
        session: AsyncSession,
        policy: Policy | None = None,
    ) -> tuple[machine.Decision, RolloutRecord | None]:
        """What the machine would do (a dry run): nothing is locked or written."""
        record = await service.latest_rollout(name, session=session)
        row = await service.service_row(name, session=session)
        safety = await service.safety_of(name, now=now, windows=self.freezes, session=session)
        state = _service_state(name, row, record, policy or self.default_policy, event, safety)
        rollout = service.to_machine(record) if record is not None else None
        return machine.decide(rollout, event, now, state), record

    async def lock(
        self,
        name: str,
        *,
        now: datetime,
        session: AsyncSession,
        outbox: bool = False,
        safety: bool = False,
        new_rollout: bool = False,
    ) -> service.Locked:
        """The service's row and its latest rollout, locked in that order (every transition
        locks them so), for `apply`; with the rollout's outbox (`outbox`: for an answer), the
        service's rejections and holds (`safety`: for a start or a promotion) and the id of a
        rollout to start (`new_rollout`: the event may be a start)."""
        windows = self.freezes if safety else None
        return await service.lock_for_transition(
            name, now=now, session=session, outbox=outbox, windows=windows,
            new_rollout=new_rollout,
        )  # fmt: skip

    async def run(
        self,
        name: str,
        event: Event,
        *,
        now: datetime,
        cause: Cause,
        session: AsyncSession,
        policy: Policy | None = None,
    ) -> Applied:
        """Apply `event` to the service's latest rollout; raise `service.Refused` if refused.

        `policy` is the service's current policy (a Start uses it)."""
        safety = isinstance(event, Start | machine.Promote)
        locked = await self.lock(
            name, now=now, session=session, safety=safety, new_rollout=isinstance(event, Start)
        )
        return await self.apply(locked, event, now=now, cause=cause, session=session, policy=policy)

    async def apply(
        self,
        locked: service.Locked,
        event: Event,
        *,
        now: datetime,
        cause: Cause,
        session: AsyncSession,
        policy: Policy | None = None,
        read_outbox: bool = False,
        alongside: Sequence[rows.Pending] = (),
    ) -> Applied:
        """Apply `event` to the rollout `lock` locked; raise `service.Refused` if refused.

        `read_outbox`: also give the rollout's alerts and notifications (for an answer).
        `alongside`: the caller's own writes that belong to the transition (the controller's
        gate evaluations), made in the same round trip as the rollout's own on PostgreSQL."""
        row, record = locked.row, locked.record
        name = row.name
        current = policy or service.policy_of(row, self.default_policy)
        rollout = service.to_machine(record) if record is not None else None
        # Rejections and holds matter only to a start or a promotion: the controller's passes
        # (most transitions) skip their queries unless the machine wants to auto-promote.
        safety = locked.safety or NO_SAFETY
        if locked.safety is None and isinstance(event, Start | machine.Promote):
            safety = await service.safety_of(name, now=now, windows=self.freezes, session=session)
        state = _service_state(name, row, record, current, event, safety)
        decision = machine.decide(rollout, event, now, state)
        if safety is NO_SAFETY and _promotes(decision):
            safety = await service.safety_of(name, now=now, windows=self.freezes, session=session)
            state = _service_state(name, row, record, current, event, safety)
            decision = machine.decide(rollout, event, now, state)
        if isinstance(decision, Refusal):
            raise service.Refused(decision, record)
        started = isinstance(event, Start)
        if started:
            # Inserted by `_carry_out` with the transition's values: with its audit event when
            # the lock drew its id, else first (the outbox and the audit event need the id).
            record = service.new_record(decision.rollout, current, created_by=cause.actor,
                                        now=now, id=locked.next_rollout_id)  # fmt: skip
        assert record is not None
        # A rollout started now has nothing in the outbox but what this transition enqueues.
        messages = [] if started else locked.messages
        return await self._carry_out(record, row, decision, current, now=now, cause=cause,
                                     session=session, read_outbox=read_outbox,
                                     messages=messages, alongside=alongside)  # fmt: skip

    async def _carry_out(
        self,
        record: RolloutRecord,
        row: ServiceRecord,
        transition: machine.Transition,
        policy: Policy,
        *,
        now: datetime,
        cause: Cause,
        session: AsyncSession,
        read_outbox: bool = False,
        messages: list[OutboxMessage] | None = None,
        alongside: Sequence[rows.Pending] = (),
    ) -> Applied:
        service.store(record, transition.rollout, now)
        # Whether this transition paged (wrote alerts to the rollout's outbox).
        paged = False
        if any(isinstance(e, SetWeight | SwapSlots) for e in transition.effects):
            # A new weight, or new roles for the slots (the same percentage may now mean that
            # another version is stable): the router owes a new generation.
            # The pull router's generation is applied when a client fetches it (DESIGN §11):
            # the weight endpoint records that, not the commit.
            record.generation += 1
        if transition.service is not None:
            service.store_service(row, transition.service, now)
            await rows.save(session, row)
        if record.state in (State.ROLLED_BACK, State.REVERTED) and any(
            isinstance(e, SetWeight) and e.weight == 0 for e in transition.effects
        ):
            record.time_to_safe = _time_to_safe(record, cause, now)
        # The rollout's own write joins the caller's: all are written with the transition's
        # audit event when it records one, else now (one statement on PostgreSQL); nothing in
        # between reads them back.
        writes = list(alongside)
        if record.id is None:
            await rows.save(session, record)  # a start without a drawn id: inserted for one
        elif rows.is_new(record):
            writes.append(await rows.pending_new(session, record))
        elif (update := await rows.pending_update(session, record)) is not None:
            writes.append(update)
        if not _audited(transition):
            await rows.run_together(session, writes)
            writes = []
        details = summary(transition)
        # The transition's notifications: written with its other writes, shown in its answer.
        notified: list[dict[str, Any]] = []
        for effect in transition.effects:
            if isinstance(effect, Page):
                details.update(await self._page(session, record, effect, now))
                paged = True
            elif isinstance(effect, Reject):
                await service.reject(record, effect.version, effect.reason, now=now,
                                     session=session)  # fmt: skip
                details["rejected_version"] = effect.version
            elif isinstance(effect, Notify) and policy.notify:
                if messages is None:
                    messages = await pagerduty_outbox.of_rollout(session, record.id)
                new = notifications.notices(
                    rules=policy.notify,
                    message=_message(record, effect, cause),
                    # One transition, one cause: the same event twice in a rollout (promoted
                    # at each step) are different transitions.
                    cause=f"rollout:{record.id}:{effect.kind}:{now.isoformat()}",
                    now=now,
                    # The rollout's outbox as read under its lock: only a transition holding
                    # the lock adds a row of one of its transitions.
                    enqueued={row.cause for row in messages} | {row["cause"] for row in notified},
                )
                if new:
                    details.setdefault("notified", []).extend(row["channel"] for row in new)
                    notified += new
        if notified:
            writes.append(await pagerduty_outbox.pending_new(session, notified))
            if not _audited(transition):
                await rows.run_together(session, writes)
        applied = Applied(record, row, transition, details)
        if read_outbox:
            # The rows read with the lock, unless this transition paged: then read here, before
            # the audit chain's lock is taken, not after the commit (one round trip instead of
            # another transaction). Its notifications are not written yet: shown as they will be.
            if paged or messages is None:
                messages = await pagerduty_outbox.of_rollout(session, record.id)
            applied.messages = [*messages, *(rows.new(OutboxMessage, **new) for new in notified)]
        if applied.changed:
            await audit.record(
                session=session,
                alongside=writes,
                at=now,
                actor=cause.actor,
                roles=cause.roles,
                source=cause.source,
                action=cause.action or details["transition"],
                outcome=Outcome.SUCCESS,
                service=record.service,
                rollout_id=record.id,
                request_id=cause.request_id,
                client_address=cause.client_address,
                details={**cause.details, **details, "triggered_by": record.triggered_by},
            )
        return applied

    async def _page(
        self, session: AsyncSession, record: RolloutRecord, page: Page, now: datetime
    ) -> dict[str, Any]:
        if page.kind == PageKind.TRIGGER:
            return await pagerduty_outbox.page_breach(session, record, page.details, now=now)
        resolved = await pagerduty_outbox.resolve_earlier(session, record, now=now)
        return {"resolved_pages": resolved} if resolved else {}

    async def finish(self, applied: Applied, *, budget: float | None = None) -> Applied:
        """After the commit: count the transition, make its weight real (within `budget`
        seconds when given; the apply goes on, and reconcile finishes what fails)."""
        for effect in applied.transition.effects:
            if isinstance(effect, Audit):
                self.metrics.transitioned(effect.action, applied.record.triggered_by)
        if self.weights is not None and applied.changed:
            self.weights.invalidate(applied.record.service)
        record = applied.record
        if self.traffic is None or record.id is None or not applied.moved or record.converged:
            return applied
        if record.router.get("name", PULL) == PULL:
            return applied  # applied when a client fetches it (the weight endpoint records it)
        apply = self.traffic.apply(
            record.id, record.service, reason=_reason(applied), committed_at=self.traffic.clock()
        )
        try:
            if budget is None:
                outcome = await apply
            else:
                outcome = await asyncio.wait_for(asyncio.shield(_background(apply)), budget)
        except TimeoutError:
            return applied
        applied.converged = outcome
        record.router_error = outcome.error
        if outcome.ok:
            record.applied_weight = outcome.applied_weight
            record.applied_generation = outcome.generation
            record.time_to_safe = outcome.time_to_safe or record.time_to_safe
        return applied


NO_SAFETY = service.Safety(frozenset(), ())


def _audited(transition: machine.Transition) -> bool:
    """Whether the transition records something (writes an audit event)."""
    return any(isinstance(effect, Audit) for effect in transition.effects)


def _promotes(decision: machine.Decision) -> bool:
    return isinstance(decision, machine.Transition) and any(
        isinstance(e, Audit) and e.action in ("rollout.promoted", "rollout.started")
        for e in decision.effects
    )


def summary(transition: machine.Transition) -> dict[str, Any]:
    """The audit details of a transition: every step it took, its true before and after."""
    audits = [effect for effect in transition.effects if isinstance(effect, Audit)]
    if not audits:
        return {}
    details: dict[str, Any] = {}
    for effect in audits:
        details.update(effect.details)
    details["transition"] = audits[-1].action
    if "from_state" in audits[0].details:
        details["from_state"] = audits[0].details["from_state"]
    if len(audits) > 1:
        details["transitions"] = [{"action": e.action, **e.details} for e in audits]
    return details


def _service_state(
    name: str,
    row: ServiceRecord | None,
    record: RolloutRecord | None,
    policy: Policy,
    event: Event,
    safety: service.Safety,
) -> machine.ServiceState:
    # A start uses the policy's router (the slots the new canary goes to); every other event
    # the router the rollout started with.
    if record is not None and not isinstance(event, Start):
        router = record.router
    else:
        router = policy.router.model_dump(mode="json")
    return service.service_state(name, row, router, safety)


def _time_to_safe(record: RolloutRecord, cause: Cause, now: datetime) -> dict[str, Any]:
    """The instants of a rollback known at its decision; the router fills in the rest."""
    return {
        "trigger": record.triggered_by,
        "router": record.router.get("name", PULL),
        "detected_at": (cause.detected_at or now).isoformat(),
        "decided_at": now.isoformat(),
        # Filled in when the router applies 0 % (for pull: when a client first fetches it).
        "applied_at": None,
        "confirmed_at": None,
        "seconds": None,
    }


def _message(record: RolloutRecord, notify: Notify, cause: Cause) -> Message:
    reason = notify.details.get("reason") or record.reason
    if notify.kind == "gate_failing":
        reason = (
            f"gate {notify.details.get('gate')} failing: value {notify.details.get('value')} "
            f"against threshold {notify.details.get('threshold')}"
        )
    return Message(
        event=notify.kind,
        service=record.service,
        rollout_id=record.id,
        state=record.state,
        canary_version=record.canary_version,
        stable_version=record.stable_version,
        canary_slot=record.canary_slot,
        stable_slot=record.stable_slot,
        weight=record.desired_weight,
        triggered_by=record.triggered_by,
        actor=cause.actor,
        reason=reason,
    )


def _reason(applied: Applied) -> str:
    actions = [e.action for e in applied.transition.effects if isinstance(e, Audit)]
    return actions[-1] if actions else "transition"


_tasks: set[asyncio.Task[Any]] = set()


def _background(work: Any) -> asyncio.Task[ApplyOutcome]:
    # Kept referenced until done: an answer that stops waiting must not cancel the apply.
    task: asyncio.Task[ApplyOutcome] = asyncio.ensure_future(work)
    _tasks.add(task)
    task.add_done_callback(_done)
    return task


def _done(task: asyncio.Task[Any]) -> None:
    _tasks.discard(task)
    if not task.cancelled() and task.exception() is not None:
        log.error("applying a weight failed: %r", task.exception())


async def drain(seconds: float = 10.0) -> None:
    """Let applies that outlived their answer's budget finish (at shutdown)."""
    if _tasks:
        await asyncio.wait(set(_tasks), timeout=seconds)
