"""The channels file: every type accepted in JSON and YAML; every mistake refused with the channel
and field named and no value echoed (URLs carry secrets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from opsapi.notifications.channels import (
    AppriseChannel,
    ChannelsFileError,
    EmailChannel,
    SlackChannel,
    TeamsChannel,
    WebhookChannel,
    load_channels,
    redact,
    secret_fragments,
)

SLACK_TOKEN = "TIiajkdnlazkcOXrIdevi7FQ"
SLACK = f"https://hooks.slack.com/services/T1JJ3T3L2/A1BRTD4JD/{SLACK_TOKEN}"
TEAMS_SIG = "KODuebWbDGYFr0z0eu0ORo1Mn2sP5hw"
TEAMS = (
    "https://prod-161.westeurope.logic.azure.com:443/workflows/643e69f83c8944/triggers/manual/"
    f"paths/invoke?api-version=2016-06-01&sp=%2Ftriggers%2Fmanual%2Frun&sv=1.0&sig={TEAMS_SIG}"
)
MAIL_PASSWORD = "m4il-pa55word-77"
MAIL = f"mailtos://ops:{MAIL_PASSWORD}@smtp.example.com?to=release@example.com"
HOOK_SECRET = "hook-secret-0123456789abcdef"
VALID: dict[str, Any] = {
    "ops-alerts": {"type": "slack", "url": SLACK},
    "release-room": {"type": "teams", "url": TEAMS, "timeout": 3},
    "audit-mail": {"type": "email", "url": MAIL},
    "deploy-hook": {
        "type": "webhook",
        "url": "https://deploy.example.com/e",
        "secret": HOOK_SECRET,
    },
    "chat": {"type": "apprise", "url": "json://127.0.0.1:8080/hook"},
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_type_is_read_from_json(tmp_path: Path) -> None:
    channels = load_channels(write(tmp_path, "channels.json", json.dumps(VALID)))

    assert {name: type(config) for name, config in channels.items()} == {
        "ops-alerts": SlackChannel,
        "release-room": TeamsChannel,
        "audit-mail": EmailChannel,
        "deploy-hook": WebhookChannel,
        "chat": AppriseChannel,
    }
    assert channels["release-room"].timeout == 3
    assert channels["ops-alerts"].timeout == 10
    # secrets are not in the objects' text
    assert SLACK_TOKEN not in repr(channels)
    assert HOOK_SECRET not in str(channels)


def test_yaml_and_native_or_apprise_urls(tmp_path: Path) -> None:
    text = f"""
ops-alerts:
  type: slack
  url: slack://T1JJ3T3L2/A1BRTD4JD/{SLACK_TOKEN}/#ops
release-room:
  type: teams
  url: workflows://prod-161.westeurope.logic.azure.com/643e69f83c8944/{TEAMS_SIG}
"""
    channels = load_channels(write(tmp_path, "channels.yaml", text))
    assert sorted(channels) == ["ops-alerts", "release-room"]


def test_no_file_or_an_empty_one_means_no_channels(tmp_path: Path) -> None:
    assert load_channels(None) == {}
    assert load_channels(write(tmp_path, "channels.yml", "")) == {}


def _json(document: Any) -> tuple[str, str]:
    return "channels.json", json.dumps(document)


CASES: list[tuple[str, tuple[str, str], str, str, str]] = [
    # id, (file name, text), channel, field, message part
    ("bad-type", _json({"a": {"type": "pigeon", "url": SLACK}}), "a", "type", "unknown type"),
    ("pasted-type", _json({"a": {"type": SLACK, "url": SLACK}}), "a", "type", "unknown type"),
    ("no-type", _json({"a": {"url": SLACK}}), "a", "type", "required"),
    ("unknown-field", _json({"a": {**VALID["ops-alerts"], "channel": "#ops"}}), "a", "channel",
     "Extra inputs"),
    ("slack-url-elsewhere", _json({"a": {"type": "slack", "url": TEAMS}}), "a", "url",
     "Slack webhook URL"),
    ("slack-bad-token", _json({"a": {"type": "slack", "url": "slack://bad"}}), "a", "url",
     "Slack webhook URL"),
    ("teams-is-slack", _json({"a": {"type": "teams", "url": SLACK}}), "a", "url", "Teams"),
    ("email-not-mailto", _json({"a": {"type": "email", "url": SLACK}}), "a", "url", "mailto"),
    ("apprise-unknown", _json({"a": {"type": "apprise", "url": f"nope://{SLACK_TOKEN}"}}), "a",
     "url", "apprise supports"),
    ("webhook-not-http", _json({"a": {"type": "webhook", "url": f"ftp://x/{SLACK_TOKEN}",
                                      "secret": HOOK_SECRET}}), "a", "url", "http://"),
    ("webhook-short-secret", _json({"a": {"type": "webhook", "url": "https://h.example/x",
                                          "secret": "short-s3cr3t"}}), "a", "secret",
     "16 to 4096"),
    ("webhook-no-secret", _json({"a": {"type": "webhook", "url": "https://h.example/x"}}), "a",
     "secret", "required"),
    ("timeout", _json({"a": {**VALID["ops-alerts"], "timeout": 0}}), "a", "timeout",
     "greater than 0"),
    ("bad-name", _json({"Ops Alerts": VALID["ops-alerts"]}), "Ops Alerts", "", "must match"),
    ("not-a-mapping", _json({"a": [SLACK]}), "a", "", "must be a mapping"),
    ("json-duplicate", ("channels.json", '{"a": {"url": "' + SLACK + '"}, "a": {}}'),
     "", "", "duplicate key 'a'"),
    ("yaml-duplicate", ("channels.yaml", f"a:\n  type: slack\n  url: {SLACK}\n  url: {SLACK}\n"),
     "", "", "duplicate key 'url'"),
    ("top-level-list", _json([SLACK]), "", "", "mapping of channel names"),
    ("extension", ("channels.txt", "{}"), "", "", "must end in"),
    ("invalid-json", ("channels.json", '{"a": {"url": "' + SLACK + '",}}'), "", "",
     "invalid JSON at line 1"),
    ("invalid-yaml", ("channels.yaml", f"a: [{SLACK}\n"), "", "", "invalid YAML"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("source", "channel", "field", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_mistakes_are_refused_naming_channel_and_field_never_the_value(
    tmp_path: Path, source: tuple[str, str], channel: str, field: str, message: str
) -> None:
    name, text = source
    with pytest.raises(ChannelsFileError) as caught:
        load_channels(write(tmp_path, name, text))

    [problem] = caught.value.problems
    assert (problem["channel"], problem["field"]) == (channel, field)
    assert message in problem["message"]
    shown = str(caught.value) + json.dumps(caught.value.problems)
    for secret in (SLACK_TOKEN, TEAMS_SIG, HOOK_SECRET, "short-s3cr3t"):
        assert secret not in shown


def test_every_bad_channel_is_reported_at_once(tmp_path: Path) -> None:
    document = {**VALID, "b": {"type": "pigeon"}, "c": {"type": "email", "url": "x"}}
    with pytest.raises(ChannelsFileError) as caught:
        load_channels(write(tmp_path, "channels.json", json.dumps(document)))
    assert [p["channel"] for p in caught.value.problems] == ["b", "c"]


def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ChannelsFileError, match="cannot read"):
        load_channels(tmp_path / "missing.json")


def test_validation_logs_nothing_of_the_url(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    document = {"a": {"type": "slack", "url": f"slack://{SLACK_TOKEN}"}}
    with pytest.raises(ChannelsFileError):
        load_channels(write(tmp_path, "c.json", json.dumps(document)))
    assert SLACK_TOKEN not in caplog.text


@pytest.mark.parametrize("name", sorted(VALID))
def test_redaction_removes_every_secret_part(tmp_path: Path, name: str) -> None:
    config = load_channels(write(tmp_path, "c.json", json.dumps({name: VALID[name]})))[name]
    url = config.url.get_secret_value()
    text = f"failed posting to {url} with {SLACK_TOKEN} {TEAMS_SIG} {MAIL_PASSWORD} {HOOK_SECRET}"

    redacted = redact(text, secret_fragments(config))

    assert url not in redacted
    own = {
        "ops-alerts": [SLACK_TOKEN],
        "release-room": [TEAMS_SIG],
        "audit-mail": [MAIL_PASSWORD],
        "deploy-hook": [HOOK_SECRET],
        "chat": [],
    }[name]
    for secret in own:
        assert secret not in redacted
