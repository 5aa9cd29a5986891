"""Server settings, read from `OPSAPI_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the server; see the README for what each one does."""

    model_config = SettingsConfigDict(env_prefix="OPSAPI_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    database_url: str = "sqlite+aiosqlite:///./opsapi.db"
    data_dir: Path = Path(".opsapi")
    migrate_on_start: bool = True

    # Bearer tokens: a JWKS URL (production) or, when unset, a locally generated signing key.
    jwks_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    roles_claim: str = "roles"
    local_key_file: Path | None = None

    # The controller loop inside the server process.
    controller_enabled: bool = True
    controller_poll_seconds: float = Field(default=1.0, gt=0)
    controller_batch_size: int = Field(default=100, ge=1)

    prometheus_url: str | None = None
    prometheus_timeout_seconds: float = Field(default=3.0, gt=0)
    pagerduty_webhook_secrets: str = ""
    pagerduty_events_url: str = "https://events.pagerduty.com"
    # Outbound alerts: a CA bundle to trust (a private CA or proxy), the per-request timeout,
    # tries before an alert is marked failed, and the delivery worker in this process.
    pagerduty_ca_file: Path | None = None
    pagerduty_timeout_seconds: float = Field(default=5.0, gt=0)
    pagerduty_max_attempts: int = Field(default=8, ge=1)
    pagerduty_worker_enabled: bool = True
    pagerduty_poll_seconds: float = Field(default=1.0, gt=0)
    routers_file: Path | None = None

    # Optional client allowlist (comma-separated CIDRs), and the proxies whose X-Forwarded-For
    # is believed (comma-separated CIDRs); both empty by default.
    allowed_cidrs: str = ""
    trusted_proxies: str = ""

    max_body_bytes: int = 64 * 1024
    idempotency_ttl_hours: int = 24

    @model_validator(mode="after")
    def _production_needs_real_identity(self) -> Settings:
        if self.env == "production" and not self.jwks_url:
            raise ValueError(
                "OPSAPI_ENV=production requires OPSAPI_JWKS_URL: locally signed tokens are "
                "for embedded and test use only"
            )
        from opsapi.http.clients import networks

        try:
            networks(self.allowed_cidrs)
            networks(self.trusted_proxies)
        except ValueError as error:
            raise ValueError(f"OPSAPI_ALLOWED_CIDRS / OPSAPI_TRUSTED_PROXIES: {error}") from None
        if self.jwks_url and not (self.jwt_issuer and self.jwt_audience):
            raise ValueError("OPSAPI_JWKS_URL needs OPSAPI_JWT_ISSUER and OPSAPI_JWT_AUDIENCE")
        if not self.pagerduty_events_url.startswith("https://"):
            raise ValueError("OPSAPI_PAGERDUTY_EVENTS_URL must be an https:// URL")
        return self

    @property
    def webhook_secrets(self) -> list[str]:
        """The PagerDuty webhook signing secrets (several during a rotation)."""
        return [secret.strip() for secret in self.pagerduty_webhook_secrets.split(",")
                if secret.strip()]  # fmt: skip

    @property
    def signing_key_path(self) -> Path:
        """Where the embedded mode keeps its locally generated signing key."""
        return self.local_key_file or self.data_dir / "signing-key.json"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")
