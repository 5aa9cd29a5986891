"""Notifications: rollout events told to chat, e-mail and webhook channels (DESIGN §10).

`rules` (policy `notify` rules, light enough for the policy model to import), `messages` (what a
notification says, pure), `channels` (the channels file), `outbox` (enqueue in the transition's
transaction, delivery state for the rollout view), `sender` (one delivery, through apprise or a
signed webhook; called by the outbox worker in `opsapi.pagerduty.worker`).
"""
