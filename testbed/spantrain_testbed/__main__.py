"""``python -m spantrain_testbed``: the testbed's command line, the same as
``spantrain testbed`` (see ``commands``)."""

from __future__ import annotations

import sys

from .commands import main

if __name__ == "__main__":
    sys.exit(main())
