"""`python -m opsapi.opsctl`."""

from opsapi.opsctl.main import main

main()
