"""Traffic routers: apply a canary percentage, read back the applied one."""
