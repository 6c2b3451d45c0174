"""The chaos soak's 3-minute mode (issue 25, bench/soak/ --ci): real services, a set every minute under
random faults, then every set the product reported good restored and compared with what was live.

It asserts what the soak is for: faults happened, sets were reported good, and not one of them failed to
restore; repair converged. The reference hour is bench/results/soak.md."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import services
from tests.conftest import _unavailable

pytestmark = [pytest.mark.slow, pytest.mark.timeout(720)]


def test_the_three_minute_soak_restores_every_set_it_reported_good(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        _unavailable("the soak mounts a tmpfs for each BACKUP_DIR: it needs root")
    for tool in ("restic", "redis-server", "pg_restore"):
        if shutil.which(tool) is None:
            _unavailable(f"the soak needs {tool}")
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, "-m", "bench.soak", "--ci", "--seed", "25", "--out", str(out),
                          "--work-dir", str(tmp_path / "work")],
                         cwd=services.REPO, capture_output=True, text=True, timeout=660)
    assert (out / "soak.json").exists(), f"no report:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    results = json.loads((out / "soak.json").read_text())
    summary = results["summary"]
    assert summary["faults"] >= 3, f"faults actually happened: {results['faults']}"
    assert summary["reported_good"] >= 2, f"sets were reported good: {results['runs']}"
    assert summary["not_restorable"] == 0, [item for item in results["sets"] if not item["restorable"]]
    assert results["convergence"]["converged"], results["convergence"]
    assert summary["live_problems"] == [], summary["live_problems"]
    assert results["load"]["conflicts"] == [], results["load"]["conflicts"]
    assert run.returncode == 0, f"{run.stdout[-2000:]}\n{run.stderr[-2000:]}"
    for name in ("soak.md", "soak.png"):
        assert (out / name).stat().st_size > 0
    assert "reported good but not restorable** | **0**" in (out / "soak.md").read_text()
