"""`tma-backup backup`: through the workers when a broker is configured, else in this process."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import click

from worker.archive.meta import human_size
from worker.cli import output
from worker.cli.common import database_option, guarded, phase_printer
from worker.errors import NothingChanged
from worker.settings import Settings, ensure_backup_dir, folder_warning, get_settings

if TYPE_CHECKING:  # the backup package pulls in psycopg: not needed for `--help`
    from worker.backup.run import Summary

PHASE_MESSAGES = {
    "counting rows": "Counting rows exactly, inside the dump's snapshot …",
    "dumping": "Running pg_dump (custom format, serializable snapshot) …",
    "listing TMA Cloud's bucket": "Listing TMA Cloud's bucket (STORAGE_DRIVER=s3) …",
    "downloading uploads from TMA Cloud's bucket": "Copying new and changed objects from TMA Cloud's bucket …",
    "capturing uploads": "Capturing the uploads into the repository (unchanged files are not read again) …",
    "verifying": "Verifying backup integrity (pg_restore --list) …",
    "checksumming": "Computing SHA-256 checksum …",
    "writing meta": "Writing .meta and publishing the backup …",
    "waiting for the repository": "Waiting for the repository (another run or the weekly prune uses it) …",
    "sending offsite": "Sending to the repository (BACKUP_REPOSITORY) …",
    "forgetting old sets": "Applying the repository's calendar retention (REPOSITORY_KEEP_*) …",
    "pruning": "Applying retention (BACKUP_RETAIN_COUNT) …",
}


# Warnings already shown while the run went (the start's): the summary repeats only the others.
_shown_warnings: set[str] = set()


def _warn_once(warning: str) -> None:
    if warning not in _shown_warnings:
        _shown_warnings.add(warning)
        output.warn(warning)


def _print_summary(summary: Summary) -> None:
    output.ok(f"Backup contains {summary['toc_entries']} TOC entries.")
    if summary["tables"] == 0:
        output.warn("The database has no tables: is DB_NAME the database you meant to back up?")
    output.section("Backup Complete")
    output.ok(f"File       : {summary['backup']}")
    output.ok(f"Size       : {summary['size']} ({summary['size_bytes']} bytes)")
    output.ok(f"Duration   : {summary['duration_seconds']:.1f}s")
    output.ok(f"TOC entries: {summary['toc_entries']}")
    output.ok(f"Tables     : {summary['tables']} (exact row counts in the .meta)")
    output.ok(f"SHA-256    : {summary['sha256']}")
    uploads = summary.get("uploads")
    if uploads:
        _print_uploads(uploads)
    for warning in summary.get("warnings", []):
        if "upload" not in warning:  # the uploads' own lines above say it
            _warn_once(warning)
    offsite = summary.get("offsite")
    if offsite:
        added = human_size(int(offsite["bytes_added"]))
        output.ok(f"Off site   : set {offsite['set']} in {offsite['repository']} ({added}B added, {offsite['seconds']:.1f}s)")
        for sent in offsite["sent"]:
            if sent["set"] != offsite["set"]:
                output.info(f"             also sent the backup of {sent['timestamp']} (set {sent['set']}), which an earlier run could not")
        if offsite.get("forgotten"):
            output.info(f"             forgot {len(offsite['forgotten'])} old set(s) per REPOSITORY_KEEP_*")
        if offsite.get("retention"):
            output.warn(f"Retention  : {offsite['retention']}")
    if summary.get("deleted"):
        output.info(f"Pruned     : {', '.join(summary['deleted'])}")


def _print_uploads(uploads: dict[str, Any]) -> None:
    if uploads.get("error"):
        output.warn(f"Uploads    : not captured ({uploads['error']})")
    else:
        output.ok(f"Uploads    : {uploads['files']} files ({human_size(int(uploads['bytes']))}B), part {uploads['part']}, "
                  f"{human_size(int(uploads['bytes_added']))}B added, {uploads['seconds']:.1f}s")
        output.ok(f"Cross-check: {uploads['referenced']} referenced, {uploads['missing']} missing, "
                  f"{uploads['unreferenced']} unreferenced (fine)")
    if uploads.get("downloaded") is not None:
        output.info(f"Bucket     : {uploads['downloaded']} object(s) downloaded "
                    f"({human_size(int(uploads.get('downloaded_bytes', 0)))}B); the rest unchanged since the last run")
    if uploads.get("source_versioning") is False:
        output.warn("Bucket     : TMA Cloud's bucket keeps no versions: an overwritten or deleted object cannot be "
                    "recovered from the bucket itself (enable versioning)")
    if uploads.get("source_refused"):
        output.warn(f"Bucket     : {uploads['source_refused']} key(s) cannot be stored as files and were not copied: "
                    f"{', '.join(uploads.get('source_refused_names', [])[:5])}")
    if uploads.get("missing"):
        names = ", ".join(uploads.get("missing_names", [])[:5])
        output.warn(f"{uploads['missing']} referenced upload(s) missing from the set: {names}"
                    + (" …" if uploads["missing"] > 5 else ""))
    for key, what in (("unreadable", "could not be read"), ("escaping", "lead outside UPLOAD_DIR and were not read")):
        if uploads.get(key):
            output.warn(f"{uploads[key]} upload(s) {what}: {', '.join(uploads.get(key + '_names', [])[:5])}")


@click.command("backup")
@click.option("--database", "-d", help="Database to back up (default: DB_NAME).")
@click.option("--if-changed", is_flag=True, help="Make no set when nothing changed since the last one (what "
              "scheduled runs do; for a cron job of your own).")
@guarded
def backup_command(database: str | None, if_changed: bool) -> None:
    """Take a backup: dump → verify → checksum → meta → offsite (with BACKUP_REPOSITORY) → prune."""
    settings = get_settings()
    database = database_option(database, settings)
    output.section("Full Database Backup")
    try:
        if settings.broker_url:
            summary = _backup_through_workers(settings, database, if_changed)
        else:
            summary = _backup_in_process(settings, database, if_changed)
    except NothingChanged as unchanged:
        output.ok(f"Unchanged  : nothing changed in {database!r} since the set of {unchanged.record['timestamp']}, "
                  "which stays current: no set made (checked)")
        return
    _print_summary(summary)


def _backup_in_process(settings: Settings, database: str, if_changed: bool) -> Summary:
    from worker.backup.inprocess import run_backup
    from worker.pg.executors import choose_executor

    output.info("No broker configured (CELERY_BROKER_URL unset): running the backup in this process.")
    warning = folder_warning(ensure_backup_dir(settings))
    if warning:
        _warn_once(warning)
    executor = choose_executor(settings)
    output.info(f"Tools      : {executor.describe()}")
    output.info(f"Database   : {database}")
    return run_backup(settings, database, executor, phase_printer(PHASE_MESSAGES), if_changed)


def _backup_through_workers(settings: Settings, database: str, if_changed: bool) -> Summary:
    from worker import app
    from worker.cli.follow import check_workers, dispatch, follow_backup, sanitized

    STEP_PHASES = {"verify": "verifying", "checksum": "checksumming", "meta": "writing meta",
                   "offsite": "sending offsite", "prune": "pruning"}

    workers = check_workers(app)
    output.info(f"Broker     : {sanitized(settings.broker_url or '')} ({len(workers)} worker(s) answered)")
    output.info(f"Database   : {database}")
    kickoff = dispatch(app, "tma_backup.backup", {"database": database, **({"if_changed": True} if if_changed else {})})
    show = phase_printer(PHASE_MESSAGES)

    def on_event(step: str, state: str, info: Any) -> None:
        if step == "kickoff":
            output.info(f"Run        : {info['run_id']} on worker host {info['host']}")
            output.info(f"Target     : {info['backup']}")
            for warning in info.get("warnings", []):
                _warn_once(warning)
        elif state == "RETRY":
            output.warn(f"{step}: {info}; trying again (BACKUP_RETRIES={settings.BACKUP_RETRIES}, with backoff)")
        elif state == "PROGRESS" and isinstance(info, dict):
            show(str(info.get("phase", step)), info)
        elif state == "STARTED" and step in STEP_PHASES:
            show(STEP_PHASES[step], {})

    from worker.coordination.locks import lock_owner, renewal_interval

    def owner_of(key: str) -> str | None:
        return lock_owner(settings, key)

    # A link notices a lost lock within one renewal interval and then fails: wait that long (and a
    # little more) for its own report before saying that the run was lost.
    grace = renewal_interval(settings) + 3
    return cast("Summary", follow_backup(app, kickoff, settings.FOLLOW_TIMEOUT, on_event, owner_of, grace))
