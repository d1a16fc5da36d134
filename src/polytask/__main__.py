"""``python -m polytask ARGS``: the ``polytask`` command without its console script (same entry point, same exit status)."""

import sys

from polytask.cli import main

if __name__ == "__main__":
    sys.exit(main())
