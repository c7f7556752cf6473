"""``python -m eeruntime COMMAND``: the same command line as the ``eeruntime`` script (eeruntime/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
