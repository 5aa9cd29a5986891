"""Every table, imported in one place so that SQLModel.metadata knows them all."""

from opsapi.audit.models import AuditEvent
from opsapi.canary.models import (
    FreezeRecord,
    Incident,
    RejectedVersion,
    RolloutRecord,
    ServiceRecord,
)
from opsapi.gates.models import GateEvaluation
from opsapi.pagerduty.models import OutboxMessage, PagerDutyEvent
from opsapi.storage.idempotency import IdempotencyRecord

__all__ = [
    "AuditEvent",
    "FreezeRecord",
    "GateEvaluation",
    "IdempotencyRecord",
    "Incident",
    "OutboxMessage",
    "PagerDutyEvent",
    "RejectedVersion",
    "RolloutRecord",
    "ServiceRecord",
]
