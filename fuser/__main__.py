"""``python -m fuser``: see ``fuser.cli``."""

import sys

from fuser.cli import main

sys.exit(main())
