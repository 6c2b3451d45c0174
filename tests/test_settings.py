"""Settings: the environment wins over .env; every bad value is one line naming the variable, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from tests.conftest import run_cli
from tests.helpers import error_lines
from worker.settings import Settings, SettingsError, get_settings


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BACKUP_RETAIN_COUNT", "0"),
        ("BACKUP_RETAIN_COUNT", "-1"),
        ("BACKUP_RETAIN_COUNT", "abc"),
        ("DB_PORT", "70000"),
        ("DB_PORT", "five"),
        ("BACKUP_SCHEDULE", "every night"),
        ("BACKUP_COMPRESSION", "brotli"),
        ("DB_MODE", "kubernetes"),
        ("DB_NAME", "a/b"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable_and_exit_2(cli_env, backup_dir, tmp_path, variable, value):
    before = sorted(backup_dir.iterdir())
    result = run_cli(["backup"], {**cli_env, variable: value}, tmp_path)
    assert result.returncode == 2, result.output
    [line] = error_lines(result.stderr)
    assert line.startswith(f"[ERROR] {variable}:")
    assert "Traceback" not in result.output
    assert sorted(backup_dir.iterdir()) == before


def test_an_unwritable_backup_dir_is_refused_with_exit_2(cli_env, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_cli(["backup"], {**cli_env, "BACKUP_DIR": str(blocker / "backups")}, tmp_path)
    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert line.startswith("[ERROR] BACKUP_DIR:")


def test_the_environment_wins_over_dot_env(cli_env, backup_dir, tma_db, tmp_path):
    (tmp_path / ".env").write_text("DB_NAME=not_this_one\nBACKUP_RETAIN_COUNT=0\nDB_PORT=1\n")
    env = {**cli_env, "BACKUP_RETAIN_COUNT": "2"}
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    assert f"Database   : {tma_db}" in result.stderr


def test_dot_env_fills_what_the_environment_leaves_unset(cli_env, tma_db, tmp_path):
    env = {key: value for key, value in cli_env.items() if key != "DB_NAME"}
    (tmp_path / ".env").write_text(f"DB_NAME={tma_db}\n")
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 0, result.output
    assert f"Database   : {tma_db}" in result.stderr


def test_password_is_never_echoed_in_a_settings_error(monkeypatch):
    monkeypatch.setenv("DB_PORT", "bad")
    monkeypatch.setenv("DB_PASSWORD", "hunter2-secret")
    get_settings.cache_clear()
    with pytest.raises(SettingsError) as caught:
        get_settings()
    get_settings.cache_clear()
    assert "hunter2" not in str(caught.value)


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.text(max_size=20))
def test_retain_count_accepts_only_whole_numbers_of_at_least_one(value):
    try:
        parsed = Settings(BACKUP_RETAIN_COUNT=value, _env_file=None).BACKUP_RETAIN_COUNT  # type: ignore[call-arg]
    except Exception as error:
        assert "BACKUP_RETAIN_COUNT" in str(error)
    else:
        assert parsed >= 1 and int(value.strip()) == parsed


def test_broker_commands_say_when_no_worker_answers(cli_env, redis_server, tmp_path):
    env = {**cli_env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_server.port}/9"}
    result = run_cli(["backup"], env, tmp_path)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "no tma-backup worker answered" in line


@pytest.mark.slow
def test_an_unreachable_broker_is_one_line(cli_env, tmp_path):
    from tests.services import free_port

    env = {**cli_env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    result = run_cli(["backup"], env, tmp_path, timeout=60)
    assert result.returncode == 1
    [line] = error_lines(result.stderr)
    assert "cannot reach the broker" in line
    assert "Traceback" not in result.output
    assert Path(tmp_path).exists()
