"""Storage: engine and sessions, column types, migrations."""
