import sys

from opsapi.cli import main

sys.exit(main())
