"""Rich renderings of the API's documents: the rollout view, its step ladder, gates, tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from opsapi.durations import parse_duration

OPEN_STATES = frozenset({"progressing", "paused", "awaiting_promotion", "baking"})
TERMINAL_STATES = frozenset({"succeeded", "rolled_back", "reverted"})
STATE_STYLES = {
    "progressing": "bold cyan",
    "paused": "bold yellow",
    "awaiting_promotion": "bold magenta",
    "baking": "bold blue",
    "succeeded": "bold green",
    "rolled_back": "bold red",
    "reverted": "bold yellow",
}
# What the version in a slot is to the rollout (see `slot_rows`).
ROLE_STYLES = {
    "stable": "bold green",
    "canary": "bold cyan",
    "rolled back": "red",
    "reverted": "yellow",
    "previous": "dim",
    "idle": "dim",
}
PHASE_STYLES = {"pass": "green", "fail": "bold red", "no_data": "yellow", "pending": "dim"}
OUTCOME_STYLES = {
    "success": "green",
    "denied": "bold red",
    "conflict": "yellow",
    "error": "red",
    "ignored": "dim",
}
DASH = "—"


def seconds_of(duration: object) -> float | None:
    """Seconds in an API duration string ("15m", "1m30s", "250ms"); None if absent or odd."""
    if not isinstance(duration, str):
        return None
    try:
        return parse_duration(duration).total_seconds()
    except ValueError:
        return None


def human(seconds: float | None) -> str:
    """Whole seconds as "1h2m3s" (the API's style, without the milliseconds)."""
    if seconds is None:
        return DASH
    total = max(0, int(seconds))
    if total == 0:
        return "0s"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n]
    return "".join(parts)


def parse_time(value: object) -> datetime | None:
    """An API timestamp ("2026-11-22T06:00:06.924647Z") as an aware datetime."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def short_time(value: object) -> str:
    """A timestamp as "2026-11-22 06:00:06Z"."""
    parsed = parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if parsed else DASH


def ago(value: object, now: datetime | None = None) -> str:
    """A timestamp as "06:00:06Z (2m10s ago)"."""
    parsed = parse_time(value)
    if parsed is None:
        return DASH
    now = now or datetime.now(UTC)
    delta = (now - parsed).total_seconds()
    clock = parsed.astimezone(UTC).strftime("%H:%M:%SZ")
    return f"{clock} ({human(delta)} ago)" if delta >= 0 else clock


def number(value: object) -> str:
    """A gate value or threshold, short."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:.4g}"
    return str(value)


def state_text(state: object) -> Text:
    """A rollout state, coloured."""
    name = str(state)
    return Text(name, style=STATE_STYLES.get(name, "bold"))


def phase_text(phase: object, breached: object = False) -> Text:
    """A gate phase, coloured; a breached gate says so."""
    name = str(phase)
    text = Text(name, style=PHASE_STYLES.get(name, ""))
    if breached:
        text.append(" (breached)", style="bold red")
    return text


def _steps(rollout: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    steps = rollout.get("steps")
    return [step for step in steps if isinstance(step, Mapping)] if isinstance(steps, list) else []


def ladder(rollout: Mapping[str, Any]) -> Text:
    """The step ladder: `10% ✓ → 25% ▶ → 50% → 75% → 100%` (done ✓, current ▶, ✗ rolled back)."""
    state = str(rollout.get("state"))
    index = int(rollout.get("step_index") or 0)
    text = Text()
    for position, step in enumerate(_steps(rollout)):
        if position:
            text.append(" → ", style="dim")
        label = f"{step.get('weight')}%"
        if state in ("succeeded", "reverted") or position < index:
            text.append(label + " ✓", style="green" if state != "reverted" else "dim")
        elif position == index and state == "rolled_back":
            text.append(label + " ✗", style="bold red")
        elif position == index and state == "paused":
            text.append(label + " ⏸", style="bold reverse yellow")
        elif position == index:
            text.append(label + " ▶", style="bold reverse cyan")
        else:
            text.append(label, style="dim")
    return text


class WaitBar(ProgressBar):
    """rich's progress bar, whose unfinished part stays visible without colours (pipes, logs)."""

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """Render the bar; without colours, draw the remainder as a thin line."""
        segments = list(super().__rich_console__(console, options))
        yield from segments
        if console.no_color or console.color_system is None:
            width = min(self.width or options.max_width, options.max_width)
            drawn = sum(len(segment.text) for segment in segments if isinstance(segment, Segment))
            if width > drawn:
                yield Segment("─" * (width - drawn))


def _step_wait(rollout: Mapping[str, Any]) -> float | None:
    steps = _steps(rollout)
    index = int(rollout.get("step_index") or 0)
    return seconds_of(steps[index].get("wait")) if 0 <= index < len(steps) else None


def wait_progress(rollout: Mapping[str, Any], width: int = 40) -> RenderableType | None:
    """The current step's wait as a progress bar: waited / step wait, and the time left."""
    if rollout.get("state") not in OPEN_STATES:
        return None
    total = _step_wait(rollout)
    waited = seconds_of(rollout.get("waited"))
    left = seconds_of(rollout.get("time_left"))
    if total is None or waited is None:
        return None
    done = min(waited, total) if total > 0 else 1.0
    bar = WaitBar(
        total=total or 1.0,
        completed=done,
        width=width,
        complete_style="cyan",
        finished_style="green",
        pulse=False,
    )
    what = "bake" if _is_last_step(rollout) else "wait"
    caption = Text(f"{human(min(waited, total))} of {human(total)} {what}")
    if rollout.get("state") == "paused":
        caption.append(f" · paused, {human(left)} left (clock frozen)", style="yellow")
    elif left is not None and left > 0:
        caption.append(f" · {human(left)} left", style="bold")
    else:
        caption.append(f" · {what} over", style="green")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column()
    grid.add_row(Text(what.capitalize(), style="bold"), bar, caption)
    return grid


def _is_last_step(rollout: Mapping[str, Any]) -> bool:
    steps = _steps(rollout)
    index = int(rollout.get("step_index") or 0)
    return bool(steps) and index == len(steps) - 1


def gate_table(gates: Sequence[Mapping[str, Any]], now: datetime | None = None) -> Table:
    """The gate table: name, phase (coloured), value, threshold, failing since, detail."""
    table = Table(title="Gates", title_justify="left", expand=False)
    table.add_column("gate", style="bold", no_wrap=True)
    table.add_column("phase", no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("failing since", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for gate in gates:
        table.add_row(
            Text(str(gate.get("name"))),
            phase_text(gate.get("phase"), gate.get("breached")),
            number(gate.get("value")),
            number(gate.get("threshold")),
            ago(gate.get("failing_since"), now),
            Text(str(gate.get("detail") or "")),
        )
    return table


def weights(rollout: Mapping[str, Any]) -> Text:
    """Desired vs applied weight, with the router's error if it has one."""
    desired, applied = rollout.get("desired_weight"), rollout.get("applied_weight")
    text = Text()
    text.append("Weight ", style="bold")
    text.append(f"desired {desired}%")
    text.append(" · ")
    text.append(f"applied {applied}%", style="green" if desired == applied else "bold yellow")
    if desired != applied:
        text.append("  (router has not applied it yet)", style="yellow")
    router = rollout.get("router")
    if isinstance(router, Mapping) and router.get("name"):
        text.append(f"  router {router.get('name')}", style="dim")
    error = rollout.get("router_error")
    if error:
        text.append("\nRouter error ", style="bold red")
        text.append(str(error), style="red")
        attempts, retry_at = rollout.get("router_attempts"), rollout.get("router_retry_at")
        if attempts:
            text.append(f" (attempt {attempts}", style="red")
            text.append(f", retry at {short_time(retry_at)})" if retry_at else ")", style="red")
    return text


@dataclass(frozen=True)
class SlotRow:
    """One slot of a rollout: the version it runs, what that version is, its traffic share."""

    slot: str
    version: str | None
    # stable, canary, rolled back, reverted, previous (what a revert goes back to) or idle
    role: str
    weight: int | None
    target: str | None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def slot_rows(rollout: Mapping[str, Any]) -> list[SlotRow]:
    """Which version runs in which slot, in the policy's slot order.

    The stable slot runs the stable version. The canary slot, when it is another slot, runs the
    canary version (rolled back or reverted once finished). After a success both name the same
    slot; the other one still runs the previous version while a revert can go back to it."""
    targets, weights = _mapping(rollout.get("targets")), _mapping(rollout.get("weights"))
    stable_slot, canary_slot = rollout.get("stable_slot"), rollout.get("canary_slot")
    names = [str(name) for name in (targets or weights)]
    if not names:
        names = [str(name) for name in dict.fromkeys((stable_slot, canary_slot)) if name]
    previous = _mapping(rollout.get("previous"))
    state = rollout.get("state")
    rows = []
    for name in names:
        version: object
        if name == stable_slot:
            version, role = rollout.get("stable_version"), "stable"
        elif name == canary_slot:
            version = rollout.get("canary_version")
            role = {"rolled_back": "rolled back", "reverted": "reverted"}.get(str(state), "canary")
        elif previous.get("slot") == name:
            version, role = previous.get("version"), "previous"
        else:
            version, role = None, "idle"
        weight = weights.get(name)
        target = targets.get(name)
        rows.append(
            SlotRow(
                slot=name,
                version=str(version) if version else None,
                role=role,
                weight=weight if isinstance(weight, int) else None,
                target=str(target) if target else None,
            )
        )
    return rows


def slots_grid(rollout: Mapping[str, Any]) -> Table:
    """One line per slot: name, version, role, desired traffic share, and the target when the
    router names one (the target folds first on a narrow terminal, never the version)."""
    rows = slot_rows(rollout)
    with_targets = any(row.target for row in rows)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    if with_targets:
        grid.add_column(overflow="fold", style="dim")
    for row in rows:
        share = Text(DASH if row.weight is None else f"{row.weight}%")
        version = Text(row.version or "unknown", style="" if row.version else "dim")
        cells: list[RenderableType] = [
            row.slot,
            version,
            Text(row.role, style=ROLE_STYLES.get(row.role, "")),
            share,
        ]
        if with_targets:
            cells.append(row.target or DASH)
        grid.add_row(*cells)
    return grid


def revert_text(rollout: Mapping[str, Any]) -> Text | None:
    """What `opsctl revert` would go back to; None when the question does not arise."""
    previous = _mapping(rollout.get("previous"))
    if previous.get("version"):
        text = Text(f"would go back to {previous.get('version')} in slot {previous.get('slot')}")
        text.append(f" (opsctl revert {rollout.get('service')})", style="dim")
        return text
    if rollout.get("state") == "succeeded":
        return Text("nothing to go back to", style="dim")
    return None


def slots_block(rollout: Mapping[str, Any]) -> RenderableType:
    """The slots and the revert target under a label, as after a change."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    _add_slot_rows(grid, rollout)
    return grid


def _add_slot_rows(grid: Table, rollout: Mapping[str, Any]) -> None:
    if slot_rows(rollout):
        grid.add_row("Slots", slots_grid(rollout))
    revert = revert_text(rollout)
    if revert is not None:
        grid.add_row("Revert", revert)


def versions_text(rollout: Mapping[str, Any]) -> Text:
    """The versions, as the rollout's state makes them: canary vs stable, or what is stable."""
    state = rollout.get("state")
    canary, stable = rollout.get("canary_version"), rollout.get("stable_version")
    text = Text()
    if state == "succeeded":
        text.append(str(canary), style="bold green")
        text.append(" (stable since this rollout)")
        return text
    if state == "reverted":
        text.append(str(stable or DASH), style="bold")
        text.append(" (stable again) · ")
        text.append(str(canary), style="yellow")
        text.append(" (reverted)")
        return text
    text.append(str(canary), style="bold cyan")
    text.append(" (canary, rolled back) vs " if state == "rolled_back" else " (canary) vs ")
    if stable:
        text.append(str(stable), style="bold")
        text.append(" (stable)")
    else:
        text.append("no stable version (first rollout)", style="dim")
    return text


def traffic_text(rollout: Mapping[str, Any]) -> Text:
    """Where traffic goes (version and slot, the biggest share first) and whether the router
    has made it so."""
    rows = sorted(slot_rows(rollout), key=lambda row: -(row.weight or 0))
    text = Text()
    text.append("Traffic ", style="bold")
    text.append(
        ", ".join(
            f"{row.weight}% to {row.slot} ({row.version or 'unknown version'})"
            for row in rows
            if row.weight is not None
        )
        or DASH
    )
    desired, applied = rollout.get("desired_weight"), rollout.get("applied_weight")
    if applied is not None and applied == desired:
        text.append("\n        already there: the router has applied it", style="green")
    else:
        text.append("\n        not there yet: ", style="bold yellow")
        canary = next((row for row in rows if row.slot == rollout.get("canary_slot")), None)
        if applied is None or canary is None:
            text.append("the router has not confirmed a weight", style="yellow")
        else:
            text.append(
                f"the router still sends {applied}% to {canary.slot} ({canary.version})",
                style="yellow",
            )
        error = rollout.get("router_error")
        if error:
            text.append(f"\n        router error: {error}", style="red")
    return text


def header(rollout: Mapping[str, Any]) -> Table:
    """Service, versions, state, who triggered the last transition, reason."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("Versions", versions_text(rollout))
    state = state_text(rollout.get("state"))
    if rollout.get("state") in OPEN_STATES and rollout.get("ready"):
        state.append("  ready to promote", style="green")
    blocked = rollout.get("blocked_by")
    if isinstance(blocked, list) and blocked:
        state.append("  blocked by " + ", ".join(str(g) for g in blocked), style="yellow")
    grid.add_row("State", state)
    grid.add_row("Triggered by", Text(str(rollout.get("triggered_by") or DASH)))
    grid.add_row("Reason", Text(str(rollout.get("reason") or DASH)))
    started = Text(f"{short_time(rollout.get('created_at'))} by {rollout.get('created_by')}")
    grid.add_row("Started", started)
    if rollout.get("finished_at"):
        grid.add_row("Finished", Text(short_time(rollout.get("finished_at"))))
    elif rollout.get("next_evaluation_at"):
        grid.add_row("Next check", Text(short_time(rollout.get("next_evaluation_at"))))
    return grid


def rollout_view(rollout: Mapping[str, Any], now: datetime | None = None) -> RenderableType:
    """The whole view of one rollout, as `opsctl status SERVICE` shows it."""
    steps_line = Text()
    steps_line.append("Steps  ", style="bold")
    steps_line.append_text(ladder(rollout))
    parts: list[RenderableType] = [header(rollout), Text(""), slots_block(rollout), steps_line]
    progress = wait_progress(rollout)
    if progress is not None:
        parts.append(progress)
    parts.append(weights(rollout))
    gates = rollout.get("gates")
    if isinstance(gates, list) and gates:
        parts.append(gate_table([g for g in gates if isinstance(g, Mapping)], now))
    else:
        parts.append(Text("Gates  none in this rollout's policy", style="dim"))
    title = Text()
    title.append(f"{rollout.get('service')} ", style="bold")
    title.append(f"rollout #{rollout.get('id')}", style="dim")
    return Panel(Group(*parts), title=title, title_align="left", expand=True)


def summary(rollout: Mapping[str, Any]) -> Text:
    """One line after a change: state, weight, step and time left."""
    steps = _steps(rollout)
    index = int(rollout.get("step_index") or 0)
    state = str(rollout.get("state"))
    text = Text()
    text.append(f"{rollout.get('service')}: ", style="bold")
    text.append_text(state_text(state))
    if state == "succeeded":
        text.append(
            f" — {rollout.get('canary_version')} is the new stable version at 100% "
            f"in slot {rollout.get('stable_slot')}"
        )
        return text
    if state == "reverted":
        text.append(
            f" — {rollout.get('stable_version')} is stable again at 100% "
            f"in slot {rollout.get('stable_slot')}"
        )
        return text
    if state == "rolled_back":
        text.append(f" — canary weight {rollout.get('desired_weight')}%")
        at_zero = rollout.get("traffic_at_zero")
        if at_zero is False or rollout.get("applied_weight") not in (0, None):
            text.append(
                f" (router still applies {rollout.get('applied_weight')}%)", style="bold yellow"
            )
        return text
    text.append(f" at {rollout.get('desired_weight')}%")
    if steps:
        text.append(f" (step {index + 1}/{len(steps)})")
    left = seconds_of(rollout.get("time_left"))
    if state == "paused":
        text.append(f", clock frozen with {human(left)} left", style="yellow")
    elif rollout.get("ready"):
        text.append(", ready to promote", style="green")
    elif left is not None:
        what = "bake" if _is_last_step(rollout) else "wait"
        text.append(f", {human(left)} left in the {what}")
    return text


def gates_summary(gates: object, separator: str = ", ") -> Text:
    """ "2 pass, 1 fail" for a table cell."""
    if not isinstance(gates, list) or not gates:
        return Text(DASH, style="dim")
    counts: dict[str, int] = {}
    for gate in gates:
        if isinstance(gate, Mapping):
            phase = str(gate.get("phase"))
            counts[phase] = counts.get(phase, 0) + 1
    text = Text()
    for position, (phase, count) in enumerate(sorted(counts.items())):
        if position:
            text.append(separator)
        text.append(f"{count} {phase}", style=PHASE_STYLES.get(phase, ""))
    return text


def _in_slot(version: object, slot: object) -> Text:
    # The slot under the version: two short lines keep the table within 80 columns.
    text = Text(str(version or DASH))
    if slot:
        text.append(f"\n{slot}", style="dim")
    return text


def rollouts_table(rollouts: Iterable[Mapping[str, Any]], *, title: str) -> Table:
    """Open rollouts, one row each: versions over their slots, state, weight, step and time
    left, gates. Light borders and no "triggered by" (`status SERVICE` has it), so that it
    fits 80 columns."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0)
    )
    for column in ("rollout", "canary", "stable", "state", "weight", "step", "gates"):
        # Versions fold rather than lose their end (a build hash is read to its last character).
        table.add_column(
            column,
            no_wrap=column in ("rollout", "state"),
            overflow="fold" if column in ("canary", "stable") else "ellipsis",
        )
    for rollout in rollouts:
        steps = _steps(rollout)
        index = int(rollout.get("step_index") or 0)
        desired, applied = rollout.get("desired_weight"), rollout.get("applied_weight")
        weight = Text(f"{desired}%")
        if desired != applied:
            weight.append(f" (applied {applied}%)", style="yellow")
        name = Text(str(rollout.get("service")), style="bold")
        name.append(f" #{rollout.get('id')}", style="dim")
        step = Text(f"{index + 1}/{len(steps)}" if steps else DASH)
        left = seconds_of(rollout.get("time_left"))
        if left is not None:
            step.append(f"\n{human(left)} left", style="dim")
        table.add_row(
            name,
            _in_slot(rollout.get("canary_version"), rollout.get("canary_slot")),
            _in_slot(rollout.get("stable_version"), rollout.get("stable_slot")),
            state_text(rollout.get("state")),
            weight,
            step,
            gates_summary(rollout.get("gates"), separator="\n"),
        )
    return table


def services_table(services: Iterable[Mapping[str, Any]], *, title: str) -> Table:
    """Services, one row each: stable version over its slot, the latest rollout (id, canary
    version, state) and its weight, the router."""
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1, 0, 0)
    )
    table.add_column("service", no_wrap=True, style="bold")
    table.add_column("stable", overflow="fold")
    table.add_column("latest rollout", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("weight", no_wrap=True)
    table.add_column("router", overflow="fold")
    for item in services:
        latest = _mapping(item.get("latest_rollout"))
        rollout = Text(DASH, style="dim")
        state: Text = Text(DASH, style="dim")
        weight = Text(DASH, style="dim")
        if latest:
            rollout = Text(f"#{latest.get('id')} ", style="dim")
            rollout.append(str(latest.get("canary_version")), style="")
            state = state_text(latest.get("state"))
            desired, applied = latest.get("desired_weight"), latest.get("applied_weight")
            weight = Text(f"{desired}%")
            if desired != applied:
                weight.append(f"\n(applied {applied}%)", style="yellow")
        router = Text(str(item.get("router") or DASH))
        if not item.get("configured"):
            router.append("\ndefault policy", style="dim")
        table.add_row(
            str(item.get("name")),
            _in_slot(item.get("stable_version") or "none yet", item.get("stable_slot")),
            rollout,
            state,
            weight,
            router,
        )
    return table


def history_table(rollouts: Iterable[Mapping[str, Any]], *, title: str) -> Table:
    """A service's rollouts, newest first."""
    table = Table(title=title, title_justify="left")
    for name in ("id", "canary", "stable", "state", "weight", "step", "started", "finished"):
        table.add_column(name, no_wrap=True)
    table.add_column("by")
    table.add_column("reason", overflow="fold")
    for rollout in rollouts:
        steps = _steps(rollout)
        index = int(rollout.get("step_index") or 0)
        table.add_row(
            str(rollout.get("id")),
            Text(str(rollout.get("canary_version"))),
            Text(str(rollout.get("stable_version") or DASH)),
            state_text(rollout.get("state")),
            f"{rollout.get('desired_weight')}%",
            f"{index + 1}/{len(steps)}" if steps else DASH,
            short_time(rollout.get("created_at")),
            short_time(rollout.get("finished_at")),
            Text(str(rollout.get("created_by") or DASH)),
            Text(str(rollout.get("reason") or "")),
        )
    return table


def evaluations_table(items: Iterable[Mapping[str, Any]], *, title: str) -> Table:
    """Gate evaluations, newest first."""
    table = Table(title=title, title_justify="left")
    for name in ("id", "at", "gate", "step", "phase"):
        table.add_column(name, no_wrap=True)
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("detail", overflow="fold")
    for item in items:
        step = item.get("step_index")
        table.add_row(
            str(item.get("id")),
            short_time(item.get("at")),
            Text(str(item.get("gate"))),
            f"{int(step) + 1} ({item.get('weight')}%)" if isinstance(step, int) else DASH,
            phase_text(item.get("phase"), item.get("breached")),
            number(item.get("value")),
            number(item.get("threshold")),
            Text(str(item.get("detail") or "")),
        )
    return table


def audit_table(events: Iterable[Mapping[str, Any]], *, title: str) -> Table:
    """Audit events."""
    table = Table(title=title, title_justify="left")
    for name in ("id", "at", "actor", "source", "action", "service", "rollout", "outcome"):
        table.add_column(name, no_wrap=name not in ("actor",))
    table.add_column("details", overflow="fold")
    for event in events:
        outcome = str(event.get("outcome"))
        details = event.get("details")
        table.add_row(
            str(event.get("id")),
            short_time(event.get("at")),
            Text(str(event.get("actor") or DASH)),
            Text(str(event.get("source") or DASH)),
            Text(str(event.get("action") or DASH)),
            Text(str(event.get("service") or DASH)),
            str(event.get("rollout_id") or DASH),
            Text(outcome, style=OUTCOME_STYLES.get(outcome, "")),
            Text(_pairs(details)),
        )
    return table


def _pairs(details: object) -> str:
    """Audit details as `key=value` pairs, easier to scan than JSON."""
    if not isinstance(details, Mapping):
        return "" if details is None else json.dumps(details, default=str)
    parts = []
    for key, value in details.items():
        shown = value if isinstance(value, str) and " " not in value else None
        text = shown if shown is not None else json.dumps(value, default=str)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def since_param(value: str | None, now: datetime | None = None) -> str | None:
    """`--since 2h` means two hours ago (ISO 8601 UTC); anything else is passed as given."""
    if value is None:
        return None
    seconds = seconds_of(value)
    if seconds is None:
        return value
    moment = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
