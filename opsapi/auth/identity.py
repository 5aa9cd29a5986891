"""Who is calling and what they may do."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Role(enum.StrEnum):
    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"
    AUDITOR = "auditor"


# A role grants itself plus the roles listed here. Auditors read state but cannot act;
# admins act but do not read the audit log unless they also hold `auditor` (separation of duties).
IMPLIED_ROLES: dict[Role, frozenset[Role]] = {
    Role.VIEWER: frozenset(),
    Role.OPERATOR: frozenset({Role.VIEWER}),
    Role.ADMIN: frozenset({Role.OPERATOR, Role.VIEWER}),
    Role.AUDITOR: frozenset({Role.VIEWER}),
}


class AuthError(Exception):
    """Credentials are missing or invalid (answered 401). The message is safe to show."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller: a subject and the roles its token granted."""

    subject: str
    roles: frozenset[Role] = field(default_factory=frozenset)

    def effective_roles(self) -> frozenset[Role]:
        """The granted roles plus every role they imply."""
        granted = set(self.roles)
        for role in self.roles:
            granted |= IMPLIED_ROLES[role]
        return frozenset(granted)

    def has(self, role: Role) -> bool:
        """Whether this caller may act with `role`."""
        return role in self.effective_roles()
