"""Chain links check the run record their message carries (issue 20, docs/threat-model.md): whoever can
write to the broker (without signing) sends `tma_backup.verify` with a run record of their own making
and the chain's error callback; the record's backup path outside BACKUP_DIR, a name that is not the
database's backup, another host's run: refused before anything is touched, and the error callback
removes nothing. Real worker (the session's `host-main`), real broker.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_for
from tests.test_workers import client_app
from worker.celery_app import host_queue


def forged_run(backup: Path, database: str, timestamp: str, host: str = "host-main") -> dict[str, Any]:
    return {"run_id": f"forged-{uuid.uuid4()}", "database": database, "backup": str(backup), "timestamp": timestamp,
            "host": host, "started_at": time.time(), "warnings": []}


def victims(folder: Path, name: str) -> list[Path]:
    """The files a failed run's clean-up would remove for backup `folder/name`."""
    made = [folder / f"{name}{suffix}" for suffix in (".partial", ".partial.counts", ".partial.refs", ".meta.tmp",
                                                      ".meta", ".env")]
    folder.mkdir(parents=True, exist_ok=True)
    for path in made:
        path.write_text("precious")
    return made


@pytest.mark.parametrize("where", ["outside", "wrong-name", "other-host"])
def test_a_forged_link_is_refused_and_its_error_callback_removes_nothing(celery_worker_proc, tma_db, tmp_path, where):
    app = client_app(celery_worker_proc.env["CELERY_BROKER_URL"])
    backup_dir = Path(celery_worker_proc.env["BACKUP_DIR"])
    timestamp = "20260101T000000Z"
    name = f"{tma_db}_{timestamp}.dump"
    if where == "outside":
        made, run = victims(tmp_path / "elsewhere", name), forged_run(tmp_path / "elsewhere" / name, tma_db, timestamp)
    elif where == "wrong-name":
        made = victims(backup_dir, "handmade.dump")
        run = forged_run(backup_dir / "handmade.dump", tma_db, timestamp)
    else:
        made, run = victims(backup_dir, name), forged_run(backup_dir / name, tma_db, timestamp, host="host-other")
    link = app.signature("tma_backup.verify", args=[run], queue=host_queue("host-main"))
    link.link_error(app.signature("tma_backup.backup_failed", queue=host_queue("host-main")))
    result = link.apply_async()
    with pytest.raises(Exception, match="refused a chain link"):
        result.get(timeout=60)
    wait_for(lambda: f"{result.id} failed" in celery_worker_proc.log(), what="the error callback to run")
    assert [path.name for path in made if not path.exists()] == [], "nothing was removed"
    for path in made:
        path.unlink()
