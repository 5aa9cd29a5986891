"""Authentication (bearer JWTs) and role-based authorisation."""
