"""Every README command block marked runnable runs as written, in an empty directory.

A block is marked by an HTML comment that starts with ``<!-- runnable`` on the line before
its opening fence. ``python`` is this interpreter; the checkout is on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"^<!-- runnable[^\n]*-->\n```(?:bash|sh)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks() -> list[str]:
    return BLOCK.findall((REPO / "README.md").read_text())


def test_the_readme_has_runnable_blocks():
    # a marker that no longer matches its block would silently drop the block from the tests
    marked = (REPO / "README.md").read_text().count("<!-- runnable")
    assert marked >= 1 and len(runnable_blocks()) == marked


@pytest.mark.parametrize("block", runnable_blocks(), ids=lambda b: b.split()[2][:40])
def test_readme_block_runs_as_written(block, tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{block}\nfailed:\n{done.stdout}\n{done.stderr}"
