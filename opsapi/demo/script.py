"""The demo's scripted release, narrated: v2 through every step to success, v3 rolled back by a
gate breach, v4 rolled back by a signed PagerDuty webhook. Everything goes through opsapi's
real HTTP API and real nginx; each step says what happened and the split measured through nginx.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TextIO

import httpx

from opsapi.canary.policy import CHECKLIST_GATES
from opsapi.demo.app import load, sample
from opsapi.demo.stack import DemoError, Stack
from opsapi.durations import format_duration

API_PREFIX = "/internal/ops"
PAGERDUTY_SERVICE_ID = "PDEMO01"
STEP_WEIGHTS = (10, 25, 50, 100)
TRAFFIC_RPS = 30.0
MIN_SAMPLE = 10
MIN_SAMPLE_QUERY = (
    'sum(increase(http_requests_total{service="{service}",version="{canary_version}"}[5m]))'
)
SAMPLE_REQUESTS = 100
V3_ERROR_RATIO = 0.3
FINISHED = ("succeeded", "rolled_back", "reverted")


class Narrator:
    """Prints what happens, each line stamped with the seconds since the demo started."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        """One narrated event."""
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {text}", file=self.out, flush=True)

    def show(self, text: str = "") -> None:
        """Text without a time stamp (headings, addresses)."""
        print(text, file=self.out, flush=True)


class Api:
    """opsapi's HTTP API with a bearer token; answers are (status, JSON body)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.client = httpx.Client(
            base_url=base + API_PREFIX,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
            trust_env=False,
        )

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request; DemoError when opsapi cannot be reached."""
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise DemoError(
                f"opsapi did not answer {method} {path}: {type(error).__name__}"
            ) from None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, {"detail": response.text[:300]}

    def expect(self, method: str, path: str, body: Any = None) -> Any:
        """A request that must succeed (2xx); DemoError with the problem's detail otherwise."""
        status, answer = self.call(method, path, body)
        if status >= 300:
            detail = answer.get("detail") if isinstance(answer, dict) else answer
            raise DemoError(f"{method} {path} answered {status}: {detail}")
        return answer

    def close(self) -> None:
        self.client.close()


def describe_split(counts: Counter[str]) -> str:
    """`green v2 90 %, blue v3 10 % (4 answered 500)` from answer counts."""
    total = sum(counts.values())
    if total == 0:
        return "no answers"
    shares: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for answer, count in counts.items():
        key = answer.removesuffix(" failed")
        shares[key] += count
        if key != answer:
            failed[key] += count
    parts = []
    for key, count in shares.most_common():
        part = f"{key} {100 * count / total:.0f} %"
        if failed[key]:
            part += f" ({failed[key]} answered 500)"
        parts.append(part)
    return ", ".join(parts)


def demo_gates(for_: timedelta) -> list[dict[str, Any]]:
    """The release checklist's default gates (docs/metrics.md), unchanged but for `for`: the
    checklist's 5m/2m would keep a breach waiting for minutes."""
    gates = []
    for gate in CHECKLIST_GATES:
        document = gate.model_dump(mode="json", by_alias=True, exclude_none=True)
        document["for"] = format_duration(for_)
        gates.append(document)
    return gates


def demo_policy(stack: Stack, step_wait: timedelta, gate_for: timedelta) -> dict[str, Any]:
    """The service's policy: short steps, auto_promote, the checklist gates with a short `for`,
    the nginx router over the two slots, and the PagerDuty service whose incidents roll back."""
    wait = format_duration(step_wait)
    return {
        "steps": [{"weight": weight, "wait": wait} for weight in STEP_WEIGHTS],
        "interval": "1s",
        "auto_promote": True,
        "gates": demo_gates(gate_for),
        # A new version's series are invisible to rate() until their second sample: without this
        # guard a broken canary looks error-free for a scrape or two and could be promoted.
        "min_sample": {"query": MIN_SAMPLE_QUERY, "min": MIN_SAMPLE},
        "router": {
            "name": "edge",
            "upstream": stack.service,
            "slots": {name: slot.address for name, slot in stack.slots.items()},
        },
        "pagerduty": {
            "service_ids": [PAGERDUTY_SERVICE_ID],
            "priorities": ["P1"],
            "urgencies": ["high"],
        },
    }


class Traffic:
    """Steady requests through nginx in a thread, so that the gates always have data."""

    def __init__(self, url: str, rps: float = TRAFFIC_RPS) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=load, args=(url, rps, None, self.stop), name="demo-traffic", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=10)


@dataclass
class Outcome:
    """How one release of the script ended."""

    version: str
    state: str
    triggered_by: str
    reason: str | None

    def summary(self) -> str:
        """`v3 rolled back by the controller: gate error-rate breached …`"""
        if self.state == "succeeded":
            return f"{self.version} succeeded"
        who = {"controller": "the controller", "pagerduty": "PagerDuty"}.get(
            self.triggered_by, self.triggered_by
        )
        return f"{self.version} {self.state.replace('_', ' ')} by {who}: {self.reason}"


class Script:
    """The three releases, one after another, narrated."""

    def __init__(
        self,
        stack: Stack,
        api: Api,
        narrator: Narrator,
        *,
        step_wait: timedelta,
        gate_for: timedelta,
        webhook_secret: str,
    ) -> None:
        self.stack = stack
        self.api = api
        self.say = narrator.say
        self.show = narrator.show
        self.step_wait = step_wait
        self.gate_for = gate_for
        self.webhook_secret = webhook_secret
        self.service = stack.service
        # Generous: every step's wait, the time for gates to see data, and slow machines.
        self.timeout = len(STEP_WEIGHTS) * (step_wait.total_seconds() + 15) + 60

    def measured(self) -> str:
        counts = sample(self.stack.traffic_url, SAMPLE_REQUESTS)
        return f"measured through nginx ({SAMPLE_REQUESTS} requests): {describe_split(counts)}"

    def run(self) -> list[Outcome]:
        """Run the three releases; DemoError if one does not end as the script expects."""
        outcomes = [self.release_to_success(), self.release_breached(), self.release_paged()]
        self.show()
        self.show("The scripted release is over:")
        for outcome in outcomes:
            self.show(f"  {outcome.summary()}")
        self.say(f"traffic now: {self.measured()}")
        return outcomes

    # -- the releases ------------------------------------------------------------------------

    def release_to_success(self) -> Outcome:
        self.show()
        self.show("Release 1: v2, the service's first release, through every step to success")
        green = self.stack.slots["green"]
        green.deploy("v2")
        self.say("deployed v2 into slot green (blue, the stable slot, runs v1)")
        rollout = self.start("v2", stable_version="v1")
        final = self.follow(rollout)
        if final["state"] != "succeeded":
            raise DemoError(f"v2 ended {final['state']}, not succeeded: {final.get('reason')}")
        previous = final.get("previous") or {}
        self.say(
            f"v2 succeeded: the stable version now, in slot {final['stable_slot']}; "
            f"{previous.get('version', 'v1')} stays in slot {previous.get('slot', 'blue')} "
            f"at 0 % for a revert; {self.measured()}"
        )
        return Outcome("v2", "succeeded", final["triggered_by"], final.get("reason"))

    def release_breached(self) -> Outcome:
        self.show()
        self.show("Release 2: v3, a broken build: the controller rolls it back on a gate breach")
        blue = self.stack.slots["blue"]
        blue.deploy("v3", error_ratio=V3_ERROR_RATIO)
        self.say(
            f"deployed v3 into slot blue; the demo app there is told to fail "
            f"{V3_ERROR_RATIO:.0%} of its requests ({blue.control}: error_ratio "
            f"{V3_ERROR_RATIO})"
        )
        rollout = self.start("v3")
        final = self.follow(rollout)
        if final["state"] != "rolled_back" or final["triggered_by"] != "controller":
            raise DemoError(
                f"v3 ended {final['state']} by {final['triggered_by']}, not rolled "
                "back by the controller"
            )
        self.say(f"v3 rolled back by the controller: {final['reason']}")
        self.say(
            f"nginx applied 0 % for v3 (traffic_at_zero: {final['traffic_at_zero']}); "
            f"{self.measured()}"
        )
        return Outcome("v3", "rolled_back", "controller", final["reason"])

    def release_paged(self) -> Outcome:
        self.show()
        self.show("Release 3: v4, healthy, but PagerDuty pages: a signed webhook rolls it back")
        blue = self.stack.slots["blue"]
        blue.deploy("v4")
        self.say("deployed v4 into slot blue (v3 was rejected: it cannot be started again)")
        rollout = self.start("v4")
        incident = f"Q{uuid.uuid4().hex[:12].upper()}"
        status, answer = self.pagerduty("incident.triggered", incident, "triggered")
        if status != 200 or answer.get("outcome") != "rolled_back":
            raise DemoError(f"the PagerDuty webhook answered {status}: {answer}")
        [service] = [item for item in answer["services"] if item["service"] == self.service]
        self.say(
            f"PagerDuty: incident.triggered (P1, high) on PagerDuty service "
            f"{PAGERDUTY_SERVICE_ID}, signed with the demo's webhook secret, POST "
            f"{API_PREFIX}/webhooks/pagerduty: 200 {answer['outcome']}, traffic_at_zero: "
            f"{service.get('traffic_at_zero')}"
        )
        final = self.converged(self.api.expect("GET", f"/canary/{self.service}"))
        if final["id"] != rollout["id"] or final["state"] != "rolled_back":
            raise DemoError(f"v4 is {final['state']} after the incident, not rolled_back")
        self.say(f"v4 rolled back by PagerDuty: {final['reason']}; {self.measured()}")
        status, answer = self.pagerduty("incident.resolved", incident, "resolved")
        self.say(
            f"PagerDuty incident.resolved: {status}, {answer.get('outcome')} (an open "
            "incident holds the service's next start; resolved, it no longer does)"
        )
        return Outcome("v4", "rolled_back", final["triggered_by"], final["reason"])

    # -- steps -------------------------------------------------------------------------------

    def start(self, version: str, *, stable_version: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "service": self.service,
            "version": version,
            "reason": f"demo: release {version}",
        }
        if stable_version is not None:
            body["stable_version"] = stable_version
        rollout: dict[str, Any] = self.api.expect("POST", "/canary/promote", body)
        self.say(
            f"POST {API_PREFIX}/canary/promote {json.dumps(body)}: rollout "
            f"{rollout['id']} {rollout['state']} at {rollout['desired_weight']} % in slot "
            f"{rollout['canary_slot']}, nginx applied {rollout['applied_weight']} %; "
            f"{self.measured()}"
        )
        return rollout

    def follow(self, rollout: dict[str, Any]) -> dict[str, Any]:
        """Poll the rollout until it finishes (and its router converged), narrating each new
        step and each gate that starts failing."""
        deadline = time.monotonic() + self.timeout
        seen = (rollout["state"], rollout["desired_weight"])
        failing: set[str] = set()
        explained = False
        while True:
            current: dict[str, Any] = self.api.expect("GET", f"/canary/{self.service}")
            if current["id"] != rollout["id"]:
                raise DemoError(f"another rollout ({current['id']}) started meanwhile")
            for gate in current.get("gates", []):
                if gate["phase"] == "fail" and gate["name"] not in failing:
                    failing.add(gate["name"])
                    self.say(
                        f"gate {gate['name']} failing: {_number(gate['value'])}, must be "
                        f"{gate.get('op') or ''} {_number(gate['threshold'])}; a breach "
                        f"once it fails for {gate.get('for') or format_duration(self.gate_for)}"
                    )
            if current["state"] in FINISHED:
                return self.converged(current)
            if (current["state"], current["desired_weight"]) != seen:
                current = self.converged(current)
                seen = (current["state"], current["desired_weight"])
                why = (
                    ""
                    if explained
                    else (" (auto_promote: the step's wait was over and every gate passed)")
                )
                explained = True
                what = (
                    "to 100 %, baking"
                    if current["state"] == "baking"
                    else (f"to {current['desired_weight']} %")
                )
                self.say(
                    f"the controller promoted {current['canary_version']} {what}{why}; "
                    f"nginx applied {current['applied_weight']} %; {self.measured()}"
                )
            if time.monotonic() > deadline:
                raise DemoError(
                    f"rollout {rollout['id']} still {current['state']} after {self.timeout:.0f} s"
                )
            time.sleep(0.25)

    def converged(self, current: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """The rollout once its router made the newest generation live (or after `timeout`):
        the controller applies its own transitions right after committing them."""
        deadline = time.monotonic() + timeout
        while current.get("applied_generation") != current.get("generation"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
            current = self.api.expect("GET", f"/canary/{self.service}")
        return current

    def pagerduty(self, event_type: str, incident: str, status: str) -> tuple[int, Any]:
        """A PagerDuty v3 webhook about `incident`, signed as PagerDuty signs (HMAC-SHA256 of
        the raw body with the subscription's secret), to opsapi's real endpoint."""
        document = {
            "event": {
                "id": uuid.uuid4().hex.upper()[:26],
                "event_type": event_type,
                "resource_type": "incident",
                "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "agent": None,
                "client": {"name": "opsapi demo"},
                "data": {
                    "id": incident,
                    "type": "incident",
                    "number": 1,
                    "status": status,
                    "title": f"{self.service}: customers report failed checkouts",
                    "html_url": f"https://demo.pagerduty.invalid/incidents/{incident}",
                    "service": {
                        "id": PAGERDUTY_SERVICE_ID,
                        "type": "service_reference",
                        "summary": f"{self.service} (demo)",
                    },
                    "priority": {"summary": "P1", "type": "priority_reference"},
                    "urgency": "high",
                },
            }
        }
        body = json.dumps(document).encode()
        signature = hmac.new(self.webhook_secret.encode(), body, hashlib.sha256).hexdigest()
        try:
            response = httpx.post(
                f"{self.api.base}{API_PREFIX}/webhooks/pagerduty",
                content=body,
                headers={
                    "Content-Type": "application/json",
                    "X-PagerDuty-Signature": f"v1={signature}",
                },
                timeout=30,
                trust_env=False,
            )
        except httpx.HTTPError as error:
            raise DemoError(
                f"the PagerDuty webhook was not answered: {type(error).__name__}"
            ) from None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, {"detail": response.text[:300]}


def _number(value: Any) -> str:
    return "none" if value is None else f"{float(value):.4g}"
