"""Schemathesis hooks for tests/http/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Each call gets its own Idempotency-Key (see `_Finish`).

The PagerDuty webhook is authenticated by an HMAC of its raw body, which a generator cannot
produce: each generated webhook body is serialised here and signed with the server's secret
(OPSAPI_TEST_WEBHOOK_SECRET), so that the fuzzer reaches the webhook's parsing and rollback
path instead of stopping at 401.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import requests
import schemathesis

WEBHOOK = "/webhooks/pagerduty"
_KEY = re.compile(r"[\x21-\x7e]{1,200}")


class _Finish(requests.auth.AuthBase):
    """Last touches to each prepared request, made on the request rather than the case
    (changing the case would re-judge it: a case missing a required header would pass for a
    complete one)."""

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        key = request.headers.get("Idempotency-Key")
        if key is not None and _KEY.fullmatch(key):
            # Generated keys repeat ("0"): a key reused for another body is refused (422)
            # before the handler runs, which would keep the fuzzer out of every keyed
            # operation. A valid key is made unique (still valid); an invalid one is left alone.
            request.headers["Idempotency-Key"] = f"{key}-{uuid.uuid4().hex}"
        path = urlsplit(request.url or "").path
        if path.endswith(WEBHOOK) and "X-PagerDuty-Signature" in request.headers:
            # Signed over the exact bytes sent; a case without the header (testing that it is
            # required) stays without it.
            body = request.body or b""
            raw = body.encode() if isinstance(body, str) else bytes(body)
            secret = os.environ["OPSAPI_TEST_WEBHOOK_SECRET"].encode()
            digest = hmac.new(secret, raw, hashlib.sha256).hexdigest()
            request.headers["X-PagerDuty-Signature"] = f"v1={digest}"
        return request


_FINISH = _Finish()


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    """Give each call its own valid Idempotency-Key; sign the webhook's body."""
    kwargs["auth"] = _FINISH
