"""`opsctl policy`: a service's policy as an editable YAML or JSON document, files read back,
and the diff of the effective policy before and after an apply."""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from rich.text import Text

from opsapi.opsctl.client import ExitCode, OpsctlError

# Answers carry the service's read-only lifecycle `status` beside the policy; a PUT ignores it.
STATUS = "status"
# An editable YAML file names its service, so that `policy apply -f FILE` needs no argument.
SERVICE = "service"
# `bake` is the 100 % step's wait: the YAML leaves it out so that an edit has one place to go.
BAKE = "bake"
# What a dry run shows for `gates` left out of a file: the server fills them from its default
# (the checklist's gates when it has a metrics backend), which opsctl cannot know.
SERVER_DEFAULT_GATES = "<left out of the file, so the server default gates apply>"
_REDACTION_MARK = "…"


def policy_part(document: Mapping[str, Any]) -> dict[str, Any]:
    """The policy of a GET or PUT answer, without the read-only `status`."""
    return {key: value for key, value in document.items() if key != STATUS}


def to_yaml(document: Mapping[str, Any]) -> str:
    """A policy as block YAML in the API's field order, one line per query, without `bake`."""
    body = {key: value for key, value in document.items() if key not in (STATUS, BAKE)}
    return yaml.safe_dump(
        body, sort_keys=False, allow_unicode=True, default_flow_style=False, width=1_000_000
    )


def editable_yaml(service: str, document: Mapping[str, Any]) -> str:
    """What `opsctl policy get` prints: comments (how to apply it, the bake, the read-only
    status), `service:`, then the policy."""
    lines = [
        f"# Policy of {service}. Edit it, then: opsctl policy apply -f FILE",
        "# (--dry-run shows the diff first). Fields left out take the server's default.",
    ]
    steps = document.get("steps")
    if isinstance(steps, list) and steps and isinstance(steps[-1], Mapping):
        lines.append(f"# The bake is the 100% step's wait ({steps[-1].get('wait')}).")
    status = document.get(STATUS)
    if isinstance(status, Mapping):
        lines.append("# Status (read-only; apply ignores it):")
        shown = yaml.safe_dump(
            dict(status), sort_keys=False, allow_unicode=True, default_flow_style=None
        )
        lines.extend(f"#   {line}" for line in shown.splitlines())
    head = "\n".join(lines) + "\n"
    return head + to_yaml({SERVICE: service, **policy_part(document)})


def load(path: str) -> dict[str, Any]:
    """A policy file (`-` is stdin): JSON if it ends in .json, else YAML (which reads JSON too).

    Raises OpsctlError: USAGE when it cannot be read, INVALID when it is not a mapping of
    fields with JSON values."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise OpsctlError(ExitCode.USAGE, f"cannot read {path}: {reason}") from None
    document: Any
    if path.endswith(".json"):
        try:
            document = json.loads(text)
        except ValueError as error:
            raise OpsctlError(ExitCode.INVALID, f"{path} is not valid JSON: {error}") from None
    else:
        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or "unreadable"
            raise OpsctlError(
                ExitCode.INVALID, f"{path} is not valid YAML: {problem}{where}"
            ) from None
    if not isinstance(document, dict):
        kind = "empty" if document is None else f"a {type(document).__name__}"
        raise OpsctlError(
            ExitCode.INVALID,
            f"{path} is {kind}, not a policy (a mapping of fields: steps, gates, router, ...)",
        )
    try:
        # YAML has values JSON has not (dates, .inf): as the API would read them, or refused.
        plain: dict[str, Any] = json.loads(json.dumps(document, default=str, allow_nan=False))
    except ValueError:
        raise OpsctlError(
            ExitCode.INVALID, f"{path}: numbers must be finite (no .inf or .nan)"
        ) from None
    return plain


def split(
    document: Mapping[str, Any], service: str | None, path: str
) -> tuple[str, dict[str, Any]]:
    """The service (the argument, or the file's `service:`) and the policy body to put."""
    named = document.get(SERVICE)
    if named is not None and not isinstance(named, str):
        raise OpsctlError(ExitCode.INVALID, f"{path}: service must be a string")
    if service is not None and named is not None and named != service:
        raise OpsctlError(
            ExitCode.USAGE,
            f"{path} is the policy of {named}, not {service}: change its service: line "
            "or leave out the SERVICE argument",
        )
    chosen = service or named
    if not chosen:
        raise OpsctlError(
            ExitCode.USAGE, f"which service? {path} has no service: line; give SERVICE"
        )
    body = {key: value for key, value in document.items() if key not in (SERVICE, STATUS)}
    return chosen, body


def local_effective(body: Mapping[str, Any]) -> dict[str, Any]:
    """The policy a PUT of `body` would store, worked out here (for `--dry-run`): the API's own
    model and input checks, omitted fields from the built-in defaults, except omitted `gates`
    (shown as SERVER_DEFAULT_GATES) and router parameters, which depend on the server.

    Raises OpsctlError (INVALID) with one line per field error."""
    # Imported here: the policy model and its PromQL checks take a while to load, and only a
    # dry run needs them.
    from pydantic import ValidationError

    from opsapi.canary.policy import Policy, effective_policy

    try:
        policy = effective_policy(dict(body), Policy())
    except ValidationError as error:
        errors = [
            {"field": ".".join(str(part) for part in item["loc"]) or "body", "message": item["msg"]}
            for item in error.errors(include_url=False, include_input=False)
        ]
        raise invalid_policy("the policy is invalid", errors, body) from None
    after = policy.document()
    if "gates" not in body:
        after["gates"] = SERVER_DEFAULT_GATES
    pagerduty = after.get("pagerduty")
    if isinstance(pagerduty, dict) and pagerduty.get("routing_key"):
        pagerduty["routing_key"] = _redacted(str(pagerduty["routing_key"]))
    return after


def _redacted(key: str) -> str:
    # As the API answers a routing key: never the key itself.
    if key.startswith(_REDACTION_MARK):
        return key
    return _REDACTION_MARK + key[-4:] if len(key) > 8 else _REDACTION_MARK


def invalid_policy(
    detail: str, errors: Sequence[Any], body: Mapping[str, Any], problem: Any = None
) -> OpsctlError:
    """An INVALID error whose message has one line per field error, gates named."""
    lines = [f"invalid: {detail}"]
    for item in errors:
        if isinstance(item, Mapping):
            field = str(item.get("field") or "body")
            lines.append(f"  {field}{_named(field, body)}: {item.get('message', '?')}")
    return OpsctlError(ExitCode.INVALID, "\n".join(lines), problem)


def _named(field: str, body: Mapping[str, Any]) -> str:
    """` (gate "errors")` for a field inside a gate, so the error names the gate too."""
    parts = field.split(".")
    gates = body.get("gates")
    if len(parts) >= 2 and parts[0] == "gates" and parts[1].isdigit() and isinstance(gates, list):
        index = int(parts[1])
        if index < len(gates) and isinstance(gates[index], Mapping):
            name = gates[index].get("name")
            if isinstance(name, str) and name:
                return f' (gate "{name}")'
    return ""


def diff(
    before: Mapping[str, Any], after: Mapping[str, Any], before_label: str, after_label: str
) -> list[str]:
    """A unified diff of two policies as YAML; empty when they are the same."""
    return list(
        difflib.unified_diff(
            to_yaml(before).splitlines(),
            to_yaml(after).splitlines(),
            before_label,
            after_label,
            n=3,
            lineterm="",
        )
    )


def diff_text(lines: Sequence[str]) -> Text:
    """Diff lines coloured: removed red, added green, hunk headers cyan."""
    text = Text()
    for position, line in enumerate(lines):
        if position:
            text.append("\n")
        if line.startswith(("---", "+++")):
            style = "bold"
        elif line.startswith("@@"):
            style = "cyan"
        elif line.startswith("-"):
            style = "red"
        elif line.startswith("+"):
            style = "green"
        else:
            style = ""
        text.append(line, style=style)
    return text
