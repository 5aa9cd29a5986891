"""Server settings, read from `OPSAPI_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from opsapi.storage.db import DatabaseLimits


class Settings(BaseSettings):
    """Every knob of the server; see the README for what each one does."""

    model_config = SettingsConfigDict(env_prefix="OPSAPI_", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    database_url: str = "sqlite+aiosqlite:///./opsapi.db"
    # PostgreSQL: the pool, and how long any database work may wait (seconds). Connections
    # are opened as needed up to the pool size and kept; overflow ones are closed on return.
    database_pool_size: int = Field(default=40, ge=1)
    database_max_overflow: int = Field(default=0, ge=0)
    database_pool_timeout_seconds: float = Field(default=10.0, gt=0)
    database_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    database_statement_timeout_seconds: float = Field(default=15.0, gt=0)
    database_lock_timeout_seconds: float = Field(default=10.0, gt=0)
    database_idle_in_transaction_timeout_seconds: float = Field(default=60.0, gt=0)
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
    # Liveness (/healthz) fails when the controller loop has not completed a pass this long.
    controller_stall_seconds: float = Field(default=60.0, gt=0)
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
    # Server-configured freeze windows (JSON or YAML list); admins add more through the API.
    freezes_file: Path | None = None
    # A rollback whose traffic is not confirmed at 0 this long after its decision pages.
    rollback_confirm_seconds: float = Field(default=10.0, gt=0)
    notifications_file: Path | None = None  # notification channels (docs/notifications.md)
    public_url: str | None = None  # e.g. https://opsapi.example.com, for links in notifications
    oidc_issuer: str | None = None  # the console's sign-in provider (docs/console.md)
    oidc_client_id: str | None = None  # the console's OIDC client
    oidc_client_secret: SecretStr | None = None  # unset for a public client (PKCE alone)
    oidc_scope: str = "openid profile email"  # scopes the console asks the provider for
    console_secret: SecretStr | None = Field(default=None, min_length=32)  # signs sessions

    # Optional client allowlist (comma-separated CIDRs), and the proxies whose X-Forwarded-For
    # is believed (comma-separated CIDRs); both empty by default.
    allowed_cidrs: str = ""
    trusted_proxies: str = ""

    max_body_bytes: int = 64 * 1024
    # Refused requests audited one by one per caller and minute; the rest are counted into one
    # aggregated event per caller and minute.
    audit_refusals_per_minute: int = Field(default=30, ge=1)
    # The HTTP server: request head size and read time, connections served at once (more wait
    # in the listen backlog), and how long a shutdown waits for requests in flight.
    max_header_bytes: int = Field(default=64 * 1024, ge=8192)
    header_timeout_seconds: float = Field(default=10.0, ge=1, le=60)
    max_connections: int = Field(default=1024, ge=1)
    shutdown_timeout_seconds: float = Field(default=10.0, gt=0)
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
        if not self.database_url.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite://")):
            raise ValueError(
                "OPSAPI_DATABASE_URL must start with postgresql+asyncpg:// (PostgreSQL) or "
                "sqlite+aiosqlite:// (embedded SQLite); other drivers are not installed"
            )
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

    def database_limits(self) -> DatabaseLimits:
        """The pool size and every database wait bound these settings describe."""
        from opsapi.storage.db import DatabaseLimits

        return DatabaseLimits(
            pool_size=self.database_pool_size,
            max_overflow=self.database_max_overflow,
            pool_timeout=self.database_pool_timeout_seconds,
            connect_timeout=self.database_connect_timeout_seconds,
            statement_timeout=self.database_statement_timeout_seconds,
            lock_timeout=self.database_lock_timeout_seconds,
            idle_in_transaction_timeout=self.database_idle_in_transaction_timeout_seconds,
        )
