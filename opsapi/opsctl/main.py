"""`opsctl`: drive canary rollouts through the opsapi HTTP API from a terminal.

Settings: `OPSAPI_URL` (the server, e.g. http://127.0.0.1:8080; `/internal/ops` is added) and
`OPSAPI_TOKEN` (a bearer token); `--url` and `--token` override them. Without a token, the
login cached by `opsctl login` is used (renewed with its refresh token when it expires); its
settings (`OPSCTL_ISSUER`, `OPSCTL_CLIENT_ID`, ...) are described in `opsapi/opsctl/login.py`.

Commands: login, logout, whoami, services, promote, rollback, revert, pause, resume, status,
history, evaluations, policy get, policy apply, audit, audit verify, execute. Every change is
sent with an Idempotency-Key (one per command, reused by its own retries, or
`--idempotency-key`), so a retried command acts once.

Exit codes (one per class of failure, for scripts):

    0   success
    1   any other failure (an answer opsctl did not expect, e.g. 405)
    2   usage error: unknown command or option, bad argument
    3   not authenticated (401): missing, invalid or expired token
    4   forbidden (403): the token lacks the role
    5   not found (404): no such service rollout, rollout or operation
    6   conflict (409): the state refuses it (not ready, paused, no revert, ...)
    7   invalid request (400, 413, 415, 422)
    8   server error (5xx), after retries
    9   opsapi unreachable: connection refused, DNS, TLS or timeout
    10  `audit verify` found the audit hash chain broken

Ctrl-C ends `status --watch` with 0; elsewhere it exits 130.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from opsapi.opsctl import login as logins
from opsapi.opsctl import policy as policy_files
from opsapi.opsctl import render
from opsapi.opsctl.client import (
    EXIT_CODES,
    Answer,
    Client,
    ExitCode,
    OpsctlError,
    new_idempotency_key,
)

_EPILOG = "Exit codes:\n\n" + "\n".join(
    f"{int(code)}: {meaning}" for code, meaning in EXIT_CODES.items()
)

app = typer.Typer(
    name="opsctl",
    help="Drive canary rollouts through the opsapi HTTP API.",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
audit_app = typer.Typer(
    help="Query the audit log (auditor role); `opsctl audit verify` checks its hash chain.",
    epilog=_EPILOG,
)
app.add_typer(audit_app, name="audit")
policy_app = typer.Typer(
    help="Read a service's policy as YAML or JSON; apply an edited one (admin), with its diff.",
    epilog=_EPILOG,
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")


@dataclass
class _Settings:
    url: str
    token: str | None
    timeout: float
    retries: int
    client: Client | None = None


class _Output:
    """Whether errors should also be printed as JSON on stdout (set by `--json`)."""

    json_errors = False


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _client(ctx: typer.Context) -> Client:
    settings = ctx.find_object(_Settings)
    if settings is None:  # pragma: no cover - the root callback always runs first
        raise OpsctlError(ExitCode.ERROR, "internal error: no settings")
    if settings.client is None:
        settings.client = Client(
            settings.url,
            settings.token,
            login_token=_login_token,
            timeout=settings.timeout,
            retries=settings.retries,
        )
        ctx.call_on_close(settings.client.close)
    return settings.client


def _login_token() -> str | None:
    """The cached login's token, renewed if it expired; None when nobody logged in."""
    path = logins.cache_path()
    if not path.exists():
        return None
    return logins.refresh(path)


def _print_json(document: Any, *, compact: bool = False) -> None:
    if compact:
        print(json.dumps(document, separators=(",", ":"), ensure_ascii=False), flush=True)
    else:
        print(json.dumps(document, indent=2, ensure_ascii=False), flush=True)


def _json_errors(enabled: bool) -> None:
    """With `--json`, a refusal's problem document also goes to stdout (for scripts)."""
    _Output.json_errors = enabled


def _path(*segments: str) -> str:
    return "/" + "/".join(quote(segment, safe="") for segment in segments)


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str,
        typer.Option(
            "--url", envvar="OPSAPI_URL", help="opsapi server URL (`/internal/ops` is added)."
        ),
    ] = "http://127.0.0.1:8080",
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="OPSAPI_TOKEN", help="Bearer token.", show_default=False),
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for an answer.")
    ] = 30.0,
    retries: Annotated[
        int,
        typer.Option(
            "--retries", min=0, max=10, help="Retries on connection errors and 502/503/504."
        ),
    ] = 2,
) -> None:
    """Drive canary rollouts through the opsapi HTTP API."""
    ctx.obj = _Settings(url=url, token=token or None, timeout=timeout, retries=retries)


# ---------------------------------------------------------------------------------------------
# Identity: login, logout, whoami


def _setting(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


@app.command()
def login(
    issuer: Annotated[
        str | None,
        typer.Option(
            "--issuer",
            envvar="OPSCTL_ISSUER",
            help="The identity provider's issuer URL (its discovery document is "
            "ISSUER/.well-known/openid-configuration).",
            show_default=False,
        ),
    ] = None,
    client_id: Annotated[
        str | None,
        typer.Option(
            "--client-id",
            envvar="OPSCTL_CLIENT_ID",
            help="opsctl's client id at the provider (a native/public application).",
            show_default=False,
        ),
    ] = None,
    no_browser: Annotated[
        bool, typer.Option("--no-browser", help="Print the login URL; open no browser.")
    ] = False,
    port: Annotated[
        int,
        typer.Option(
            "--port",
            envvar="OPSCTL_REDIRECT_PORT",
            min=0,
            max=65535,
            help="Loopback port of the redirect http://127.0.0.1:PORT/callback (0: any free "
            "one; fix it when the provider wants the exact redirect URI registered).",
        ),
    ] = 0,
    wait: Annotated[
        float, typer.Option("--wait", min=1, help="Seconds to wait for the browser.")
    ] = 300.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print who logged in as JSON.")] = False,
) -> None:
    """Log in through your identity provider (OIDC, authorization code + PKCE); every later
    command uses the cached token while OPSAPI_TOKEN is unset, renewing it as it expires."""
    if not issuer or not client_id:
        raise OpsctlError(
            ExitCode.USAGE,
            "set OPSCTL_ISSUER (the identity provider's issuer URL) and OPSCTL_CLIENT_ID "
            "(opsctl's client id there), or pass --issuer and --client-id",
        )
    settings = logins.LoginSettings(
        issuer=issuer,
        client_id=client_id,
        client_secret=_setting("OPSCTL_CLIENT_SECRET"),
        scopes=_setting("OPSCTL_SCOPES") or logins.DEFAULT_SCOPES,
        bearer=_setting("OPSCTL_BEARER") or "id_token",
        redirect_port=port,
        auth_params=logins.parse_auth_params(_setting("OPSCTL_AUTH_PARAMS")),
    )
    path = logins.cache_path()

    def announce(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    cached = logins.login(
        settings, path, open_browser=not no_browser, wait_seconds=wait, announce=announce
    )
    identity = _identity(cached.bearer_token, cached, path)
    if as_json:
        _print_json(identity)
        return
    text = Text()
    text.append("Logged in", style="bold green")
    text.append(f" to {cached.issuer} as ")
    text.append(str(identity["subject"]), style="bold")
    _console().print(text)
    _console().print(_identity_grid(identity))


@app.command()
def logout() -> None:
    """Forget the cached login (the provider's own browser session is not ended)."""
    path = logins.cache_path()
    removed = logins.remove(path)
    message = f"logged out: removed {path}" if removed else f"not logged in (no {path})"
    if os.environ.get("OPSAPI_TOKEN"):
        message += "; OPSAPI_TOKEN is still set and still used"
    print(message)


def _identity(token: str | None, cached: logins.CachedLogin | None, path: Path) -> dict[str, Any]:
    """Who `token` says the caller is, as opsapi will see it (roles mapped as opsapi maps them)."""
    claims = logins.jwt_claims(token)
    claim = logins.roles_claim()
    roles, implied = logins.opsapi_roles(claims, claim)
    raw: Any = claims.get(claim, claims)
    if claim not in claims:
        for part in claim.split("."):
            raw = raw.get(part) if isinstance(raw, dict) else None
    expires = claims.get("exp")
    if cached is not None:
        expires = cached.expires_at
    expires_at = (
        datetime.fromtimestamp(float(expires), UTC)
        if isinstance(expires, int | float) and not isinstance(expires, bool)
        else None
    )
    audience = claims.get("aud")
    return {
        "subject": claims.get("sub"),
        "roles": roles,
        "implied_roles": implied,
        "roles_claim": claim,
        "roles_claim_value": raw,
        "issuer": claims.get("iss") or (cached.issuer if cached else None),
        "audience": audience,
        "expires_at": expires_at.strftime("%Y-%m-%dT%H:%M:%SZ") if expires_at else None,
        "expires_in_seconds": (
            round((expires_at - datetime.now(UTC)).total_seconds()) if expires_at else None
        ),
        "source": "login" if cached is not None else "OPSAPI_TOKEN",
        "bearer": cached.bearer if cached is not None else "token",
        "renewable": bool(cached is not None and cached.token.get("refresh_token")),
        "cache": str(path) if cached is not None else None,
        "jwt": bool(claims),
    }


def _identity_grid(identity: dict[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("Subject", Text(str(identity["subject"] or render.DASH)))
    roles = Text(", ".join(identity["roles"]) or "none", style="bold")
    if identity["implied_roles"]:
        roles.append(f" (implies {', '.join(identity['implied_roles'])})")
    roles.append(
        f"\nclaim {identity['roles_claim']}: "
        f"{json.dumps(identity['roles_claim_value'], ensure_ascii=False)}",
        style="dim",
    )
    grid.add_row("Roles", roles)
    expires = Text()
    if identity["expires_at"] is None:
        expires.append("unknown (not a JWT)", style="yellow")
    else:
        left = identity["expires_in_seconds"]
        expires.append(identity["expires_at"].replace("T", " "))
        if left > 0:
            expires.append(f" (in {render.human(left)})")
        else:
            expires.append(f" (expired {render.human(-left)} ago)", style="bold red")
        if identity["renewable"]:
            expires.append("; renewed with the refresh token", style="dim")
    grid.add_row("Expires", expires)
    grid.add_row("Issuer", Text(str(identity["issuer"] or render.DASH)))
    if identity["source"] == "login":
        what = "ID token" if identity["bearer"] == "id_token" else "access token"
        grid.add_row("Token", Text(f"{what} of `opsctl login`, cached in {identity['cache']}"))
    else:
        grid.add_row("Token", Text("OPSAPI_TOKEN or --token (the login cache is not used)"))
    return grid


@app.command()
def whoami(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
) -> None:
    """Who opsctl acts as: subject, roles as opsapi maps them, when the token expires.

    Roles are read from OPSCTL_ROLES_CLAIM (else OPSAPI_ROLES_CLAIM, else roles), as the server
    reads them from OPSAPI_ROLES_CLAIM: set the same claim on both sides."""
    settings = ctx.find_object(_Settings)
    token = settings.token if settings is not None else None
    path = logins.cache_path()
    cached = None
    if not token:
        if not path.exists():
            raise OpsctlError(
                ExitCode.UNAUTHENTICATED, "not logged in: run `opsctl login` (or set OPSAPI_TOKEN)"
            )
        token = logins.refresh(path)
        cached = logins.load(path)
    identity = _identity(token, cached, path)
    if as_json:
        _print_json(identity)
        return
    _console().print(_identity_grid(identity))


# ---------------------------------------------------------------------------------------------
# Changes: promote, rollback, pause, resume


JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON answer.")]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key",
        help="Idempotency-Key to send (default: a new one per command, reused by its retries).",
        show_default=False,
    ),
]


def _change(
    ctx: typer.Context,
    path: str,
    body: dict[str, Any],
    *,
    key: str | None,
    as_json: bool,
    describe: Callable[[dict[str, Any]], RenderableType],
) -> None:
    key = key or new_idempotency_key()
    _json_errors(as_json)
    answer = _client(ctx).post(path, body, idempotency_key=key)
    _report_replay(answer, key)
    if as_json:
        _print_json(answer.body)
        return
    _console().print(describe(answer.body))


def _report_replay(answer: Answer, key: str) -> None:
    if answer.replayed:
        print(
            f"opsctl: note: Idempotency-Key {key} was already used: this is the stored answer "
            "of that request, which did not run again",
            file=sys.stderr,
        )


def _changed_rollout(rollout: dict[str, Any]) -> RenderableType:
    return Group(render.summary(rollout), render.ladder(rollout), render.slots_block(rollout))


def _reverted(rollout: dict[str, Any]) -> RenderableType:
    return Group(render.summary(rollout), render.traffic_text(rollout), render.slots_block(rollout))


@app.command()
def promote(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service, e.g. checkout.")],
    version: Annotated[
        str | None,
        typer.Option("--version", help="Canary version: starts a rollout if none is open."),
    ] = None,
    stable_version: Annotated[
        str | None,
        typer.Option(
            "--stable-version",
            help="With --version, on a first rollout: the version running now (before opsapi "
            "knew the service), so baseline gates and slots name it.",
            show_default=False,
        ),
    ] = None,
    reason: Annotated[str | None, typer.Option("--reason", "-r", help="Why.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Advance even if the step is not ready (admin).")
    ] = False,
    to: Annotated[
        int | None,
        typer.Option("--to", min=1, max=100, help="Jump to this later step weight (admin)."),
    ] = None,
    from_percent: Annotated[
        int | None,
        typer.Option(
            "--from", min=0, max=100, help="Only advance if the rollout is still at this weight."
        ),
    ] = None,
    break_glass: Annotated[
        bool,
        typer.Option(
            "--break-glass",
            help="Act despite an open incident or a freeze window (admin, with --reason).",
        ),
    ] = False,
    override_rejection: Annotated[
        bool,
        typer.Option(
            "--override-rejection",
            help="Start a version a breach or an incident rolled back (admin, with --reason).",
        ),
    ] = False,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a rollout (with --version) or advance the open one by a step."""
    if (break_glass or override_rejection) and not (reason and reason.strip()):
        raise typer.BadParameter(
            "an override is audited with its reason: give --reason", param_hint="--reason"
        )
    body: dict[str, Any] = {"service": service}
    if version is not None:
        body["version"] = version
    if stable_version is not None:
        if version is None:
            raise typer.BadParameter(
                "only a start declares the stable version: give --version too",
                param_hint="--stable-version",
            )
        body["stable_version"] = stable_version
    if reason is not None:
        body["reason"] = reason
    if force:
        body["force"] = True
    if to is not None:
        body["target_percent"] = to
    if from_percent is not None:
        body["from_percent"] = from_percent
    if break_glass:
        body["break_glass"] = True
    if override_rejection:
        body["override_rejection"] = True
    _change(
        ctx,
        "/canary/promote",
        body,
        key=idempotency_key,
        as_json=as_json,
        describe=_changed_rollout,
    )


@app.command()
def rollback(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (required, audited).")],
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Roll the service's open rollout back to 0 % now."""
    _change(
        ctx,
        "/canary/rollback",
        {"service": service, "reason": reason},
        key=idempotency_key,
        as_json=as_json,
        describe=_changed_rollout,
    )


@app.command()
def revert(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service.")],
    reason: Annotated[str, typer.Option("--reason", "-r", help="Why (required, audited).")],
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Undo a success: 100 % back to the previous version's slot, which is stable again."""
    _change(
        ctx,
        "/canary/revert",
        {"service": service, "reason": reason},
        key=idempotency_key,
        as_json=as_json,
        describe=_reverted,
    )


def _pause_or_resume(
    ctx: typer.Context, path: str, service: str, reason: str | None, key: str | None, as_json: bool
) -> None:
    body: dict[str, Any] = {"service": service}
    if reason is not None:
        body["reason"] = reason
    _change(ctx, path, body, key=key, as_json=as_json, describe=_changed_rollout)


@app.command()
def pause(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service.")],
    reason: Annotated[str | None, typer.Option("--reason", "-r", help="Why.")] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Freeze the open rollout's wait clock (gates still run; a breach still rolls back)."""
    _pause_or_resume(ctx, "/canary/pause", service, reason, idempotency_key, as_json)


@app.command()
def resume(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service.")],
    reason: Annotated[str | None, typer.Option("--reason", "-r", help="Why.")] = None,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Restart the paused rollout's wait clock."""
    _pause_or_resume(ctx, "/canary/resume", service, reason, idempotency_key, as_json)


# ---------------------------------------------------------------------------------------------
# Reading: status (and --watch), history, evaluations


@dataclass
class _Frame:
    body: Any
    view: RenderableType
    finished: bool


def _policy_interval(client: Client, service: str, memo: dict[str, str | None]) -> str | None:
    """How often the service's gates are measured, from its policy (read once per command).

    A rollout keeps the interval it started with; the rollout answer does not carry it yet,
    so the current policy's is shown, marked as such."""
    if service not in memo:
        try:
            interval = client.get(_path("services", service)).body.get("interval")
        except OpsctlError:
            interval = None  # only a detail of the view: the status itself still shows
        memo[service] = f"{interval} (the policy's)" if isinstance(interval, str) else None
    return memo[service]


def _status_frame(
    client: Client, service: str | None, memo: dict[str, str | None] | None = None
) -> _Frame:
    if service is None:
        body = client.get("/canary").body
        items = [item for item in body.get("items", []) if isinstance(item, dict)]
        view: RenderableType = (
            render.rollouts_table(items, title=f"Open rollouts ({len(items)})")
            if items
            else Text("no open rollouts", style="dim")
        )
        return _Frame(body, view, finished=False)
    body = client.get(_path("canary", service)).body
    interval = None
    if body.get("state") in render.OPEN_STATES and not body.get("interval"):
        interval = _policy_interval(client, service, {} if memo is None else memo)
    view = render.rollout_view(body, interval=interval)
    return _Frame(body, view, finished=body.get("state") in render.TERMINAL_STATES)


@app.command()
def status(
    ctx: typer.Context,
    service: Annotated[
        str | None, typer.Argument(help="A service; without it, every open rollout.")
    ] = None,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C or the rollout ends.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes.")
    ] = 2.0,
    count: Annotated[
        int | None,
        typer.Option("--count", min=1, help="With --watch: stop after this many refreshes."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the raw JSON (one line per refresh).")
    ] = False,
) -> None:
    """Show a rollout (steps, wait, gates, weights) or the table of open rollouts."""
    client = _client(ctx)
    _json_errors(as_json)
    memo: dict[str, str | None] = {}
    if not watch:
        frame = _status_frame(client, service, memo)
        if as_json:
            _print_json(frame.body)
        else:
            _console().print(frame.view)
        return
    _watch(lambda: _status_frame(client, service, memo), interval, count, as_json)


def _stamp(number: int, interval: float, error: OpsctlError | None) -> Text:
    text = Text(
        f"refresh {number} at {datetime.now(UTC).strftime('%H:%M:%SZ')} · every {interval:g}s · "
        "Ctrl-C to stop",
        style="dim",
    )
    if error is not None:
        text.append(f"\nlast refresh failed: {error.message}", style="bold red")
    return text


def _watch(fetch: Callable[[], _Frame], interval: float, count: int | None, as_json: bool) -> None:
    """Re-render every `interval` s until Ctrl-C, `count` refreshes, or a finished rollout."""
    console = _console()
    last: _Frame | None = None
    refreshes = 0

    def step() -> tuple[_Frame | None, OpsctlError | None]:
        nonlocal last
        try:
            last = fetch()
            return last, None
        except OpsctlError as error:
            # A blip (server restarting, network) should not end a watch during an incident.
            if error.code in (ExitCode.SERVER_ERROR, ExitCode.UNREACHABLE) and last is not None:
                return last, error
            raise

    def more() -> bool:
        return (count is None or refreshes < count) and not (last is not None and last.finished)

    try:
        if as_json:
            while True:
                frame, error = step()
                refreshes += 1
                if error is None and frame is not None:
                    _print_json(frame.body, compact=True)
                if not more():
                    return
                time.sleep(interval)
        elif console.is_terminal:
            with Live(console=console, auto_refresh=False, transient=False) as live:
                while True:
                    frame, error = step()
                    refreshes += 1
                    assert frame is not None
                    live.update(Group(frame.view, _stamp(refreshes, interval, error)), refresh=True)
                    if not more():
                        return
                    time.sleep(interval)
        else:
            # Not a terminal (a pipe, a log file): every frame is printed, one after the other.
            while True:
                frame, error = step()
                refreshes += 1
                assert frame is not None
                console.print(Rule(_stamp(refreshes, interval, error)))
                console.print(frame.view)
                sys.stdout.flush()
                if not more():
                    return
                time.sleep(interval)
    except KeyboardInterrupt:
        return


def _paged(
    client: Client, path: str, params: dict[str, Any], limit: int, page_max: int
) -> dict[str, Any]:
    """Follow `next_cursor` until `limit` items are read; answers `{"items", "next_cursor"}`."""
    items: list[Any] = []
    cursor: str | None = None
    extra: dict[str, Any] = {}
    while True:
        page_size = min(page_max, limit - len(items))
        body = client.get(path, {**params, "limit": page_size, "cursor": cursor}).body
        page = body.get("items", []) if isinstance(body, dict) else []
        extra = {k: v for k, v in body.items() if k not in ("items", "next_cursor")}
        items.extend(page)
        cursor = body.get("next_cursor")
        if not cursor or not page or len(items) >= limit:
            break
    return {**extra, "items": items, "next_cursor": cursor}


@app.command()
def history(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service.")],
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=10000)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """The service's rollouts, newest first."""
    _json_errors(as_json)
    body = _paged(_client(ctx), _path("canary", service, "history"), {}, limit, 100)
    if as_json:
        _print_json(body)
        return
    if not body["items"]:
        _console().print(Text(f"{service} has no rollouts", style="dim"))
        return
    _console().print(render.history_table(body["items"], title=f"{service}: rollouts"))


@app.command()
def evaluations(
    ctx: typer.Context,
    rollout_id: Annotated[int, typer.Argument(min=1, help="The rollout's id.")],
    gate: Annotated[str | None, typer.Option("--gate", "-g", help="Only this gate.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """A rollout's gate evaluations, newest first."""
    path = _path("rollouts", str(rollout_id), "evaluations")
    _json_errors(as_json)
    body = _paged(_client(ctx), path, {"gate": gate}, limit, 1000)
    if as_json:
        _print_json(body)
        return
    if not body["items"]:
        _console().print(Text(f"rollout {rollout_id} has no gate evaluations", style="dim"))
        return
    title = f"rollout #{rollout_id}: gate evaluations"
    _console().print(render.evaluations_table(body["items"], title=title))


@app.command()
def services(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, max=100000)] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Every service opsapi knows: stable version and slot, latest rollout and its weight."""
    _json_errors(as_json)
    body = _paged(_client(ctx), "/services", {}, limit, 1000)
    if as_json:
        _print_json(body)
        return
    if not body["items"]:
        _console().print(Text("no services yet", style="dim"))
        return
    _console().print(render.services_table(body["items"], title=f"Services ({len(body['items'])})"))


# ---------------------------------------------------------------------------------------------
# Policy


class PolicyFormat(StrEnum):
    """Output formats of `opsctl policy get`."""

    yaml = "yaml"
    json = "json"


@policy_app.command("get")
def policy_get(
    ctx: typer.Context,
    service: Annotated[str, typer.Argument(help="The service.")],
    output: Annotated[
        PolicyFormat,
        typer.Option(
            "--output",
            "-o",
            help="yaml (editable: status as comments, service: line) or json (the policy "
            "document as the API answers it, without status).",
        ),
    ] = PolicyFormat.yaml,
) -> None:
    """The service's effective policy, ready to edit and apply.

    A service never configured has the server's default policy. YAML shows the read-only
    status as comments and names the service, so `opsctl policy apply -f FILE` needs no more.
    """
    _json_errors(output is PolicyFormat.json)
    document = _client(ctx).get(_path("services", service)).body
    if output is PolicyFormat.json:
        _print_json(policy_files.policy_part(document))
        return
    sys.stdout.write(policy_files.editable_yaml(service, document))
    sys.stdout.flush()


@policy_app.command("apply")
def policy_apply(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Option(
            "--file",
            "-f",
            help="The policy, YAML or JSON (.json); - for stdin. `status` is ignored.",
        ),
    ],
    service: Annotated[
        str | None,
        typer.Argument(help="The service (default: the file's service: line).", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the diff against the current policy; change nothing."),
    ] = False,
    idempotency_key: KeyOption = None,
) -> None:
    """Replace the service's policy (admin), showing the diff of the effective policy.

    Fields left out take the server's default. --dry-run shows the diff against the current
    policy without applying. Field errors are printed one per line (exit 7).
    """
    document = policy_files.load(file)
    name, body = policy_files.split(document, service, file)
    client = _client(ctx)
    before = policy_files.policy_part(client.get(_path("services", name)).body)
    if dry_run:
        after = policy_files.local_effective(body)
        labels = (f"{name} (current)", f"{name} (after applying {file})")
    else:
        key = idempotency_key or new_idempotency_key()
        try:
            answer = client.put(_path("services", name), body, idempotency_key=key)
        except OpsctlError as error:
            errors = (error.problem or {}).get("errors")
            if error.code is ExitCode.INVALID and isinstance(errors, list) and errors:
                detail = str((error.problem or {}).get("detail") or "the policy is invalid")
                raise policy_files.invalid_policy(detail, errors, body, error.problem) from None
            raise
        _report_replay(answer, key)
        after = policy_files.policy_part(answer.body)
        labels = (f"{name} (before)", f"{name} (after)")
    lines = policy_files.diff(before, after, *labels)
    console = _console()
    if lines:
        console.print(policy_files.diff_text(lines))
    outcome = Text()
    outcome.append(f"{name}: ", style="bold")
    if dry_run:
        outcome.append("dry run, nothing applied", style="yellow")
        outcome.append(" · " + ("no change" if not lines else "the diff above would apply"))
        outcome.append(
            "\nchecked here; the router's instance and parameters are checked when applied",
            style="dim",
        )
    else:
        outcome.append("policy applied", style="green")
        outcome.append(" · " + ("no change" if not lines else "changed as above"))
    console.print(outcome)


# ---------------------------------------------------------------------------------------------
# Audit


class AuditFormat(StrEnum):
    """Output formats of `opsctl audit`."""

    table = "table"
    json = "json"
    csv = "csv"


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    actor: Annotated[str | None, typer.Option("--actor", help="Who (token subject).")] = None,
    action: Annotated[
        str | None, typer.Option("--action", help="e.g. canary.promote.force")
    ] = None,
    service: Annotated[str | None, typer.Option("--service")] = None,
    rollout_id: Annotated[int | None, typer.Option("--rollout-id", min=1)] = None,
    outcome: Annotated[
        str | None,
        typer.Option("--outcome", help="success, denied, conflict, error or ignored."),
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="api, controller, pagerduty or system.")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="ISO 8601 time, or a duration such as 2h (= 2 h ago)."),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="ISO 8601 time, or a duration (ago).")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n", min=1, max=100000, help="At most this many (default 50; not csv)."
        ),
    ] = None,
    output: Annotated[
        AuditFormat, typer.Option("--format", "-f", help="table, json or csv.")
    ] = AuditFormat.table,
) -> None:
    """Audit events matching the filters, newest first (csv: every match, oldest first)."""
    if ctx.invoked_subcommand is not None:
        return
    client = _client(ctx)
    params: dict[str, Any] = {
        "actor": actor,
        "action": action,
        "service": service,
        "rollout_id": rollout_id,
        "outcome": outcome,
        "source": source,
        "since": render.since_param(since),
        "until": render.since_param(until),
    }
    if output is AuditFormat.csv:
        if limit is not None:
            raise typer.BadParameter(
                "the csv export has every matching event (oldest first); narrow it with "
                "--since/--until and the other filters",
                param_hint="--limit",
            )
        sys.stdout.write(client.get_text("/audit/export", {**params, "format": "csv"}))
        return
    _json_errors(output is AuditFormat.json)
    body = _paged(client, "/audit", params, limit or 50, 1000)
    if output is AuditFormat.json:
        _print_json(body)
        return
    if not body["items"]:
        _console().print(Text("no audit events match", style="dim"))
        return
    _console().print(render.audit_table(body["items"], title=f"audit ({len(body['items'])})"))


@audit_app.command("verify")
def audit_verify(
    ctx: typer.Context,
    expect_head: Annotated[
        str | None,
        typer.Option(
            "--expect-head",
            help="ID:HASH of a head kept earlier (an anchor): the chain must still hold it.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Verify the audit log's hash chain (exit 10 if it is broken or lost the anchor)."""
    _json_errors(as_json)
    body = _client(ctx).get("/audit/verify", {"expect_head": expect_head}).body
    if as_json:
        _print_json(body)
    if body.get("intact") is True:
        if not as_json:
            text = Text("audit chain intact", style="bold green")
            text.append(f": {body.get('events')} events verified")
            if body.get("last_id") is not None:
                text.append(
                    f" (last event {body.get('last_id')}, hash {str(body.get('last_hash'))[:16]}…)",
                    style="dim",
                )
            expected = body.get("expected_head")
            if isinstance(expected, dict) and expected.get("matches"):
                text.append(f"; holds the expected head, event {expected.get('id')}")
            _console().print(text)
        return
    broken = body.get("first_broken") or {}
    extra = ", ".join(f"{k}={v}" for k, v in broken.items() if k not in ("id", "reason"))
    message = f"audit chain BROKEN at event {broken.get('id')}: {broken.get('reason')}"
    raise OpsctlError(ExitCode.AUDIT_BROKEN, message + (f" ({extra})" if extra else ""))


# ---------------------------------------------------------------------------------------------
# Execute


def _params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` (a string) and `k:=json` (a JSON value) pairs as a dict."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, raw_sep, value = pair.partition("=")
        if not raw_sep or not name:
            raise typer.BadParameter(f"{pair!r} is not k=v or k:=json", param_hint="--param")
        if name.endswith(":"):
            try:
                params[name[:-1]] = json.loads(value)
            except ValueError:
                raise typer.BadParameter(
                    f"{pair!r}: {value!r} is not JSON", param_hint="--param"
                ) from None
        else:
            params[name] = value
    return params


@app.command()
def execute(
    ctx: typer.Context,
    operation: Annotated[
        str, typer.Argument(help="health-check, gate-check, router-sync, set-weight, ...")
    ],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            help="k=v (a string) or k:=json (a number, boolean, ...); repeatable.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would happen; change nothing.")
    ] = False,
    idempotency_key: KeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run a named operation (each has its own role and typed parameters)."""
    body = {"operation": operation, "params": _params(param or []), "dry_run": dry_run}
    key = idempotency_key or new_idempotency_key()
    _json_errors(as_json)
    answer = _client(ctx).post("/execute", body, idempotency_key=key)
    _report_replay(answer, key)
    if as_json:
        _print_json(answer.body)
        return
    result = answer.body if isinstance(answer.body, dict) else {"result": answer.body}
    head = Text()
    head.append(f"{result.get('operation', operation)}", style="bold")
    head.append(" (dry run)" if result.get("dry_run") else "", style="yellow")
    changes = result.get("changes")
    head.append(f" · changes state: {'yes' if changes else 'no'}", style="dim")
    console = _console()
    console.print(head)
    console.print_json(json.dumps(result.get("result"), default=str))


def main() -> None:
    """Entry point of the `opsctl` console script."""
    try:
        app(prog_name="opsctl")
    except OpsctlError as error:
        if _Output.json_errors and error.problem is not None:
            _print_json(error.problem)
        print(f"opsctl: {error.message}", file=sys.stderr)
        sys.exit(int(error.code))


if __name__ == "__main__":
    main()
