"""A tool started with `die_with_parent` never outlives the process that started it, even when that
process is killed between the fork and the child's prctl (a real race: the child is made slow there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import wait_for

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    from worker.children import die_with_parent

    marker = Path(sys.argv[1])
    slow_child = sys.argv[2] == "slow"

    def before_exec():
        marker.write_text(str(os.getpid()))
        if slow_child:
            time.sleep(1.5)  # the parent is killed here, before the child asks the kernel to watch it
        die_with_parent()

    subprocess.Popen(["sleep", "60"], preexec_fn=before_exec)
    Path(sys.argv[1] + ".started").touch()
    time.sleep(60)
""")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.parametrize("killed", ["before the child's prctl", "after the exec"])
def test_the_tool_dies_with_the_process_that_started_it(tmp_path: Path, killed: str) -> None:
    marker = tmp_path / "child-pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(marker),
                               "slow" if killed.startswith("before") else "fast"],
                              cwd=Path(__file__).parent.parent)
    try:
        if killed.startswith("before"):
            wait_for(marker.exists, timeout=30, what="the fork")
        else:
            wait_for(Path(f"{marker}.started").exists, timeout=30, what="the exec")
        child = int(marker.read_text())
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    try:
        wait_for(lambda: not _alive(child), timeout=10, what=f"the child {child} to die with its parent")
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
