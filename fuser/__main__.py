"""``python -m fuser``: see ``fuser.cli``."""

import os
import sys

from fuser.cli import main

try:
    status = main()
except BrokenPipeError:
    # The reader went away (`python -m fuser --list | head`): not an error worth a traceback.
    # Python flushes stdout again at exit, so point it at devnull first (the recipe in Python's
    # signal docs).
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    status = 1
sys.exit(status)
