"""Notification channels from the channels file (`OPSAPI_NOTIFICATIONS_FILE`): server
configuration, never API input. Policies name channels; only this file holds their URLs.

The file is JSON (`.json`) or YAML (`.yaml`, `.yml`): a mapping of channel name to channel::

    ops-alerts:
      type: slack
      url: https://hooks.slack.com/services/T000/B000/XXXX   # or slack://…
    release-room:
      type: teams
      url: https://….logic.azure.com:443/workflows/…/triggers/manual/paths/invoke?…  # or workflows://…
    audit-mail:
      type: email
      url: mailtos://user:password@smtp.example.com?to=release@example.com
    deploy-hook:
      type: webhook
      url: https://deploy.example.com/opsapi/events
      secret: at-least-16-characters                           # HMAC-SHA256 key
    chat:
      type: apprise                                            # any other apprise URL
      url: discord://webhook_id/webhook_token
    # every channel: optional `timeout` (seconds per connect and per read, default 10)

Names match `^[a-z0-9][a-z0-9_-]{0,62}$`. Unknown fields, duplicate keys and URLs apprise does not
read as the declared type are refused, so a typo fails the start. Error messages name the channel
and the field but never echo a value: URLs carry secrets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from opsapi.notifications import plugins
from opsapi.notifications.rules import CHANNEL_NAME

_NAME = re.compile(CHANNEL_NAME)
DEFAULT_TIMEOUT = 10.0


class ChannelsFileError(ValueError):
    """The channels file cannot be used; `problems` lists `{"channel", "field", "message"}`."""

    def __init__(self, path: Path, problems: list[dict[str, str]]) -> None:
        self.path = path
        self.problems = problems
        parts = []
        for problem in problems:
            where = [f"channel {problem['channel']!r}"] if problem["channel"] else []
            where += [f"field {problem['field']!r}"] if problem["field"] else []
            parts.append(": ".join([*where, problem["message"]]))
        super().__init__(f"notifications file {path}: " + "; ".join(parts))


def _http_url(secret: SecretStr) -> SecretStr:
    parts = urlsplit(secret.get_secret_value())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return secret


def _long_enough(secret: SecretStr) -> SecretStr:
    # pydantic's own length message says how long the value is: not for a secret.
    if not 16 <= len(secret.get_secret_value()) <= 4096:
        raise ValueError("must be 16 to 4096 characters")
    return secret


def _apprise_url(*services: str, expected: str) -> Any:
    def check(secret: SecretStr) -> SecretStr:
        plugin = plugins.instantiate(secret.get_secret_value())
        if plugin is None or (services and plugins.service_name(plugin) not in services):
            raise ValueError(f"must be {expected}")
        return secret

    return AfterValidator(check)


Url = Annotated[SecretStr, Field(min_length=1, max_length=4096)]
Timeout = Annotated[float, Field(gt=0, le=120)]


class _Channel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    timeout: Timeout = DEFAULT_TIMEOUT


class SlackChannel(_Channel):
    """A Slack incoming webhook (or any `slack://` URL apprise reads)."""

    type: Literal["slack"]
    url: Annotated[
        Url,
        _apprise_url(
            "NotifySlack",
            expected="a Slack webhook URL (https://hooks.slack.com/services/…) or a slack:// URL",
        ),
    ]


class TeamsChannel(_Channel):
    """A Microsoft Teams channel through a Workflows (Power Automate) webhook."""

    type: Literal["teams"]
    url: Annotated[
        Url,
        _apprise_url(
            "NotifyWorkflows",
            expected="a Teams Workflows webhook URL (https://…/workflows/…/triggers/manual/"
            "paths/invoke?…) or a workflows:// URL",
        ),
    ]


class EmailChannel(_Channel):
    """E-mail through an SMTP server."""

    type: Literal["email"]
    url: Annotated[
        Url, _apprise_url("NotifyEmail", expected="a mailto:// or mailtos:// URL with a recipient")
    ]


class AppriseChannel(_Channel):
    """Any service apprise supports, by its URL (Discord, Mattermost, ntfy, json:// …)."""

    type: Literal["apprise"]
    url: Annotated[Url, _apprise_url(expected="a URL apprise supports")]


class WebhookChannel(_Channel):
    """A URL of the user's own receiving a signed JSON document per notification."""

    type: Literal["webhook"]
    url: Annotated[Url, AfterValidator(_http_url)]
    secret: Annotated[SecretStr, AfterValidator(_long_enough)]


ChannelConfig = SlackChannel | TeamsChannel | EmailChannel | AppriseChannel | WebhookChannel
_MODELS: dict[str, type[ChannelConfig]] = {
    "slack": SlackChannel,
    "teams": TeamsChannel,
    "email": EmailChannel,
    "webhook": WebhookChannel,
    "apprise": AppriseChannel,
}


def load_channels(path: Path | None) -> dict[str, ChannelConfig]:
    """The channels of the notifications file (none without one), validated.

    Raises ChannelsFileError naming every bad channel and field."""
    if path is None:
        return {}
    data = _read(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ChannelsFileError(path, [_problem("", "", "must be a mapping of channel names")])
    problems: list[dict[str, str]] = []
    channels: dict[str, ChannelConfig] = {}
    for name, raw in data.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(_problem(_label(name), "", f"name must match {CHANNEL_NAME}"))
            continue
        if not isinstance(raw, dict):
            problems.append(_problem(name, "", "must be a mapping"))
            continue
        kind = raw.get("type")
        model = _MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            problems.append(_problem(name, "type", _type_message(kind)))
            continue
        try:
            channels[name] = model.model_validate(raw)
        except ValidationError as error:
            # Built from locations and messages only: pydantic's own str() may quote the input.
            problems += [
                _problem(name, ".".join(str(part) for part in item["loc"]), item["msg"])
                for item in error.errors(include_input=False, include_url=False)
            ]
    if problems:
        raise ChannelsFileError(path, problems)
    return channels


def secret_fragments(config: ChannelConfig) -> list[str]:
    """Every part of a channel's configuration that could be a secret, longest first.

    Credentials, path segments, query values and fragments of the URL (apprise URLs carry
    tokens in any of them), the URL itself, and a webhook's secret; the host is not one.
    """
    url = config.url.get_secret_value()
    found = {url}
    if isinstance(config, WebhookChannel):
        found.add(config.secret.get_secret_value())
    try:
        parts = urlsplit(url)
        candidates = [parts.username or "", parts.password or "", parts.fragment]
        candidates += parts.path.split("/")
        candidates += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
        candidates += parts.query.split("&")
        if parts.scheme not in ("http", "https") and parts.hostname:
            # In apprise URLs the "host" is often a token (slack://T000/…, discord://id/token).
            candidates.append(parts.hostname)
    except ValueError:
        candidates = []
    for candidate in candidates:
        for variant in (candidate, unquote(candidate)):
            if len(variant) >= 4:
                found.add(variant)
    return sorted(found, key=len, reverse=True)


def redact(text: str, fragments: list[str]) -> str:
    """`text` with every fragment replaced by `[redacted]`."""
    for fragment in fragments:
        text = text.replace(fragment, "[redacted]")
    return text


def _type_message(kind: object) -> str:
    known = ", ".join(_MODELS)
    if kind is None:
        return f"required: one of {known}"
    # Shown only when it looks like a type name, not like something pasted in the wrong place.
    shown = f" {kind!r}" if isinstance(kind, str) and re.fullmatch(r"\w{1,32}", kind) else ""
    return f"unknown type{shown}; expected one of {known}"


def _problem(channel: str, field: str, message: str) -> dict[str, str]:
    return {"channel": channel, "field": field, "message": message}


def _label(name: object) -> str:
    text = str(name)
    return text if len(text) <= 70 else text[:69] + "…"


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys (a second `ops-alerts:` would replace the first)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str | int | float | bool):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_label(key)!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_label(key)!r}")
        result[key] = value
    return result


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ChannelsFileError(path, [_problem("", "", "must end in .json, .yaml or .yml")])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise ChannelsFileError(path, [_problem("", "", f"cannot read: {reason}")]) from None
    # Parse errors report a position and the parser's complaint, never the offending text.
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as error:
            message = f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        except ValueError as error:
            message = f"invalid JSON: {error}"
        raise ChannelsFileError(path, [_problem("", "", message)]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        position = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        message = f"invalid YAML{position}: {error.problem or 'syntax error'}"
    except yaml.YAMLError:
        message = "invalid YAML"
    raise ChannelsFileError(path, [_problem("", "", message)]) from None
