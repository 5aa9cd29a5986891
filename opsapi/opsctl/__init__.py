"""`opsctl`: the ops engineer's command line for the opsapi HTTP API (see `opsctl --help`)."""
