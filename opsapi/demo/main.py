"""`opsapi demo` itself: check the prerequisites, start the stack, print where everything is,
run the scripted release (or not), and stop every process on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType

from opsapi.auth.identity import Role
from opsapi.auth.tokens import LocalSigner
from opsapi.demo import DEFAULT_API_PORT
from opsapi.demo.script import (
    MIN_SAMPLE,
    PAGERDUTY_SERVICE_ID,
    TRAFFIC_RPS,
    Api,
    Narrator,
    Script,
    Traffic,
    demo_policy,
)
from opsapi.demo.stack import Binaries, DemoError, Stack, find_binaries, free_port, port_is_free
from opsapi.durations import format_duration, parse_duration

SERVICE = "checkout"


def run(args: argparse.Namespace) -> int:
    """Run `opsapi demo`; 0 after Ctrl-C, 1 when something it needs fails, 2 bad arguments."""
    try:
        step_wait = _duration("--step-wait", args.step_wait, least=timedelta(seconds=1))
        gate_for = _duration("--gate-for", args.gate_for, least=timedelta(0))
    except ValueError as error:
        print(f"opsapi demo: {error}", file=sys.stderr)
        return 2
    if args.port is not None and not 1 <= args.port <= 65535:
        print("opsapi demo: --port must be within 1-65535", file=sys.stderr)
        return 2
    try:
        binaries = find_binaries()
    except DemoError as error:
        print(f"opsapi demo: {error}", file=sys.stderr)
        return 1
    if args.port is not None:
        port = args.port
        if not port_is_free(port):
            print(
                f"opsapi demo: port {port} is in use; choose another with --port", file=sys.stderr
            )
            return 1
    else:
        port = DEFAULT_API_PORT if port_is_free(DEFAULT_API_PORT) else free_port()
    own_dir = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="opsapi-demo-")) if own_dir else args.dir.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return _run(directory, own_dir, port, binaries, step_wait, gate_for, not args.no_script)


def _duration(option: str, text: str, *, least: timedelta) -> timedelta:
    try:
        value = parse_duration(text)
    except ValueError as error:
        raise ValueError(f"{option}: {error}") from None
    if value < least:
        raise ValueError(f"{option}: at least {format_duration(least)}")
    return value


class _Stop(Exception):
    """SIGTERM: end like Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _run(
    directory: Path,
    own_dir: bool,
    port: int,
    binaries: Binaries,
    step_wait: timedelta,
    gate_for: timedelta,
    script: bool,
) -> int:
    narrator = Narrator()
    stack = Stack(directory, binaries, api_port=port)
    traffic: Traffic | None = None
    api: Api | None = None
    code = 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        narrator.show(
            f"opsapi demo: a real canary on this machine (Ctrl-C stops everything); "
            f"files in {directory}"
        )
        webhook_secret = secrets.token_hex(24)
        admin, operator = _tokens(stack.key_file)
        database_url = os.environ.get("OPSAPI_DATABASE_URL")
        prometheus = stack.spawn_prometheus()
        stack.start_opsapi(database_url, webhook_secret)
        narrator.say(f"opsapi serving on {stack.api_base}")
        api = Api(stack.api_base, operator)
        admin_api = Api(stack.api_base, admin)
        try:
            stack.service = _unused_service(admin_api)
            if stack.service != SERVICE:
                narrator.say(
                    f"the database already has releases of {SERVICE}: this run's "
                    f"service is {stack.service}"
                )
            stack.start_slots("v1")
            narrator.say("demo app slots blue (v1) and green (empty) answering")
            stack.start_nginx()
            narrator.say(f"nginx proxying {stack.traffic_url} to slot blue")
            stack.wait_scraped(prometheus)
            narrator.say(f"Prometheus on {stack.prometheus_url} has scraped both slots")
            policy = demo_policy(stack, step_wait, gate_for)
            admin_api.expect("PUT", f"/services/{stack.service}", policy)
            console = _console_url(admin_api)
        finally:
            admin_api.close()
        traffic = Traffic(stack.traffic_url)
        traffic.start()
        _print_stack(narrator, stack, admin, database_url, console, step_wait, gate_for)
        if script:
            Script(
                stack,
                api,
                narrator,
                step_wait=step_wait,
                gate_for=gate_for,
                webhook_secret=webhook_secret,
            ).run()
            narrator.show()
            narrator.show("The stack keeps running for you to explore; Ctrl-C stops it.")
        else:
            narrator.show()
            narrator.show(
                f"No script (--no-script). Deploy a version into a slot by writing its "
                f"control file, e.g. {stack.slots['green'].control}: "
                '{"version": "v2"}; then start it with opsctl or the API. '
                "Ctrl-C stops everything."
            )
        _watch(stack)
    except (KeyboardInterrupt, _Stop):
        pass
    except DemoError as error:
        print(f"opsapi demo: {error}", file=sys.stderr, flush=True)
        narrator.show(f"opsapi demo failed: {error}")
        code = 1
        own_dir = False  # keep the logs of what failed
    finally:
        # A second Ctrl-C must not leave processes behind half-way through stopping them.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        narrator.show("stopping: opsapi, nginx, Prometheus, the demo apps …")
        if traffic is not None:
            traffic.close()
        if api is not None:
            api.close()
        stack.stop()
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
        narrator.show(
            "stopped; nothing the demo started is running"
            + ("" if own_dir else f" (files and logs kept in {directory})")
        )
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return code


def _tokens(key_file: Path) -> tuple[str, str]:
    """An admin token (printed for the user) and an operator token (the script's)."""
    key_file.parent.mkdir(parents=True, exist_ok=True)
    signer = LocalSigner.load_or_create(key_file)
    return (
        signer.mint(subject="demo-admin", roles=[Role.ADMIN]),
        signer.mint(subject="demo-pipeline", roles=[Role.OPERATOR]),
    )


def _unused_service(api: Api) -> str:
    """`checkout`, or `checkout-2`, `checkout-3` … when a database kept from an earlier run
    already has releases of it (its stable version and rejected versions would get in the way)."""
    for number in range(1, 100):
        name = SERVICE if number == 1 else f"{SERVICE}-{number}"
        status = api.expect("GET", f"/services/{name}").get("status") or {}
        if status.get("latest_rollout") is None and status.get("stable_version") is None:
            return name
    raise DemoError("the database already has releases of checkout … checkout-99; use a fresh one")


def _console_url(api: Api) -> str | None:
    """The web console's URL, when this opsapi serves one."""
    status, _ = api.call("GET", "/console/")  # 200, or a redirect to its sign-in page
    return None if status == 404 else f"{api.base}/internal/ops/console/"


def _print_stack(
    narrator: Narrator,
    stack: Stack,
    admin: str,
    database_url: str | None,
    console: str | None,
    step_wait: timedelta,
    gate_for: timedelta,
) -> None:
    blue, green = stack.slots["blue"], stack.slots["green"]
    database = "OPSAPI_DATABASE_URL" if database_url else f"SQLite {stack.directory / 'opsapi.db'}"
    show = narrator.show
    show()
    show(f"  opsapi API   {stack.api_base}/internal/ops  ({database})")
    if console:
        show(f"  console      {console}  (sign in with the admin token)")
    show(f"  admin token  {admin}")
    show(
        f"  opsctl       OPSAPI_URL={stack.api_base} OPSAPI_TOKEN={admin} opsctl status "
        f"{stack.service} --watch"
    )
    show(
        f"  traffic      {stack.traffic_url}  (nginx; {TRAFFIC_RPS:g} requests/s sent by the demo)"
    )
    show(
        f"  slots        blue {blue.address} (v1), green {green.address} (empty); control "
        f"files in {blue.control.parent}"
    )
    show(f"  Prometheus   {stack.prometheus_url}  (scrapes both slots and opsapi every 1 s)")
    show(f"  logs         {stack.directory / 'logs'}")
    wait = format_duration(step_wait)
    show()
    show(
        f"Policy of {stack.service}: steps 10 % → 25 % → 50 % → 100 %, {wait} each (the last is "
        "the bake), auto_promote, evaluated every 1s, nginx router over the slots blue and "
        f"green, PagerDuty service {PAGERDUTY_SERVICE_ID} mapped. Gates: the release checklist's "
        "defaults (p95-latency < 10 s, error-rate < 1 %, success-rate ≥ 95 %, "
        "webhook-signature-verification ≥ 99.9 %, db-connection-failures < 5 %) with their "
        f"queries and thresholds, but `for` shortened from 5m/2m to {format_duration(gate_for)} "
        f"for the demo; min_sample: no gate counts before {MIN_SAMPLE} canary requests (a new "
        "series is invisible to rate() until its second scrape)."
    )


def _watch(stack: Stack) -> None:
    """Until Ctrl-C; DemoError when one of the processes stops by itself."""
    while True:
        for child in stack.children:
            code = child.process.poll()
            if code is not None:
                raise DemoError(f"{child.name} stopped by itself ({code}): {child.tail()}")
        time.sleep(0.5)
