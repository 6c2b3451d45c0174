"""`tma-backup status --json` when nobody can answer: a broker configured and no worker on it, or a
broker that cannot be reached. Monitoring that parses stdout must still get one JSON object, with the
keys of every other answer, `ok` false and the reason among its `problems`; exit 1, and the one
`[ERROR]` line on stderr as before. Against the session's real Redis, with no worker on its database."""

from __future__ import annotations

import json

from tests import services
from tests.conftest import base_env, run_cli
from tests.helpers import error_lines

NO_WORKER_DB = 2  # no test starts a worker on this Redis database (tests/test_repository.py: 0, 3-15 are used)
KEYS = {"database", "source", "checked_at", "ok", "problems", "warnings", "hosts", "backup", "drill", "repository",
        "uploads", "connections", "vault"}


def _status_json(env: dict[str, str], tmp_path, *args: str) -> tuple[dict, str]:
    result = run_cli(["status", "--json", *args], env, tmp_path, timeout=60)
    assert result.returncode == 1, result.output
    assert "Traceback" not in result.output
    [line] = error_lines(result.stderr)
    answer = json.loads(result.stdout)  # one JSON object, nothing else
    assert isinstance(answer, dict) and set(answer) == KEYS, answer
    assert answer["ok"] is False and answer["source"] == "workers" and answer["hosts"] == {}
    assert answer["warnings"] == [] and all(answer[section] is None for section in
                                            ("backup", "drill", "repository", "uploads", "connections", "vault"))
    [problem] = answer["problems"]
    assert line == f"[ERROR] {problem}", (line, problem)
    return answer, problem


def test_status_json_with_no_worker_on_the_broker_prints_one_object_saying_so_and_exits_1(pg, redis_server, tmp_path):
    (tmp_path / "backups").mkdir(mode=0o700)
    env = base_env(pg, tmp_path / "backups", CELERY_BROKER_URL=f"redis://127.0.0.1:{redis_server.port}/{NO_WORKER_DB}",
                   DB_NAME="tma_cloud_storage")
    answer, problem = _status_json(env, tmp_path)
    assert "no tma-backup worker answered" in problem and "tma-backup status --local" in problem, problem
    assert answer["database"] == "tma_cloud_storage" and len(answer["checked_at"]) == 16, answer
    named, _ = _status_json(env, tmp_path, "--database", "other_db")
    assert named["database"] == "other_db"

    # The broker itself out of reach: the same shape, its own reason.
    gone = {**env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{services.free_port()}/0"}
    _, problem = _status_json(gone, tmp_path)
    assert "cannot reach the broker" in problem, problem

    # Without --json, stdout stays empty: the one [ERROR] line says it all.
    plain = run_cli(["status"], env, tmp_path, timeout=60)
    assert plain.returncode == 1 and plain.stdout == "" and len(error_lines(plain.stderr)) == 1, plain.output
