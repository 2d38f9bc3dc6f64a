"""The end-to-end run (``scripts/e2e``) as a test: its targets are asserted on its last line.

Needs root and the Debian/Go parts ``scripts/e2e`` installs; takes several minutes.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAST_LINE = re.compile(
    r"^e2e_nodes=(?P<nodes>\d+) job=(?P<job>\w+) steps=(?P<steps>\d+) "
    r"loss_first=(?P<loss_first>\S+) loss_last=(?P<loss_last>\S+) sim_error=(?P<sim>\S+) "
    r"faults_survived=(?P<faults>\d+)/3 panels_with_data=(?P<panels>\d+)/(?P<total>\d+) "
    r"image_mb=(?P<mb>\d+)$"
)


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.e2e
def test_helm_install_to_trained_model_on_real_nodes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("scripts/e2e needs root (network namespaces, cgroups, containerd)")
    proc = subprocess.run(
        [str(REPO / "scripts" / "e2e"), "--keep-logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=3600, check=False,
    )
    out = proc.stdout.strip().splitlines()
    tail = "\n".join(out[-20:]) + "\n--- stderr ---\n" + proc.stderr[-6000:]
    assert out, f"scripts/e2e printed nothing (rc {proc.returncode}):\n{tail}"
    with capsys.disabled():  # the measurements belong in the test log, pass or fail
        print("\n" + "\n".join(out[-16:]))
    match = LAST_LINE.match(out[-1])
    assert match, f"unexpected last line (rc {proc.returncode}):\n{tail}"
    got = match.groupdict()
    assert int(got["nodes"]) >= 3, tail
    assert got["job"] == "Succeeded", tail
    assert float(got["loss_last"]) < float(got["loss_first"]), tail
    assert int(got["faults"]) == 3, tail
    assert got["panels"] == got["total"] and int(got["total"]) > 0, tail
    assert float(got["sim"]) <= 0.25, tail
    assert proc.returncode == 0, tail
