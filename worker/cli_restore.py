"""`tma-backup restore | rollback | drill`: the operator's side of a restore.

restore FILE                      show what the backup holds, ask for the database name, restore
restore FILE --confirm DB         the same without a prompt
restore FILE --prepare            print a token (broker only); run it later with
restore --token T --confirm DB    from any machine that reaches the broker
"""

from __future__ import annotations

import sys
import uuid
from typing import Any

import click

from worker import output
from worker.cli import cli, database_option, guarded
from worker.errors import BackupError
from worker.meta import human_size
from worker.settings import Settings, SettingsError, get_settings
from worker.tokens import LocalTokenStore, RedisTokenStore, TokenStore, new_token, token_hash

PHASES = {
    "checking": "Checking the backup (SHA-256, TOC, row counts) …",
    "restoring": "Restoring into a scratch database (pg_restore --exit-on-error) …",
    "counting": "ANALYZE and exact row counts, compared with the backup's .meta …",
    "swapping": "Swapping the restored copy in by rename …",
    "dropping": "Dropping and recreating the database (in-place mode) …",
}


def _phase_printer() -> Any:
    seen: set[str] = set()

    def show(phase: str, fields: dict[str, Any]) -> None:
        if phase in PHASES and phase not in seen:
            seen.add(phase)
            output.info(PHASES[phase])

    return show


def _show_backup(details: dict[str, Any]) -> None:
    output.info(f"File       : {details['file']}")
    output.info(f"Taken      : {details['timestamp']}")
    output.info(f"Size       : {human_size(details['size_bytes'])}")
    checked = "verified" if details.get("sha256_verified", True) else "from its .meta; checked before pg_restore reads the file"
    output.info(f"SHA-256    : {details['sha256']} ({checked})")
    output.info(f"TOC entries: {details['toc_entries']} (verified)")
    output.info(f"Tables     : {details['tables']}, {details['rows']} rows at backup time")
    for table, rows in list(details["row_counts"].items())[:20]:
        output.info(f"  {table} = {rows}")
    if len(details["row_counts"]) > 20:
        output.info(f"  … and {len(details['row_counts']) - 20} more tables")
    output.info(f"Target     : database {details['database']!r} on {details['server']}")


def _report(result: dict[str, Any]) -> None:
    output.section("Restore Complete")
    output.ok(f"Database   : {result['database']} ({result['mode']} mode)")
    output.ok(f"From       : {result['file']}")
    output.ok(f"Tables     : {result['tables']}, {result['rows']} rows (exact, equal to the backup's .meta)")
    for table, rows in result["row_counts"].items():
        output.ok(f"  {table} = {rows}")
    output.ok(f"Duration   : {_duration(result)}")
    if result.get("kept"):
        output.ok(f"Previous   : kept as {result['kept']!r} (connections refused)")
        output.info(f"Roll back  : tma-backup rollback --database {result['database']} --confirm {result['database']}")
    if result.get("cleaned_leftovers"):
        output.warn(f"Removed scratch databases left by an interrupted run: {', '.join(result['cleaned_leftovers'])}")
    if result.get("repaired_connections"):
        output.warn("The live database was refusing connections after an interrupted swap; re-enabled.")
    output.info("Restart the application to refresh connection pools.")


def _duration(result: dict[str, Any]) -> str:
    """`13.3s (checking 0.5s, restoring 12.1s, …)`: the total, and each phase's share when reported."""
    phases = result.get("phase_seconds") or {}
    shares = ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in phases.items())
    return f"{result['duration_seconds']:.1f}s" + (f" ({shares})" if shares else "")


def _ask_confirmation(database: str) -> str:
    click.echo("Type the database name to confirm: ", nl=False, err=True)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        click.echo("", err=True)  # the answer was not echoed by a terminal: end the prompt's line
    if not answer:
        raise BackupError("restore cancelled: no confirmation (end of input); nothing was touched")
    if answer.strip() != database:
        raise BackupError(f"restore cancelled: {answer.strip()!r} is not {database!r}; nothing was touched")
    return answer.strip()


def _store(settings: Settings) -> TokenStore:
    if settings.broker_url:
        from worker.locks import redis_client

        return RedisTokenStore(redis_client(settings.broker_url))
    return LocalTokenStore()


def _queue_for(host: str | None) -> dict[str, Any]:
    from worker.celery_app import host_queue

    return {"queue": host_queue(host)} if host else {}


def _call(settings: Settings, task: str, kwargs: dict[str, Any], host: str | None, masked: dict[str, Any] | None = None,
          on_progress: Any = None) -> Any:
    """Run a task through the broker and wait for it; the CLI follows progress events."""
    import time

    from worker import app
    from worker.follow import check_workers, wait_for

    check_workers(app)
    options: dict[str, Any] = {**_queue_for(host), "retry": True, "retry_policy": {"max_retries": 3}}
    if masked is not None:
        options["kwargsrepr"] = repr(masked)
    result = app.send_task(task, kwargs=kwargs, **options)

    def on_state(state: str, info: Any) -> None:
        if on_progress and state == "PROGRESS" and isinstance(info, dict):
            on_progress(str(info.get("phase")), info)

    return wait_for(result, time.monotonic() + settings.FOLLOW_TIMEOUT, on_state, pending_limit=60)


def _prepare(settings: Settings, file: str, hashed: str, host: str | None, store: TokenStore,
             checksum: bool) -> dict[str, Any]:
    if settings.broker_url:
        kwargs = {"file": file, "token_hash": hashed, "checksum": checksum}
        return dict(_call(settings, "tma_backup.restore_prepare", kwargs, host))
    from worker import restore
    from worker.executors import choose_executor

    executor = choose_executor(settings)
    prepared = restore.prepare(settings, executor, file, checksum)
    restore.issue_token(store, prepared, settings.WORKER_HOST, settings.RESTORE_TOKEN_TTL, hashed)
    return {**prepared.describe(), "host": settings.WORKER_HOST, "server": executor.describe(), "expires_in": settings.RESTORE_TOKEN_TTL}


def _run(settings: Settings, store: TokenStore, token: str, confirm: str, mode: str, host: str | None,
         file: str | None = None) -> dict[str, Any]:
    progress = _phase_printer()
    if settings.broker_url:
        kwargs = {"token": token, "confirm": confirm, "mode": mode, "file": file}
        masked = {**kwargs, "token": "***"}
        return dict(_call(settings, "tma_backup.restore", kwargs, host, masked, progress))
    from worker import restore
    from worker.executors import choose_executor
    from worker.locks import database_lock

    run = f"local-{uuid.uuid4()}"
    lock = database_lock(settings, confirm, run)
    return restore.restore(settings, choose_executor(settings), store, token, confirm, lock, run, mode, progress, file)


@cli.command("restore")
@click.argument("file", required=False)
@click.option("--confirm", "confirm_name", help="The database name, typed in advance (no prompt).")
@click.option("--mode", type=click.Choice(["swap", "in-place"]), default="swap", show_default=True,
              help="swap: restore beside the live database and swap by rename; in-place: the seed's drop and recreate.")
@click.option("--prepare", "prepare_only", is_flag=True, help="Check the backup and print a token; restore later with --token.")
@click.option("--token", help="A token printed by --prepare.")
@click.option("--host", help="The worker host that holds FILE (several worker hosts share the broker).")
@guarded
def restore_command(file: str | None, confirm_name: str | None, mode: str, prepare_only: bool, token: str | None,
                    host: str | None) -> None:
    """Restore FILE (from BACKUP_DIR) into its database, never destroying the live one on failure."""
    settings = get_settings()
    store = _store(settings)
    output.section("Database Restore")
    if token:
        if prepare_only:
            raise SettingsError("restore: --token and --prepare do not go together")
        if not confirm_name:
            raise SettingsError("restore: --token needs --confirm DBNAME")
        if not settings.broker_url:
            raise SettingsError("restore: --token needs CELERY_BROKER_URL (tokens live in Redis)")
        binding = store.peek(token_hash(token))
        output.info(f"Token      : {token[:4]}… for {binding.file if binding else 'an unknown or expired token'}")
        result = _run(settings, store, token, confirm_name, mode, binding.host if binding else host, file)
        _report(result)
        return
    if not file:
        raise SettingsError("restore: give the backup FILE to restore (or --token)")
    if prepare_only and not settings.broker_url:
        raise SettingsError("restore --prepare needs CELERY_BROKER_URL (tokens live in Redis)")
    token = new_token()
    # The restore task hashes the file under the lock before pg_restore reads it. Hash here too only
    # when someone decides on what we show: at the prompt, or later with a prepared token.
    checksum = prepare_only or confirm_name is None
    details = _prepare(settings, file, token_hash(token), host, store, checksum)
    _show_backup(details)
    if prepare_only:
        output.ok(f"Prepared   : token valid for {details['expires_in']}s, single use")
        output.info(f"Run        : tma-backup restore --token TOKEN --confirm {details['database']}")
        click.echo(token)
        return
    if mode == "in-place":
        output.warn("In-place mode drops the database before restoring: if the restore fails, it is left EMPTY.")
    confirm = confirm_name if confirm_name is not None else _ask_confirmation(details["database"])
    if confirm != details["database"]:
        store.take(token_hash(token))
        raise BackupError(f"restore cancelled: {confirm!r} is not {details['database']!r}; nothing was touched")
    _report(_run(settings, store, token, confirm, mode, details["host"]))


@cli.command("rollback")
@click.option("--database", "-d", help="Database to roll back (default: DB_NAME).")
@click.option("--confirm", "confirm_name", required=True, help="The database name, typed again.")
@guarded
def rollback_command(database: str | None, confirm_name: str) -> None:
    """Swap the kept previous copy back in (the current one is kept in its turn)."""
    settings = get_settings()
    database = database_option(database, settings)
    output.section("Rollback")
    if settings.broker_url:
        result = _call(settings, "tma_backup.rollback", {"database": database, "confirm": confirm_name}, None)
    else:
        from worker import restore
        from worker.executors import choose_executor
        from worker.locks import database_lock

        run = f"local-{uuid.uuid4()}"
        result = restore.rollback(settings, choose_executor(settings), database, confirm_name,
                                  database_lock(settings, database, run), run)
    output.ok(f"Database   : {result['database']} is now the copy kept as {result['restored_from']!r}")
    output.ok(f"Replaced   : kept as {result['kept']!r}")
    output.info("Restart the application to refresh connection pools.")


@cli.command("drill")
@click.argument("file", required=False)
@click.option("--database", "-d", help="Database whose newest backup to drill (default: DB_NAME).")
@click.option("--host", help="The worker host that holds the backups.")
@guarded
def drill_command(file: str | None, database: str | None, host: str | None) -> None:
    """Restore a backup (default: the newest complete one) into a scratch database, compare exact
    row counts with its .meta, drop the scratch database. Touches nothing live."""
    settings = get_settings()
    database = database_option(database, settings)
    output.section("Restore Drill")
    if settings.broker_url:
        result = _call(settings, "tma_backup.drill", {"database": database, "file": file}, host,
                       on_progress=_phase_printer())
    else:
        from worker import drills
        from worker.executors import choose_executor

        result = drills.run_and_record(settings, choose_executor(settings), database, file,
                                       f"local-{uuid.uuid4()}", _phase_printer())
    output.ok(f"Drill passed: {result['file']} restores with {result['tables']} tables and {result['rows']} rows, "
              f"equal to its .meta, in {_duration(result)}; scratch database dropped")
