"""`tma-backup verify | list | status`: look at backups without changing anything.

With a broker (CELERY_BROKER_URL) each command asks the worker hosts, which answer for their own
BACKUP_DIR, database server and repository (`worker.cli.hosts`, tasks in `tasks.status`), so the answer
is the same on an operator's laptop, on a compose stack's host and inside a worker. `--local` looks at
this machine's BACKUP_DIR instead, as does every command without a broker."""

from __future__ import annotations

import json
from typing import Any

import click

from worker.archive.meta import human_size
from worker.cli import output
from worker.cli.common import database_option, guarded, printable
from worker.errors import BackupError
from worker.settings import Settings, SettingsError, get_settings

LOCAL_HELP = "Look at this machine's BACKUP_DIR, without asking the workers."
HOST_HELP = "Ask only this worker host (WORKER_HOST)."
STATUS_ANSWER_SECONDS = 600.0  # a repository that stopped answering is given up after REPOSITORY_STALL_TIMEOUT
LIST_ANSWER_SECONDS = 60.0


def _via_workers(settings: Settings, local: bool, host: str | None) -> bool:
    if host is not None and (local or not settings.broker_url):
        raise SettingsError("--host asks a worker host through the broker: it needs CELERY_BROKER_URL, not --local")
    return bool(settings.broker_url) and not local


@click.command("verify")
@click.argument("file")
@click.option("--local", is_flag=True, help=LOCAL_HELP)
@click.option("--host", help=HOST_HELP)
@guarded
def verify_command(file: str, local: bool, host: str | None) -> None:
    """Check FILE's SHA-256 against its .meta and its TOC with pg_restore --list (no database needed).
    With a broker, on the worker host that has FILE."""
    from worker.health.files import verify_here

    settings = get_settings()
    output.section("Verify Backup")
    if not _via_workers(settings, local, host):
        checked = verify_here(settings, file)
        if not checked["found"]:
            raise BackupError(f"{checked['path']}: no such backup file")
        _show_verified(checked, None)
        return
    from worker.cli.hosts import ask_hosts, worker_hosts

    hosts = worker_hosts(settings, "verify", host)
    answers = ask_hosts(settings, hosts, "tma_backup.verify_file", {"file": file}, settings.FOLLOW_TIMEOUT)
    found = [answer for answer in answers if answer.answered and answer.result["found"]]
    failed = [answer for answer in answers if answer.error is not None]
    for answer in found:
        _show_verified(answer.result, answer.host)
    for answer in answers:
        if answer.silent:
            output.warn(f"Host       : {answer.silent}")
    if failed:
        raise BackupError("; ".join(f"{answer.host}: {answer.error}" if len(hosts) > 1 else answer.error or ""
                                    for answer in failed))
    if not found:
        silent = [answer.host for answer in answers if answer.silent]
        raise BackupError(f"{file}: no such backup file on the worker host(s) {', '.join(hosts)}"
                          + (f" ({', '.join(silent)} did not answer)" if silent else "")
                          + "; `tma-backup verify --local` looks on this machine")


def _show_verified(checked: dict[str, Any], host: str | None) -> None:
    output.info(f"File       : {printable(checked['path'])}" + (f" (on {host})" if host else ""))
    output.ok(f"SHA-256    : {checked['sha256']} (matches .meta)")
    output.ok(f"TOC entries: {checked['toc_entries']} (matches .meta)")
    output.ok(f"Tables     : {checked['tables']}, {checked['rows']} rows at backup time")
    output.ok("Backup is intact.")


@click.command("list")
@click.option("--local", is_flag=True, help=LOCAL_HELP)
@click.option("--host", help=HOST_HELP)
@guarded
def list_command(local: bool, host: str | None) -> None:
    """List backups in BACKUP_DIR: size, date, TOC entries, and whether each is complete. With a broker,
    in each worker host's BACKUP_DIR."""
    from worker.health.files import listing

    settings = get_settings()
    if not _via_workers(settings, local, host):
        _show_listing(listing(settings), None)
        return
    from worker.cli.hosts import ask_hosts, worker_hosts

    answers = ask_hosts(settings, worker_hosts(settings, "list", host), "tma_backup.list_backups", {},
                        LIST_ANSWER_SECONDS)
    for answer in answers:
        if answer.answered:
            _show_listing(answer.result, answer.host)
    unanswered = [f"{answer.host}: {answer.error or answer.silent}" for answer in answers if not answer.answered]
    if unanswered:
        raise BackupError("; ".join(unanswered))


def _show_listing(found: dict[str, Any], host: str | None) -> None:
    from rich.table import Table
    from rich.text import Text

    output.section(f"Backups in {printable(found['folder'])}" + (f" on {host}" if host else ""))
    if not found["backups"]:
        output.info("No backups yet.")
        return
    table = Table(box=None, pad_edge=False)
    for column in ("File", "Size", "Date (UTC)", "TOC", "State"):
        table.add_column(column)
    from worker.archive.catalogue import parse_timestamp

    for entry in found["backups"]:
        table.add_row(
            Text(printable(entry["file"])),  # Text: a name is never read as Rich markup
            human_size(entry["size"]),
            parse_timestamp(entry["timestamp"]).strftime("%Y-%m-%d %H:%M:%S"),
            "-" if entry["toc_entries"] is None else str(entry["toc_entries"]),
            "complete" if entry["problem"] is None else Text(f"INCOMPLETE ({printable(entry['problem'])})"),
        )
    output.stdout.print(table)


@click.command("status")
@click.option("--database", "-d", help="Database to report on (default: DB_NAME; with a broker, the workers').")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object on stdout.")
@click.option("--local", is_flag=True, help=LOCAL_HELP)
@click.option("--host", help=HOST_HELP)
@guarded
def status_command(database: str | None, as_json: bool, local: bool, host: str | None) -> None:
    """Is everything in place to restore tonight? The newest complete backup and its age, the last restore
    drill, the newest set in the repository, the uploads that set lacks, a database left refusing
    connections. Exit 1 when: the newest backup is older than BACKUP_MAX_AGE_HOURS (or there is none);
    the last drill failed, or none passed within two drill periods (BACKUP_DRILL_SCHEDULE); the
    repository cannot be read or its newest set is too old; the newest set lacks referenced uploads; an
    interrupted restore left the database refusing connections (`tma-backup repair` fixes it). Exit 2
    for bad settings. `--json`: the same facts for scripts (keys: see `worker.health.facts`), also when no
    worker answered or the broker is out of reach (every section null, the reason in `problems`)."""
    from worker.archive.catalogue import utc_timestamp
    from worker.health.combine import combine, unanswered
    from worker.health.facts import status_facts

    settings = get_settings()
    given = None if database is None else database_option(database, settings)
    via_workers = _via_workers(settings, local, host)
    try:
        if not via_workers:
            facts = status_facts(settings, given or settings.DB_NAME)
            combined = combine({settings.WORKER_HOST: facts}, facts["database"], "local", facts["checked_at"])
        else:
            from worker.cli.hosts import ask_hosts, worker_hosts

            answers = ask_hosts(settings, worker_hosts(settings, "status", host), "tma_backup.status",
                                {"database": given}, STATUS_ANSWER_SECONDS)
            names = sorted({answer.result["database"] for answer in answers if answer.answered})
            if len(names) > 1:
                raise BackupError(f"the worker hosts report on different databases (their DB_NAME: "
                                  f"{', '.join(names)}): give --database")
            combined = combine({answer.host: answer.result if answer.answered else str(answer.error or answer.silent)
                                for answer in answers}, names[0] if names else given or settings.DB_NAME, "workers",
                               utc_timestamp())
    except (BackupError, OSError) as error:
        if as_json:  # monitoring that parses stdout gets an answer too: nobody could be asked, and why
            reason = str(error) if isinstance(error, BackupError) else (  # as `guarded` words the [ERROR] line
                (f"{error.filename}: " if error.filename else "") + str(error.strerror or error))
            click.echo(json.dumps(unanswered(given or settings.DB_NAME, "workers" if via_workers else "local",
                                             utc_timestamp(), reason), indent=2))
        raise
    if as_json:
        click.echo(json.dumps(combined, indent=2))  # ASCII: any file name survives any terminal
    else:
        _show_status(combined)
    problems = combined["problems"]
    if problems:
        raise BackupError(problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems))
    if not as_json:
        output.ok("The vault is current." if combined["vault"] else
                  "Backups are current" + (", here and off site." if combined["repository"] else "."))


def _show_status(facts: dict[str, Any]) -> None:
    workers = facts["source"] == "workers"

    def on(section: dict[str, Any]) -> str:
        return f" (on {section['host']})" if workers else ""

    title = "Vault Status" if facts["vault"] else f"Backup Status: {facts['database']}"
    output.section(title + (f" (asked {', '.join(facts['hosts'])})" if workers else ""))
    for host, summary in facts["hosts"].items():
        if not summary["answered"]:
            output.warn(f"Host       : {host}: {summary['problems'][0]}")
    backup = facts["backup"]
    if backup is not None:
        if backup["file"] is None:
            output.warn(f"Newest     : no complete backup in {printable(backup['folder'])}{on(backup)}")
        else:
            output.info(f"Newest     : {printable(backup['file'])}{on(backup)}")
            output.info(f"Size       : {human_size(backup['size'])}")
            (output.warn if backup["problem"] else output.info)(
                f"Age        : {backup['age_hours']:.1f} h (limit BACKUP_MAX_AGE_HOURS={backup['max_age_hours']:g})")
        if backup["warning"]:
            output.warn(f"Upload key : {backup['warning']}")
    drill = facts["drill"]
    if drill is not None:
        _show_drill(drill, on(drill))
    repository = facts["repository"]
    if repository is not None:
        if repository["error"]:
            output.warn(f"Off site   : cannot read the repository ({repository['error']}){on(repository)}")
        elif not repository["sets"]:
            output.warn(f"Off site   : no set of {facts['database']!r} in {repository['address']}{on(repository)}")
        else:
            (output.warn if repository["problem"] else output.info)(
                f"Off site   : set {repository['set']} of {repository['timestamp']}, {repository['age_hours']:.1f} h "
                f"old, in {repository['address']} ({repository['sets']} set(s)){on(repository)}")
            if repository.get("recovery_point"):
                output.info(f"Recovery pt: {repository['recovery_point']} (the newest state safely off site; "
                            f"limit MAX_RPO {repository['max_rpo_hours']:g} h)")
    uploads = facts["uploads"]
    if uploads is not None:
        if uploads["problem"]:
            output.warn(f"Uploads    : {uploads['problem']}")
        else:
            output.info(f"Uploads    : every upload the database references is in the set of {uploads['file']}")
        if uploads.get("warning"):
            output.warn(f"Uploads    : {uploads['warning']}")
    vault = facts["vault"]
    if vault is not None:
        _show_vault(vault, on(vault))
    connections = facts["connections"]
    if connections is not None:
        if connections["problem"]:
            output.warn(f"Connections: REFUSED: {connections['problem']}{on(connections)}")
        elif not connections["checked"]:
            output.warn(f"Connections: not checked ({connections['error']}){on(connections)}")


def _show_vault(vault: dict[str, Any], where: str) -> None:
    if vault["error"]:
        output.warn(f"Vault      : cannot read {vault['address']} ({vault['error']}){where}")
    elif vault["timestamp"]:
        output.info(f"Vault      : {vault['sets']} set(s) in {vault['address']}, the newest of {vault['timestamp']} "
                    f"({vault['age_hours']:.1f} h old){where}")
    pulled = vault["last_pull"]
    if pulled:
        (output.info if pulled.get("ok") else output.warn)(
            f"Last pull  : {pulled['at']} from {vault['primary']}: "
            + (f"{pulled.get('copied', 0)} set(s) copied" if pulled.get("ok") else f"FAILED: {pulled.get('error')}"))
    for alarm in vault["alarms"]:
        output.warn(f"ALARM      : {alarm['since']}: {alarm['message']}")


def _show_drill(drill: dict[str, Any], where: str) -> None:
    if drill["result"] is None:
        output.warn(f"Last drill : none recorded (tma-backup drill){where}")
        if drill["problem"]:
            output.warn(f"Drills     : {drill['problem']}")
    elif drill["result"] == "pass":
        (output.warn if drill["problem"] or drill["warning"] else output.info)(
            f"Last drill : passed at {drill['at']} ({printable(drill['file'] or '-')}){where}"
            + (f", none since {drill['due_since']} (BACKUP_DRILL_SCHEDULE={drill['schedule']})"
               if drill["problem"] or drill["warning"] else ""))
    else:
        output.warn(f"Last drill : FAILED at {drill['at']}: {drill['error']}{where}")
