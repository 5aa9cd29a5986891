"""A transition's notification rows (`opsapi.notifications.outbox.notices`): one per channel
whose rule hears the event, none for a channel whose row of the same cause is enqueued."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from opsapi.notifications.messages import Message
from opsapi.notifications.outbox import CAUSE_LIMIT, notices, row_cause
from opsapi.notifications.rules import NotifyRule

NOW = datetime(2026, 12, 1, 18, 0, tzinfo=UTC)
CAUSE = "rollout:7:promoted:2026-12-01T18:00:00+00:00"
RULES = [NotifyRule(channel="ops"), NotifyRule(channel="room", events=["rolled_back"]),
         NotifyRule(channel="mail")]  # fmt: skip


def _message(event: str) -> Message:
    return Message(event=event, service="checkout", rollout_id=7, state="progressing",
                   canary_version="v2", stable_version="v1", canary_slot="green",
                   stable_slot="blue", weight=25, triggered_by="user", actor="alice",
                   reason=None)  # fmt: skip


@pytest.mark.parametrize(
    ("event", "enqueued", "channels"),
    [
        ("promoted", set(), ["ops", "mail"]),
        ("rolled_back", set(), ["ops", "room", "mail"]),
        ("promoted", {row_cause(CAUSE, "ops")}, ["mail"]),
        # the same channel enqueued for another transition does not count
        ("promoted", {row_cause("rollout:7:promoted:earlier", "ops")}, ["ops", "mail"]),
        ("promoted", {row_cause(CAUSE, "ops"), row_cause(CAUSE, "mail")}, []),
    ],
)
def test_a_transitions_notices_are_its_channels_not_yet_enqueued(
    event: str, enqueued: set[str], channels: list[str]
) -> None:
    message = _message(event)
    rows = notices(rules=RULES, message=message, cause=CAUSE, now=NOW, enqueued=enqueued)
    assert [row["channel"] for row in rows] == channels
    for row in rows:
        assert (row["cause"], row["dedup_key"]) == (row_cause(CAUSE, row["channel"]), CAUSE)
        assert (row["state"], row["attempts"], row["next_attempt_at"]) == ("pending", 0, NOW)
        assert row["payload"] == {"message": message.as_dict()}
        assert row["routing_key"] == ""  # a channel's URL and secret stay in the channels file


@pytest.mark.parametrize("cause", ["", "x" * (CAUSE_LIMIT + 1)])
def test_a_cause_out_of_bounds_is_refused(cause: str) -> None:
    with pytest.raises(ValueError, match="cause"):
        notices(rules=RULES, message=_message("promoted"), cause=cause, now=NOW)
