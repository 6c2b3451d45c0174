"""The benchmark runs end to end on a tiny database (a smoke test: no timing is asserted anywhere).

It uses the machine's PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379, db 11), as
`bench/README.md` describes; `.ci/run` starts both."""

from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest
import redis

from tests.conftest import IN_CI
from tests.services import REPO


def _machine_services_up() -> str | None:
    try:
        psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname="postgres", connect_timeout=3).close()
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=3).ping()
    except Exception as error:  # either service: say which and how to start it
        return (f"the machine's PostgreSQL (127.0.0.1:5432) or Redis (6379) is not running ({error}); start them: "
                "pg_ctlcluster --skip-systemctl-redirect 15 main start; redis-server --daemonize yes --port 6379")
    return None


# The run has its own bound (900 s, below); pytest's default 300 s would stop it first on a slower machine
# (152 to 187 s on two machines of the same kind).
@pytest.mark.timeout(960)
def test_bench_quick_measures_every_section_it_can(tmp_path):
    problem = _machine_services_up()
    if problem:
        if IN_CI:
            pytest.fail(problem, pytrace=False)
        pytest.skip(problem)
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads((out / "latest.json").read_text())
    for key in ("chain_vs_bare", "fast_vs_seed", "fast_size_vs_seed", "restore_vs_seed", "fleet_2w_vs_1w",
                "offsite_vs_bare_restic", "offsite_vs_bare_restic_first_night", "offsite_without_read_back_vs_bare_restic",
                "restore_from_repository_vs_local", "second_night_bytes_ratio_z0"):
        assert isinstance(figures[key], (int, float)) and figures[key] > 0, key
    assert isinstance(figures["offsite_minus_bare_restic_seconds"], (int, float))  # may be below 0: noise
    assert figures["db_size_bytes"] > 0
    assert (out / "latest.md").read_text().startswith("# tma-backup benchmark")
    _vault_figures_are_sane(figures)


def _vault_figures_are_sane(figures: dict) -> None:
    """h. (the vault) in its small mode: the pull and the bare copy both ran, the pull's restic commands
    were timed one by one, and the nights' bytes are plausible. Sane, not the targets."""
    for key in ("vault_pull_vs_bare_copy", "vault_copy_vs_bare_copy", "vault_pull_without_listings_vs_bare_copy",
                "vault_pull_process_vs_bare_copy", "vault_pull_cpu_vs_bare_copy", "vault_copy_cpu_vs_bare_copy",
                "vault_pull_listings_seconds", "vault_restic_open_seconds"):
        assert isinstance(figures[key], (int, float)) and 0 < figures[key] < 100, (key, figures[key])
    measured = figures["measurements"]
    pull = measured["vault_pull_s3"]["step_medians_s"]
    for step in ("listing the primary (restic snapshots)", "listing the vault (restic snapshots)",
                 "copy (restic copy --no-lock)", "confirming (restic snapshots, vault)"):
        assert pull[step] > 0, (step, pull)
    assert figures["vault_pull_without_listings_vs_bare_copy"] < figures["vault_pull_vs_bare_copy"]
    # The vault holds what the primary holds: the same set, and on each night about the same bytes.
    assert measured["vault_pull_s3"]["median_bytes"] == pytest.approx(measured["vault_bare_s3"]["median_bytes"], rel=0.05)
    for night in ("first", "second"):
        assert 0.5 < figures[f"vault_{night}_night_bytes_ratio"] < 2, (night, figures[f"vault_{night}_night_bytes_ratio"])
    assert measured["vault_primary_night2_s3"]["median_bytes"] < measured["vault_primary_night1_s3"]["median_bytes"]
    assert figures["vault"]["set"]["parts"] == ["database", "uploads"]
    assert figures["vault"]["night"]["uploads"]["added"] > 0
