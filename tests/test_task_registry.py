"""Task names are a wire format: renaming one orphans messages already queued. Fail loudly instead."""

from __future__ import annotations

from worker import app

EXPECTED_TASKS = {
    "tma_backup.backup",
    "tma_backup.dump",
    "tma_backup.verify",
    "tma_backup.checksum",
    "tma_backup.meta",
    "tma_backup.prune",
    "tma_backup.backup_failed",
    "tma_backup.restore_prepare",
    "tma_backup.restore",
    "tma_backup.rollback",
    "tma_backup.rollback_prepare",
    "tma_backup.drill",
    "tma_backup.repair",
    "tma_backup.offsite",
    "tma_backup.fetch",
    "tma_backup.repository_maintenance",
    "tma_backup.status",
    "tma_backup.list_backups",
    "tma_backup.verify_file",
    "tma_backup.vault_pull",
    "tma_backup.vault_maintenance",
}


def test_registered_task_names_are_exactly_the_documented_ones():
    app.loader.import_default_modules()
    ours = {name for name in app.tasks if name.startswith("tma_backup.")}
    assert ours == EXPECTED_TASKS


def test_every_beat_entry_names_a_registered_task_and_expires():
    app.loader.import_default_modules()
    schedule = app.conf.beat_schedule
    assert schedule, "the nightly backup is scheduled"
    for name, entry in schedule.items():
        assert entry["task"] in app.tasks, name
        assert entry["options"]["expires"] > 0, name


def test_the_app_speaks_json_only_and_sends_events():
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
    assert app.conf.worker_send_task_events and app.conf.task_track_started
    assert not app.conf.task_acks_late


# The run record is a wire format too: links queued by one version are run by the next.
RUN_RECORD_KEYS = {
    "run_id", "database", "backup", "timestamp", "host", "server", "started_at", "warnings",
    "server_version", "server_id", "tma_migration", "change_fingerprint", "pg_dump_version", "archive_bytes", "mode", "mode_fields", "tables", "dump_seconds", "uploads",
    "toc_entries", "sha256", "size_bytes", "duration_seconds", "complete", "offsite", "deleted",
}
RUN_RECORD_REQUIRED = {"run_id", "database", "backup", "timestamp", "host", "started_at", "warnings"}
SUMMARY_KEYS = {"backup", "database", "host", "size", "size_bytes", "toc_entries", "sha256", "tables",
                "duration_seconds", "deleted", "mode"}


def test_the_run_record_keys_are_exactly_the_documented_ones():
    from worker.backup.run import Run, Summary

    assert Run.__required_keys__ | Run.__optional_keys__ == RUN_RECORD_KEYS
    assert Run.__required_keys__ == RUN_RECORD_REQUIRED
    assert Summary.__required_keys__ == SUMMARY_KEYS and Summary.__optional_keys__ == {"offsite", "uploads", "warnings"}
