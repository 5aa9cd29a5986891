"""What a notification says: one row per event, rendered from the same facts."""

from __future__ import annotations

from dataclasses import asdict, fields, replace

import pytest

from opsapi.canary.machine import State
from opsapi.notifications.messages import EVENTS, Message, render

BASE = Message(
    event="started",
    service="checkout",
    rollout_id=42,
    state="progressing",
    canary_version="v2",
    stable_version="v1",
    canary_slot="green",
    stable_slot="blue",
    weight=10,
    triggered_by="user",
    actor="alice",
    reason="release 2026.11",
)


@pytest.mark.parametrize(
    ("event", "changes", "title", "severity"),
    [
        ("started", {}, "checkout: canary v2 started at 10%", "info"),
        ("awaiting_promotion", {"weight": 25, "triggered_by": "controller",
                                "actor": "controller", "reason": "step 25% ready"},
         "checkout: canary v2 at 25% is ready and awaits promotion", "info"),
        ("promoted", {"weight": 50}, "checkout: canary v2 promoted to 50%", "info"),
        ("paused", {"weight": 25}, "checkout: canary v2 paused at 25%", "warning"),
        ("resumed", {"weight": 25}, "checkout: canary v2 resumed at 25%", "info"),
        ("succeeded", {"weight": 100}, "checkout: canary v2 succeeded and is now stable",
         "success"),
        ("rolled_back", {"weight": 0, "triggered_by": "pagerduty", "actor": "pagerduty"},
         "checkout: canary v2 rolled back, traffic back to v1", "failure"),
        ("reverted", {"weight": 0}, "checkout: v2 reverted, traffic back to v1", "warning"),
        ("router_failed", {"weight": 25, "triggered_by": "system", "actor": "traffic"},
         "checkout: router failing to apply 25% for canary v2", "failure"),
        ("gate_failing", {"weight": 25, "triggered_by": "controller", "actor": "controller"},
         "checkout: gate failing for canary v2 at 25%", "warning"),
    ],
)  # fmt: skip
def test_every_event_has_a_title_and_a_body_with_the_facts(
    event: str, changes: dict[str, object], title: str, severity: str
) -> None:
    message = replace(BASE, event=event, **changes)  # type: ignore[arg-type]

    rendered = render(message, "https://ops.example.com/")

    assert rendered.title == title
    assert rendered.severity == severity
    body = rendered.body
    assert "Service: checkout" in body
    assert f"Canary: v2 in slot green, at {message.weight}% of traffic" in body
    assert "Stable: v1 in slot blue" in body
    assert f"State: {message.state}" in body
    assert f"Reason: {message.reason}" in body
    assert "Rollout #42: https://ops.example.com/internal/ops/canary/checkout" in body
    assert rendered.link == "https://ops.example.com/internal/ops/canary/checkout"


def test_the_table_covers_every_event() -> None:
    assert len(EVENTS) == 10


@pytest.mark.parametrize(
    ("triggered_by", "actor", "shown"),
    [
        ("user", "alice", "By: alice (user)"),
        ("controller", "controller", "By: controller"),
        ("pagerduty", "pagerduty", "By: pagerduty"),
        ("system", "revert-job", "By: revert-job (system)"),
    ],
)
def test_who_or_what_did_it(triggered_by: str, actor: str, shown: str) -> None:
    message = replace(BASE, triggered_by=triggered_by, actor=actor)
    assert shown in render(message, None).body.splitlines()


def test_without_a_public_url_the_link_is_the_api_path() -> None:
    rendered = render(BASE, None)
    assert rendered.link == "/internal/ops/canary/checkout"
    assert rendered.body.endswith("Rollout #42: /internal/ops/canary/checkout")


def test_missing_facts_are_left_out_not_shown_as_none() -> None:
    message = replace(BASE, stable_version=None, canary_slot=None, stable_slot=None, reason=None)
    body = render(message, None).body
    assert "None" not in body
    assert "Reason" not in body
    assert "Canary: v2, at 10% of traffic" in body
    assert "Stable: unknown" in body


def test_a_long_reason_is_clipped_and_the_title_stays_one_line() -> None:
    message = replace(BASE, reason="x" * 5000, canary_version="v2\nINJECTED")
    rendered = render(message, None)
    assert "\n" not in rendered.title
    [reason] = [line for line in rendered.body.splitlines() if line.startswith("Reason: ")]
    assert len(reason) == len("Reason: ") + 1000


def test_an_unknown_event_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown notification event"):
        replace(BASE, event="exploded")


def test_a_message_survives_the_outbox_round_trip() -> None:
    assert Message.from_dict({**BASE.as_dict(), "added_later": 1}) == BASE


@pytest.mark.parametrize(
    "message",
    [
        BASE,
        replace(BASE, state=State.ROLLED_BACK, rollout_id=None, reason=None, stable_slot=None),
        replace(BASE, event="reverted", reason="é \u2028 \x00", weight=0),
    ],
)
def test_the_stored_form_is_every_field_as_asdict_gives_it(message: Message) -> None:
    stored = message.as_dict()
    assert stored == asdict(message)
    assert list(stored) == [field.name for field in fields(Message)]
    assert all(stored[name] is getattr(message, name) for name in stored)
