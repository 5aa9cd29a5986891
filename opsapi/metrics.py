"""The product's own Prometheus metrics (served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per application, so that tests can run several apps in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._served: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._transitions: dict[tuple[str, str], Any] = {}
        self.requests = Counter(
            "opsapi_http_requests",
            "API requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "opsapi_http_request_duration_seconds",
            "API request latency",
            ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.transitions = Counter(
            "opsapi_rollout_transitions",
            "Rollout transitions by kind and trigger",
            ["transition", "triggered_by"],
            registry=self.registry,
        )
        self.open_rollouts = Gauge("opsapi_open_rollouts", "Open rollouts", registry=self.registry)
        self.rollout_weight = Gauge(
            "opsapi_rollout_desired_weight",
            "Desired canary weight of each open rollout",
            ["service"],
            registry=self.registry,
        )
        self.evaluations = Counter(
            "opsapi_gate_evaluations",
            "Gate evaluations by resulting phase",
            ["phase"],
            registry=self.registry,
        )
        self.evaluation_seconds = Histogram(
            "opsapi_gate_evaluation_duration_seconds",
            "Time to measure all gates of one rollout",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.time_to_safe = Histogram(
            "opsapi_rollback_time_to_safe_seconds",
            "From a rollback's cause (breach measured, incident or request received) to its "
            "traffic confirmed at 0 (applied, for routers that cannot confirm)",
            ["trigger", "router"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.router_applies = Counter(
            "opsapi_router_applies",
            "Router applies by result",
            ["result"],
            registry=self.registry,
        )
        self.router_errors = Gauge(
            "opsapi_router_error",
            "1 while a service's last router apply failed",
            ["service"],
            registry=self.registry,
        )
        self.router_drift = Counter(
            "opsapi_router_drift",
            "Live weights found changed behind opsapi's back",
            ["service"],
            registry=self.registry,
        )
        self.controller_ticks = Counter(
            "opsapi_controller_ticks", "Controller passes", ["result"], registry=self.registry
        )
        self.controller_lag = Gauge(
            "opsapi_controller_tick_lag_seconds",
            "How late the controller handled the most overdue rollout of its last pass",
            registry=self.registry,
        )
        self.pagerduty_deliveries = Counter(
            "opsapi_pagerduty_deliveries",
            "PagerDuty Events API delivery attempts by kind and result (delivered, retry, failed)",
            ["kind", "result"],
            registry=self.registry,
        )
        self.pagerduty_pending = Gauge(
            "opsapi_pagerduty_pending",
            "PagerDuty alerts waiting in the outbox for delivery",
            registry=self.registry,
        )
        self.notifications = Counter(
            "opsapi_notifications",
            "Notification delivery attempts by channel and outcome (delivered, retry, failed)",
            ["channel", "outcome"],
            registry=self.registry,
        )
        self.audit_head_id = Gauge(
            "opsapi_audit_head_id",
            "Id of the newest audit event (the chain head); a drop means events were removed",
            registry=self.registry,
        )
        self.audit_refusals_aggregated = Counter(
            "opsapi_audit_refusals_aggregated",
            "Refusals over the per-caller limit, counted into aggregated audit events",
            registry=self.registry,
        )
        self.audit_write_failures = Counter(
            "opsapi_audit_write_failures",
            "Audit events the group-commit writer could not commit (their requests failed)",
            registry=self.registry,
        )
        self.notifications_pending = Gauge(
            "opsapi_notifications_pending",
            "Notifications waiting in the outbox for delivery",
            registry=self.registry,
        )

    def served(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count one API request and its latency."""
        # The labelled children looked up once per route, method and status: `labels()`
        # validates and locks on every call, a few microseconds of every request.
        children = self._served.get((route, method, status))
        if children is None:
            children = self._served[(route, method, status)] = (
                self.requests.labels(route, method, status),
                self.request_seconds.labels(route, method),
            )
        children[0].inc()
        children[1].observe(seconds)

    def transitioned(self, action: str, trigger: str) -> None:
        """Count one rollout transition by its action and what triggered it."""
        child = self._transitions.get((action, trigger))
        if child is None:  # (looked up once per pair, as `served` does)
            child = self._transitions[(action, trigger)] = self.transitions.labels(action, trigger)
        child.inc()
