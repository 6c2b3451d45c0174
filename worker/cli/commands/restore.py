"""`tma-backup restore | rollback`: the operator's side of a restore.

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

from worker.archive.meta import human_size
from worker.backup.tma_version import is_newer
from worker.cli import output
from worker.cli.common import RESTORE_PHASES, database_option, duration, guarded, phase_printer

UPLOADS_PHASES = {
    "fetching uploads": "Fetching the set's uploads beside the live ones (inside UPLOAD_DIR) …",
    "checking uploads": "Checking the restored uploads against the restored database's references …",
}
from worker.cli.follow import call_task
from worker.errors import BackupError
from worker.restore.tokens import LocalTokenStore, RedisTokenStore, TokenStore, new_token, token_hash
from worker.settings import Settings, SettingsError, get_settings


def fetch_from_repository(settings: Settings, reference: str, database: str | None,
                          host: str | None, server: str | None = None, whole: bool = False) -> tuple[str, str | None]:
    """Fetch a set into BACKUP_DIR (on the worker's host through the broker, else here); returns the
    backup's file name and the host that now holds it. `server`: whose `latest` (default: this server's).
    `whole` (its uploads are restored too): `latest` is the newest set that has them."""
    if not settings.repository:
        raise SettingsError("--from-repository needs BACKUP_REPOSITORY (and its password)")
    if server is not None and reference != "latest":
        raise SettingsError("--server goes with --from-repository latest (a set's id names its server already)")
    database = database_option(database, settings) if reference == "latest" else database
    output.info(f"Repository : fetching set {reference}" + (f" of {database!r}" if reference == "latest" else "") + " …")
    if settings.broker_url:
        kwargs = {"reference": reference, "database": database, **({"server": server} if server else {}),
                  **({"whole": True} if whole else {})}
        fetched = dict(call_task(settings, "tma_backup.fetch", kwargs, host))
        host = str(fetched.get("host") or host)  # the restore runs where the file now is
    else:
        from worker.repository.fetch import fetch

        fetched = fetch(settings, reference, database, f"local-{uuid.uuid4()}", server=server, whole=whole)
    for item in fetched.get("passed_over") or []:
        output.warn(f"Set        : {item['set']} of {item['timestamp']} is newer but without its uploads (their capture "
                    "failed): the newest whole set is restored instead")
    how = "already here, identical" if fetched["already_local"] else "fetched"
    output.ok(f"Set        : {fetched['set']} → {fetched['file']} ({human_size(fetched['size_bytes'])}B, "
              f"SHA-256 checked; {how}; {fetched['seconds']:.1f}s)")
    return str(fetched["file"]), host


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
    made, live = details.get("tma_migration"), details.get("live_tma_migration")
    if made:
        output.info(f"TMA Cloud  : the set's newest migration {made}" + (f"; the live database's {live}" if live else ""))
    if is_newer(made, live):
        output.warn(f"TMA Cloud  : this set was taken by a NEWER TMA Cloud (migration {made}) than the live database's "
                    f"({live}): run that TMA Cloud version (or newer) after the restore, or the application breaks")


def _report(result: dict[str, Any]) -> None:
    output.section("Restore Complete")
    output.ok(f"Database   : {result['database']} ({result['mode']} mode)")
    output.ok(f"From       : {result['file']}")
    if result["mode"] != "uploads-only":
        output.ok(f"Tables     : {result['tables']}, {result['rows']} rows (exact, equal to the backup's .meta)")
        for table, rows in result["row_counts"].items():
            output.ok(f"  {table} = {rows}")
    output.ok(f"Duration   : {duration(result)}")
    uploads = result.get("uploads")
    if uploads:
        output.ok(f"Uploads    : {uploads['files']} files restored into {uploads['upload_dir']} (part {uploads['part']}); "
                  f"the files that were live are kept in {uploads['previous']}")
        if uploads.get("missing") and result["mode"] == "uploads-only":
            output.warn(f"Uploads    : {uploads['missing']} upload(s) the live database references are not in the set "
                        f"(newer than it, or already missing then) and stay missing: "
                        f"{', '.join(uploads.get('missing_names', [])[:5])}")
        elif uploads.get("missing"):
            output.warn(f"Uploads    : {uploads['missing']} referenced upload(s) were already missing when the set was made: "
                        f"{', '.join(uploads.get('missing_names', [])[:5])}")
        if uploads.get("key_matches") is False:
            output.warn(f"Key        : these uploads were written with another FILE_ENCRYPTION_KEY (SHA-256 "
                        f"{uploads['key_sha256'][:16]}…): restore the set's .env or TMA Cloud cannot read them")
        elif uploads.get("key_sha256"):
            output.ok(f"Key        : FILE_ENCRYPTION_KEY SHA-256 {uploads['key_sha256'][:16]}… "
                      + ("(the current key)" if uploads.get("key_matches") else "(not set here: cannot compare)"))
    if uploads and len(uploads.get("previous_folders", [])) > 1:
        output.info(f"Uploads    : UPLOAD_DIR holds {len(uploads['previous_folders'])} folders of files set aside by "
                    "restores (.tma-previous-*); each goes when its database copy goes (RESTORE_KEEP_PREVIOUS)")
    if uploads and uploads.get("left_in_place"):
        output.warn(f"Uploads    : left in place (no rename can move them): {', '.join(uploads['left_in_place'][:5])}")
    if result.get("settled_uploads"):
        output.warn(f"Uploads    : an interrupted swap was settled first: {result['settled_uploads']}")
    if result.get("kept"):
        output.ok(f"Previous   : kept as {result['kept']!r} (connections refused)")
        output.info(f"Roll back  : tma-backup rollback --database {result['database']} --confirm {result['database']}")
    if result.get("cleaned_leftovers"):
        output.warn(f"Removed scratch databases left by an interrupted run: {', '.join(result['cleaned_leftovers'])}")
    if result.get("repaired_connections"):
        output.warn("The live database was refusing connections after an interrupted swap; re-enabled.")
    output.info("Restart the application to refresh connection pools.")


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
        from worker.coordination.locks import redis_client

        return RedisTokenStore(redis_client(settings.broker_url))
    return LocalTokenStore()


def _prepare(settings: Settings, file: str, hashed: str, host: str | None, store: TokenStore,
             checksum: bool) -> dict[str, Any]:
    if settings.broker_url:
        kwargs = {"file": file, "token_hash": hashed, "checksum": checksum}
        return dict(call_task(settings, "tma_backup.restore_prepare", kwargs, host))
    from worker.pg.executors import choose_executor
    from worker.restore import prepare

    executor = choose_executor(settings)
    prepared = prepare.prepare(settings, executor, file, checksum)
    prepare.issue_token(store, prepared, settings.WORKER_HOST, settings.RESTORE_TOKEN_TTL, hashed)
    return {**prepared.describe(), "host": settings.WORKER_HOST, "server": executor.describe(), "expires_in": settings.RESTORE_TOKEN_TTL}


def _run(settings: Settings, store: TokenStore, token: str, confirm: str, mode: str, host: str | None,
         file: str | None = None, uploads: str = "none") -> dict[str, Any]:
    progress = phase_printer({**RESTORE_PHASES, **UPLOADS_PHASES})
    if settings.broker_url:
        kwargs = {"token": token, "confirm": confirm, "mode": mode, "file": file, "uploads": uploads}
        masked = {**kwargs, "token": "***"}
        return dict(call_task(settings, "tma_backup.restore", kwargs, host, masked, progress))
    from worker.coordination.locks import database_lock
    from worker.pg.executors import choose_executor
    from worker.pg.identity import server_identity
    from worker.restore import restore

    run = f"local-{uuid.uuid4()}"
    executor = choose_executor(settings)
    lock = database_lock(settings, confirm, run, server_identity(settings, executor, confirm))
    return restore.restore(settings, executor, store, token, confirm, lock, run, mode, progress, file, uploads)


@click.command("restore")
@click.argument("file", required=False)
@click.option("--confirm", "confirm_name", help="The database name, typed in advance (no prompt).")
@click.option("--mode", type=click.Choice(["swap", "in-place"]), default="swap", show_default=True,
              help="swap: restore beside the live database and swap by rename; in-place: the seed's drop and recreate.")
@click.option("--prepare", "prepare_only", is_flag=True, help="Check the backup and print a token; restore later with --token.")
@click.option("--token", help="A token printed by --prepare.")
@click.option("--host", help="The worker host that holds FILE (several worker hosts share the broker).")
@click.option("--from-repository", "from_repository", metavar="SET|latest",
              help="Fetch this set (or the latest of --database) from BACKUP_REPOSITORY into BACKUP_DIR first.")
@click.option("--database", "-d", help="With --from-repository latest: whose latest set (default: DB_NAME).")
@click.option("--with-uploads", is_flag=True, help="Also restore the set's uploads into UPLOAD_DIR, swapped together "
              "with the database (the current files are kept aside).")
@click.option("--uploads-only", is_flag=True, help="Restore only the set's uploads (the database is not touched).")
@click.option("--server", metavar="pg-ID", help="With --from-repository latest: the newest set of that database server "
              "(its Server in `repository list`), for a new server that restores an old one's sets.")
@guarded
def restore_command(file: str | None, confirm_name: str | None, mode: str, prepare_only: bool, token: str | None,
                    host: str | None, from_repository: str | None, database: str | None, with_uploads: bool,
                    uploads_only: bool, server: str | None) -> None:
    """Restore FILE (from BACKUP_DIR) into its database, never destroying the live one on failure."""
    settings = get_settings()
    if with_uploads and uploads_only:
        raise SettingsError("restore: --with-uploads and --uploads-only do not go together")
    uploads = "with" if with_uploads else "only" if uploads_only else "none"
    if uploads != "none" and mode != "swap":
        raise SettingsError("restore: restoring uploads needs --mode swap (the current files are kept aside)")
    if from_repository is not None:
        if file or token:
            raise SettingsError("restore: --from-repository replaces FILE and does not go with --token")
        file, host = fetch_from_repository(settings, from_repository, database, host, server, whole=uploads != "none")
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
        result = _run(settings, store, token, confirm_name, mode, binding.host if binding else host, file, uploads)
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
    _report(_run(settings, store, token, confirm, mode, details["host"], None, uploads))


@click.command("rollback")
@click.option("--database", "-d", help="Database to roll back (default: DB_NAME).")
@click.option("--confirm", "confirm_name", required=True, help="The database name, typed again.")
@guarded
def rollback_command(database: str | None, confirm_name: str) -> None:
    """Swap the kept previous copy back in (the current one is kept in its turn)."""
    settings = get_settings()
    database = database_option(database, settings)
    output.section("Rollback")
    if confirm_name != database:
        raise BackupError(f"rollback refused: the confirmation {confirm_name!r} does not match the database "
                          f"{database!r}; nothing was touched")
    store = _store(settings)
    token = new_token()
    if settings.broker_url:
        kwargs = {"database": database, "token_hash": token_hash(token)}
        prepared = dict(call_task(settings, "tma_backup.rollback_prepare", kwargs, None))
    else:
        from worker.pg.executors import choose_executor
        from worker.restore import rollback

        prepared = rollback.prepare_rollback(settings, choose_executor(settings), store, database, token_hash(token))
    output.info(f"Roll back  : {prepared['database']} to the copy kept as {prepared['kept']!r}")
    if settings.broker_url:
        kwargs = {"token": token, "confirm": confirm_name}
        result = call_task(settings, "tma_backup.rollback", kwargs, prepared["host"], {**kwargs, "token": "***"})
    else:
        from worker.coordination.locks import database_lock
        from worker.pg.identity import server_identity

        run = f"local-{uuid.uuid4()}"
        executor = choose_executor(settings)
        lock = database_lock(settings, confirm_name, run, server_identity(settings, executor, confirm_name))
        result = rollback.rollback(settings, executor, store, token, confirm_name, lock, run)
    output.ok(f"Database   : {result['database']} is now the copy kept as {result['restored_from']!r}")
    output.ok(f"Replaced   : kept as {result['kept']!r}")
    if result.get("uploads"):
        output.ok(f"Uploads    : the files kept with it ({result['uploads']['restored_from']}) are live again; "
                  f"the replaced ones are kept in {result['uploads']['kept']}")
    output.info("Restart the application to refresh connection pools.")
