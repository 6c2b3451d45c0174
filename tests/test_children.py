"""A tool started with `die_with_parent` never outlives the process that started it, even when that
process is killed between the fork and the child's prctl (a real race: the child is made slow there)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.test_faults_repository import alive

PARENT = textwrap.dedent("""
    import os, subprocess, sys, time
    from pathlib import Path
    from worker.children import die_with_parent

    marker = Path(sys.argv[1])
    slow_child = sys.argv[2] == "slow"
    if sys.argv[3] == "forked" and os.fork():  # the tool is started by a forked process, as in a worker's pool
        time.sleep(60)
    Path(sys.argv[1] + ".parent").write_text(str(os.getpid()))

    def before_exec():
        marker.write_text(str(os.getpid()))
        if slow_child:
            time.sleep(1.5)  # the parent is killed here, before the child asks the kernel to watch it
        die_with_parent()

    subprocess.Popen(["sleep", "60"], preexec_fn=before_exec)
    Path(sys.argv[1] + ".started").touch()
    time.sleep(60)
""")


@pytest.mark.parametrize("started_by", ["the process that imported it", "a process forked after the import"])
@pytest.mark.parametrize("killed", ["before the child's prctl", "after the exec"])
def test_the_tool_dies_with_the_process_that_started_it(tmp_path: Path, killed: str, started_by: str) -> None:
    marker = tmp_path / "child-pid"
    script = subprocess.Popen([sys.executable, "-c", PARENT, str(marker),
                               "slow" if killed.startswith("before") else "fast",
                               "forked" if started_by.startswith("a process forked") else "direct"],
                              cwd=Path(__file__).parent.parent, start_new_session=True)
    try:
        if killed.startswith("before"):
            wait_for(marker.exists, timeout=30, what="the fork")
        else:
            wait_for(Path(f"{marker}.started").exists, timeout=30, what="the exec")
            time.sleep(0.5)
            assert alive(int(marker.read_text())), "the tool died while the process that started it runs"
        child = int(marker.read_text())
        os.kill(int(Path(f"{marker}.parent").read_text()), signal.SIGKILL)
        try:
            wait_for(lambda: not alive(child), timeout=10, what=f"the child {child} to die with its parent")
        finally:
            if alive(child):
                os.kill(child, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)  # what is left of the script (the forked case's first half)
        script.wait()
