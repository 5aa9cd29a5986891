"""Named operations (`POST /internal/ops/execute`)."""
