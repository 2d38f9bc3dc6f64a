"""What the testbed's tests need from this machine, checked in one place.

``testbed_missing()`` is None where root, iproute2 and cgroup v1 (cpu/cpuacct) are there, else
the reason to skip. Standard library only.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def testbed_missing() -> str | None:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"):
        return "the testbed needs root and iproute2 (apt-get install iproute2)"
    if not Path("/sys/fs/cgroup/cpu/tasks").exists():
        return "the testbed needs cgroup v1 with the cpu/cpuacct controllers mounted"
    return None
