"""Policy `notify` rules: strict shape, known channels only."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from opsapi.notifications.rules import NotifyRule, channels_for, check_rules

CHANNELS = {"ops-alerts", "audit-mail"}


@pytest.mark.parametrize(
    ("rule", "where"),
    [
        ({"channel": "ops-alerts", "events": ["exploded"]}, "events.0"),
        ({"channel": "ops-alerts", "events": []}, "events"),
        ({"channel": "ops-alerts", "events": ["paused", "paused"]}, "events"),
        ({"channel": "Ops Alerts"}, "channel"),
        ({"channel": "ops-alerts", "url": "https://hooks.slack.com/x"}, "url"),
        ({"events": ["paused"]}, "channel"),
        ({"channel": 7}, "channel"),
        ({"channel": "ops-alerts", "events": "paused"}, "events"),
    ],
    ids=["unknown-event", "no-events", "repeated", "bad-name", "extra-field", "no-channel",
         "number", "string-events"],
)  # fmt: skip
def test_bad_rules_are_refused(rule: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError) as caught:
        NotifyRule.model_validate(rule)
    assert where in {".".join(str(p) for p in e["loc"]) for e in caught.value.errors()}


def test_check_rules_names_the_unknown_channel_and_the_repeated_one() -> None:
    rules = [
        NotifyRule(channel="ops-alerts", events=["rolled_back"]),
        NotifyRule(channel="nowhere"),
        NotifyRule(channel="ops-alerts", events=["succeeded"]),
    ]

    problems = check_rules(rules, CHANNELS)

    assert [p["field"] for p in problems] == ["notify.1.channel", "notify.2.channel"]
    assert "unknown channel 'nowhere'" in problems[0]["message"]
    assert "audit-mail, ops-alerts" in problems[0]["message"]
    assert "listed twice" in problems[1]["message"]
    assert check_rules(rules[:1], CHANNELS) == []
    assert check_rules([NotifyRule(channel="x")], {})[0]["message"].endswith("channels: none")


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ("rolled_back", ["ops-alerts", "audit-mail"]),
        ("succeeded", ["audit-mail", "hook"]),
        ("started", ["audit-mail"]),
    ],
)
def test_which_channels_hear_an_event(event: str, expected: list[str]) -> None:
    rules = [
        NotifyRule(channel="ops-alerts", events=["rolled_back"]),
        NotifyRule(channel="audit-mail"),
        NotifyRule(channel="hook", events=["succeeded"]),
        NotifyRule(channel="audit-mail", events=["started"]),
    ]
    assert channels_for(rules, event) == expected
