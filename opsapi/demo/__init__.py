"""`opsapi demo`: a real canary on this machine in one command.

It starts, on free loopback ports in one directory: two instances of a small demo app (the
slots blue and green of the service `checkout`, exporting the metric conventions), Prometheus
scraping them every second, nginx in front of them, and `opsapi serve` (SQLite, or the database
of `OPSAPI_DATABASE_URL`) with the nginx router and the release checklist's gates. Then it runs a
narrated release script (see `opsapi.demo.script`) and keeps the stack up until Ctrl-C, which
stops every process it started. Needs the `prometheus` and `nginx` programs (Debian/Ubuntu:
`apt-get install prometheus nginx`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_API_PORT = 8080


def add_demo_command(commands: Any) -> None:
    """Add `demo` to the `opsapi` subcommands."""
    demo = commands.add_parser(
        "demo",
        help="start a real canary stack on this machine (needs prometheus and nginx) and "
        "run a narrated release",
        description="Start, on free loopback ports: two demo app slots, Prometheus (1 s "
        "scrapes), nginx in front of the slots and opsapi (SQLite, or OPSAPI_DATABASE_URL) "
        "with the nginx router and the release checklist's gates; print the API URL, an admin "
        "token and an opsctl line; then run a narrated release: v2 to success, v3 rolled back "
        "by a gate breach, v4 rolled back by a signed PagerDuty webhook. Ctrl-C stops "
        "everything it started. Needs the programs prometheus and nginx (Debian/Ubuntu: "
        "sudo apt-get install prometheus nginx).",
    )
    demo.add_argument(
        "--no-script", action="store_true", help="only start the stack and wait (release by hand)"
    )
    demo.add_argument(
        "--step-wait",
        default="10s",
        metavar="DURATION",
        help="each step's wait and the bake (default 10s)",
    )
    demo.add_argument(
        "--gate-for",
        default="10s",
        metavar="DURATION",
        help="how long a gate must fail to breach; the checklist's 5m/2m "
        "shortened for the demo (default 10s)",
    )
    demo.add_argument(
        "--dir",
        type=Path,
        metavar="DIR",
        help="working directory, kept afterwards (default: a temporary one, removed on exit)",
    )
    demo.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help=f"opsapi's port (default {DEFAULT_API_PORT}, or a free one if it is taken)",
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run `opsapi demo`; 0 after Ctrl-C, 1 when something it needs fails, 2 bad arguments."""
    from opsapi.demo.main import run

    return run(args)
