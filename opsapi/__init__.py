"""opsapi: an operations control plane for canary releases."""

__version__ = "0.1.0"
