"""PagerDuty: the outbox of Events API v2 alerts, its delivery worker, and the v3 webhook.

- `outbox`: what to send, written in the transaction of the change that causes it;
- `worker`: delivers due outbox rows in the background, with bounded retries;
- `events`: the only module that talks to the `pagerduty` client package;
- `webhook`: `POST /internal/ops/webhooks/pagerduty`, signed by PagerDuty, rolls back.
"""
