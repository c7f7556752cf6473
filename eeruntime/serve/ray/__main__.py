"""``python -m eeruntime.serve.ray ...``: see :mod:`eeruntime.serve.ray.cli`."""

import sys

from .cli import main

sys.exit(main())
