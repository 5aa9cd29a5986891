"""Errors that reach clients as RFC 9457 problem details."""

from __future__ import annotations

from typing import Any


class Problem(Exception):
    """An error with a status, a short title and a detail that is safe to show."""

    status = 500
    title = "Internal Server Error"
    # Sent as `Retry-After` when set: the same request may succeed later.
    retry_after_seconds: int | None = None

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra

    def body(self) -> dict[str, Any]:
        """The problem+json document."""
        return {
            "type": "about:blank",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            **self.extra,
        }


class BadRequest(Problem):
    status = 400
    title = "Bad Request"


class Unauthorized(Problem):
    status = 401
    title = "Unauthorized"


class Forbidden(Problem):
    status = 403
    title = "Forbidden"


class NotFound(Problem):
    status = 404
    title = "Not Found"


class Conflict(Problem):
    status = 409
    title = "Conflict"


class PayloadTooLarge(Problem):
    status = 413
    title = "Content Too Large"


class UnsupportedMediaType(Problem):
    status = 415
    title = "Unsupported Media Type"


class Unprocessable(Problem):
    status = 422
    title = "Unprocessable Content"


class ServiceUnavailable(Problem):
    """A dependency (the database, the audit log) cannot do the work now; nothing was done.

    Answered with `Retry-After`: the same request, sent again later, may succeed.
    """

    status = 503
    title = "Service Unavailable"
    retry_after_seconds = 5
