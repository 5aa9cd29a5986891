"""Rich renderings of the API's documents: the rollout view, its step ladder, gates, tables."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group, JustifyMethod, RenderableType, RenderResult
from rich.measure import Measurement
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
        width=None,  # as wide as the column below lets it be: narrower on a narrow terminal
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
    grid.add_column(min_width=8, max_width=width)  # wrapable: rich shrinks it first
    grid.add_column(overflow="fold")
    grid.add_row(Text(what.capitalize(), style="bold"), bar, caption)
    return grid


def _is_last_step(rollout: Mapping[str, Any]) -> bool:
    steps = _steps(rollout)
    index = int(rollout.get("step_index") or 0)
    return bool(steps) and index == len(steps) - 1


def gate_table(gates: Sequence[Mapping[str, Any]], now: datetime | None = None) -> Listing:
    """The gates: name, phase (coloured), value against the rule, failing since, detail."""
    columns = [
        Column("gate", fold_over=20),
        Column("phase"),
        Column("value", justify="right"),
        Column("rule", justify="right"),
        Column("failing since"),
        Column("detail", fold_over=20),
    ]
    rows: list[list[Text]] = []
    for gate in gates:
        rule = " ".join(
            part for part in (str(gate.get("op") or ""), number(gate.get("threshold"))) if part
        )
        since = gate.get("failing_since")
        if gate.get("for"):
            rule += f"\nfor {gate.get('for')}"
        rows.append([
            Text(str(gate.get("name")), style="bold"),
            phase_text(gate.get("phase"), gate.get("breached")),
            Text(number(gate.get("value"))),
            Text(rule),
            Text(ago(since, now).replace(" (", "\n(")) if since else _dim(DASH),
            Text(str(gate.get("detail") or "")),
        ])  # fmt: skip
    return Listing("Gates", columns, rows)


def _percent(weight: object) -> str:
    return DASH if weight is None else f"{weight}%"


def _pull(rollout: Mapping[str, Any]) -> bool:
    """Whether clients pull the rollout's weight (applied when one fetches it)."""
    router = rollout.get("router")
    return isinstance(router, Mapping) and router.get("name", "pull") == "pull"


def weights(rollout: Mapping[str, Any]) -> Text:
    """Desired vs applied weight, with the router's error if it has one."""
    desired, applied = rollout.get("desired_weight"), rollout.get("applied_weight")
    text = Text()
    text.append("Weight ", style="bold")
    text.append(f"desired {desired}%")
    text.append(" · ")
    text.append(
        f"applied {_percent(applied)}", style="green" if desired == applied else "bold yellow"
    )
    if desired != applied:
        pending = (
            "no client has fetched it yet" if _pull(rollout) else "router has not applied it yet"
        )
        text.append(f"  ({pending})", style="yellow")
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


class SlotsGrid:
    """One line per slot: name, version, role, desired traffic share, and the target when the
    router names one; on a terminal too narrow for that line, the target goes under the version
    (the version folds, never cut short)."""

    def __init__(self, rows: Sequence[SlotRow]) -> None:
        self.rows = list(rows)

    def grid(self, *, wide: bool) -> Table:
        """The slots as a grid: the target in its own column (`wide`) or under the version."""
        with_targets = any(row.target for row in self.rows)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(overflow="fold")
        grid.add_column(no_wrap=True)
        grid.add_column(justify="right", no_wrap=True)
        if with_targets and wide:
            grid.add_column(overflow="fold", style="dim")
        for row in self.rows:
            share = Text(DASH if row.weight is None else f"{row.weight}%")
            version = Text(row.version or "unknown", style="" if row.version else "dim")
            if with_targets and not wide:
                version.append(f"\n{row.target or DASH}", style="dim")
            cells: list[RenderableType] = [
                row.slot,
                version,
                Text(row.role, style=ROLE_STYLES.get(row.role, "")),
                share,
            ]
            if with_targets and wide:
                cells.append(row.target or DASH)
            grid.add_row(*cells)
        return grid

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The wide grid when its lines fit unbroken, else the narrow one."""
        wide = self.grid(wide=True)
        # Measured without the limit: a measurement is clamped to the width it is given.
        unlimited = options.update_width(10_000)
        fits = Measurement.get(console, unlimited, wide).maximum <= options.max_width
        yield wide if fits else self.grid(wide=False)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        """As wide as the wide grid, as narrow as the narrow one."""
        narrow = Measurement.get(console, options, self.grid(wide=False))
        wide = Measurement.get(console, options, self.grid(wide=True))
        return Measurement(narrow.minimum, wide.maximum)


def slots_grid(rollout: Mapping[str, Any]) -> SlotsGrid:
    """Which version runs in which slot, its role and share, and the target when named."""
    return SlotsGrid(slot_rows(rollout))


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
    grid.add_column(overflow="fold")
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
        if _pull(rollout):
            text.append("no pull client has fetched it yet", style="yellow")
        elif applied is None or canary is None:
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


def header(
    rollout: Mapping[str, Any], interval: str | None = None, now: datetime | None = None
) -> Table:
    """Service, versions, state, who triggered the last transition, reason, what comes next."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
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
    elif rollout.get("state") in OPEN_STATES:
        grid.add_row("Next", next_text(rollout, interval, now))
    return grid


def _next_weight(rollout: Mapping[str, Any]) -> str:
    steps = _steps(rollout)
    index = int(rollout.get("step_index") or 0)
    return f"{steps[index + 1].get('weight')}%" if index + 1 < len(steps) else "100%"


def next_text(
    rollout: Mapping[str, Any], interval: str | None = None, now: datetime | None = None
) -> Text:
    """What the machine does next: when the wait ends (`ready_at`), what follows (the controller
    promotes or succeeds, or a person promotes), and how often the gates are measured.

    Not `next_evaluation_at`: while the controller is measuring the gates it holds the rollout
    with a lease, and that field is the lease's end, not a plan."""
    state = str(rollout.get("state"))
    service = rollout.get("service")
    left = seconds_of(rollout.get("time_left"))
    blocked = [str(gate) for gate in rollout.get("blocked_by") or []]
    holds = [hold for hold in rollout.get("holds") or [] if isinstance(hold, Mapping)]
    baking = state == "baking" or _is_last_step(rollout)
    auto = bool(rollout.get("auto_promote"))
    then = (
        "it succeeds and its version becomes stable"
        if baking
        else (
            f"the controller promotes it to {_next_weight(rollout)}"
            if auto and not holds
            else f"a person promotes it to {_next_weight(rollout)} (opsctl promote {service})"
        )
    )
    text = Text()
    if state == "paused":
        text.append(f"paused with {human(left)} of the wait left", style="yellow")
        text.append(f": opsctl resume {service} restarts the clock")
    elif left is not None and left > 0:
        text.append(f"{'bake' if baking else 'wait'} over at ")
        ready_at = parse_time(rollout.get("ready_at"))
        moment = ready_at.astimezone(UTC).strftime("%H:%M:%SZ") if ready_at else DASH
        text.append(f"{moment} (in {human(left)})", style="bold")
        text.append(f"; then, once every gate passes, {then}")
    elif blocked:
        text.append(f"{'bake' if baking else 'wait'} over; waiting for ", style="")
        text.append(", ".join(blocked), style="yellow")
        text.append(f" to pass, then {then}")
    elif baking:
        text.append("bake over: the controller marks it succeeded on its next pass", style="green")
    elif auto and not holds:
        text.append(then + " on its next pass", style="green")
    else:
        text.append(f"ready: waiting for opsctl promote {service}", style="green")
    if holds and not baking and state != "paused":
        kinds = ", ".join(sorted({str(hold.get("kind")) for hold in holds}))
        text.append(f"\nheld by {kinds}: promotions wait until it ends", style="yellow")
    gates = rollout.get("gates")
    if interval and isinstance(gates, list) and gates:
        text.append(f"\ngates every {interval}; a breach rolls back", style="dim")
    elif interval:
        text.append(f"\nchecked every {interval} (no gates)", style="dim")
    return text


def rollout_view(
    rollout: Mapping[str, Any], now: datetime | None = None, interval: str | None = None
) -> RenderableType:
    """The whole view of one rollout, as `opsctl status SERVICE` shows it; `interval` is how
    often its gates are measured."""
    steps_line = Text()
    steps_line.append("Steps  ", style="bold")
    steps_line.append_text(ladder(rollout))
    interval = rollout.get("interval") or interval
    parts: list[RenderableType] = [
        header(rollout, interval if isinstance(interval, str) else None, now),
        Text(""),
        slots_block(rollout),
        steps_line,
    ]
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
        if _pull(rollout) and not at_zero:
            text.append(" (published; no client has fetched it yet)", style="yellow")
        elif at_zero is False or rollout.get("applied_weight") not in (0, None):
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


@dataclass(frozen=True)
class Column:
    """A listing's column: its header, and how its cells may break when space is short.

    Cells wrap between words; a word longer than `fold_over` characters (a build hash, a long
    detail) may be folded inside to keep the column narrow; `no_wrap` cells never break."""

    header: str
    no_wrap: bool = False
    justify: JustifyMethod = "left"
    fold_over: int | None = None


def _extent(column: Column, cells: Sequence[Text]) -> tuple[int, int]:
    """The narrowest width `column` reads well at (its longest unbreakable word) and the width
    it needs for every line unbroken."""
    # A heading stays on one line: a heading broken over two reads as two columns' words.
    narrowest = widest = max(1, cell_len(column.header))
    for text in cells:
        for line in text.plain.splitlines() or [""]:
            widest = max(widest, cell_len(line))
            words = [line] if column.no_wrap else line.split()
            for word in words:
                length = cell_len(word)
                if column.fold_over is not None and not column.no_wrap:
                    length = min(length, column.fold_over)
                narrowest = max(narrowest, length)
    return narrowest, widest


def fit_widths(extents: Sequence[tuple[int, int]], room: int) -> list[int] | None:
    """Column widths within `room`: every column at least its narrowest; what is left goes to
    the columns that want more, the least demanding first (water filling). None when even the
    narrowest widths do not fit."""
    widths = [low for low, _ in extents]
    spare = room - sum(widths)
    if spare < 0:
        return None
    wants = sorted(range(len(extents)), key=lambda i: extents[i][1] - extents[i][0])
    for position, index in enumerate(wants):
        share = spare // (len(wants) - position)
        grant = min(extents[index][1] - extents[index][0], share)
        widths[index] += grant
        spare -= grant
    return widths


class Listing:
    """Rows as a table when the terminal is wide enough for every column at its narrowest
    (words whole), otherwise each row stacked as `header  value` lines. Nothing is cut short
    and no column is squeezed to a few characters."""

    # Between two columns: one space of padding and one of the (blank) divider.
    GAP = 2

    def __init__(self, title: str, columns: Sequence[Column], rows: Sequence[Sequence[Text]]):
        self.title = title
        self.columns = list(columns)
        self.rows = [list(row) for row in rows]

    def widths(self, room: int) -> list[int] | None:
        """The columns' widths for a terminal `room` characters wide, or None (stack)."""
        extents = [
            _extent(column, [row[index] for row in self.rows])
            for index, column in enumerate(self.columns)
        ]
        return fit_widths(extents, room - self.GAP * (len(self.columns) - 1))

    def table(self, widths: Sequence[int]) -> Table:
        """The rows as a table with the given column widths and light borders."""
        table = Table(
            title=self.title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            padding=(0, 1, 0, 0),
        )
        for column, width in zip(self.columns, widths, strict=True):
            table.add_column(
                column.header,
                width=width,
                no_wrap=column.no_wrap,
                overflow="fold",
                justify=column.justify,
            )
        for row in self.rows:
            table.add_row(*row)
        return table

    def stacked(self) -> Group:
        """Each row as a block of `header  value` lines, blocks apart by a blank line."""
        blocks: list[RenderableType] = [Text(self.title, style="italic")]
        for row in self.rows:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(overflow="fold")
            for column, cell in zip(self.columns, row, strict=True):
                grid.add_row(column.header, cell)
            blocks.extend([Text(""), grid])
        return Group(*blocks)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        """The table when it fits `options.max_width`, else the stacked rows."""
        widths = self.widths(options.max_width)
        yield self.stacked() if widths is None else self.table(widths)


def _lines(*parts: Text | str | None) -> Text:
    """Cell lines, one per non-empty part."""
    text = Text()
    for part in parts:
        if part is None or part == "":
            continue
        if text.plain:
            text.append("\n")
        text.append_text(part if isinstance(part, Text) else Text(part))
    return text


def _dim(value: str) -> Text:
    return Text(value, style="dim")


def _split_time(value: object) -> Text:
    """A timestamp as two short lines: date, then time (a table column 10 characters wide)."""
    parsed = parse_time(value)
    if parsed is None:
        return Text(DASH, style="dim")
    moment = parsed.astimezone(UTC)
    return _lines(moment.strftime("%Y-%m-%d"), moment.strftime("%H:%M:%SZ"))


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


def rollouts_table(rollouts: Iterable[Mapping[str, Any]], *, title: str) -> Listing:
    """Open rollouts, one row each: versions over their slots, state, weight, step and time
    left, gates. No "triggered by" (`status SERVICE` has it), so that it fits 80 columns."""
    columns = [
        Column("rollout", no_wrap=True),
        Column("canary", fold_over=12),
        Column("stable", fold_over=12),
        Column("state", no_wrap=True),
        Column("weight"),
        Column("step"),
        Column("gates", no_wrap=True),
    ]
    rows: list[list[Text]] = []
    for rollout in rollouts:
        steps = _steps(rollout)
        index = int(rollout.get("step_index") or 0)
        desired, applied = rollout.get("desired_weight"), rollout.get("applied_weight")
        weight = Text(f"{desired}%")
        if desired != applied:
            weight.append(f"\n(applied {_percent(applied)})", style="yellow")
        name = Text(str(rollout.get("service")), style="bold")
        name.append(f" #{rollout.get('id')}", style="dim")
        step = Text(f"{index + 1}/{len(steps)}" if steps else DASH)
        left = seconds_of(rollout.get("time_left"))
        if left is not None:
            step.append(f"\n{human(left)} left", style="dim")
        rows.append([
            name,
            _in_slot(rollout.get("canary_version"), rollout.get("canary_slot")),
            _in_slot(rollout.get("stable_version"), rollout.get("stable_slot")),
            state_text(rollout.get("state")),
            weight,
            step,
            gates_summary(rollout.get("gates"), separator="\n"),
        ])  # fmt: skip
    return Listing(title, columns, rows)


def services_table(services: Iterable[Mapping[str, Any]], *, title: str) -> Listing:
    """Services, one row each: stable version over its slot, the latest rollout (id, canary
    version, state) and its weight, the router."""
    columns = [
        Column("service", no_wrap=True),
        Column("stable", fold_over=12),
        Column("latest rollout", fold_over=12),
        Column("state", no_wrap=True),
        Column("weight"),
        Column("router", fold_over=16),
    ]
    rows: list[list[Text]] = []
    for item in services:
        latest = _mapping(item.get("latest_rollout"))
        rollout: Text = _dim(DASH)
        state: Text = _dim(DASH)
        weight: Text = _dim(DASH)
        if latest:
            rollout = _lines(str(latest.get("canary_version")), _dim(f"#{latest.get('id')}"))
            state = state_text(latest.get("state"))
            desired, applied = latest.get("desired_weight"), latest.get("applied_weight")
            weight = Text(f"{desired}%")
            if desired != applied:
                weight.append(f"\n(applied {_percent(applied)})", style="yellow")
        router = _lines(
            str(item.get("router") or DASH),
            None if item.get("configured") else _dim("default policy"),
        )
        rows.append([
            Text(str(item.get("name")), style="bold"),
            _in_slot(item.get("stable_version") or "none yet", item.get("stable_slot")),
            rollout,
            state,
            weight,
            router,
        ])  # fmt: skip
    return Listing(title, columns, rows)


def _finished(started: object, finished: object) -> Text | None:
    """When a rollout finished: the time alone on the day it started, and how long it took."""
    begin, end = parse_time(started), parse_time(finished)
    if end is None:
        return None
    end = end.astimezone(UTC)
    same_day = begin is not None and begin.astimezone(UTC).date() == end.date()
    moment = end.strftime("%H:%M:%SZ" if same_day else "%Y-%m-%d %H:%M:%SZ")
    took = f" ({human((end - begin).total_seconds())})" if begin is not None else ""
    return Text(f"→ {moment}{took}", style="dim")


def history_table(rollouts: Iterable[Mapping[str, Any]], *, title: str) -> Listing:
    """A service's rollouts, newest first: id and state, canary over the stable version it
    replaced, weight and step, when it started and finished, who started it and why."""
    columns = [
        Column("rollout", no_wrap=True),
        Column("canary / from", fold_over=16),
        Column("weight", no_wrap=True),
        Column("started / finished"),
        Column("by / reason", fold_over=20),
    ]
    rows: list[list[Text]] = []
    for rollout in rollouts:
        steps = _steps(rollout)
        index = int(rollout.get("step_index") or 0)
        rows.append([
            _lines(Text(f"#{rollout.get('id')}", style="bold"), state_text(rollout.get("state"))),
            _lines(str(rollout.get("canary_version")),
                   _dim(f"from {rollout.get('stable_version') or 'nothing (first)'}")),
            _lines(f"{rollout.get('desired_weight')}%",
                   _dim(f"step {index + 1}/{len(steps)}") if steps else None),
            _lines(short_time(rollout.get("created_at")),
                   _finished(rollout.get("created_at"), rollout.get("finished_at"))),
            _lines(str(rollout.get("created_by") or DASH),
                   _dim(str(rollout.get("reason") or ""))),
        ])  # fmt: skip
    return Listing(title, columns, rows)


def evaluations_table(items: Iterable[Mapping[str, Any]], *, title: str) -> Listing:
    """Gate evaluations, newest first: when, gate and step, phase, value against threshold,
    and the detail."""
    columns = [
        Column("at", no_wrap=True),
        Column("gate / step", fold_over=20),
        Column("phase"),
        Column("value", justify="right"),
        Column("threshold", justify="right"),
        Column("detail", fold_over=20),
    ]
    rows: list[list[Text]] = []
    for item in items:
        step = item.get("step_index")
        where = f"step {int(step) + 1} at {item.get('weight')}%" if isinstance(step, int) else None
        rows.append([
            _split_time(item.get("at")),
            _lines(str(item.get("gate")), _dim(where) if where else None),
            phase_text(item.get("phase"), item.get("breached")),
            Text(number(item.get("value"))),
            Text(number(item.get("threshold"))),
            Text(str(item.get("detail") or "")),
        ])  # fmt: skip
    return Listing(title, columns, rows)


def audit_table(events: Iterable[Mapping[str, Any]], *, title: str) -> Listing:
    """Audit events: id and time, who (and through what), action and outcome, service and
    rollout, details."""
    columns = [
        Column("event", no_wrap=True),
        Column("who", fold_over=16),
        Column("action / outcome", fold_over=24),
        Column("service", fold_over=16),
        Column("details", fold_over=12),
    ]
    rows: list[list[Text]] = []
    for event in events:
        outcome = str(event.get("outcome"))
        rollout_id = event.get("rollout_id")
        rows.append([
            _lines(Text(f"#{event.get('id')}", style="bold"), _split_time(event.get("at"))),
            _lines(str(event.get("actor") or DASH), _dim(str(event.get("source") or DASH))),
            _lines(str(event.get("action") or DASH),
                   Text(outcome, style=OUTCOME_STYLES.get(outcome, ""))),
            _lines(str(event.get("service") or DASH),
                   _dim(f"rollout #{rollout_id}") if rollout_id else None),
            Text(_pairs(event.get("details"))),
        ])  # fmt: skip
    return Listing(title, columns, rows)


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
