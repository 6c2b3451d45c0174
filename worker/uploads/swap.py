"""Uploads restored beside the live ones and swapped together with the database, inside UPLOAD_DIR.

UPLOAD_DIR may be a mount point (compose's bind mount), which cannot itself be renamed, so everything
happens inside it, where every rename stays on one file system:

- `.tma-restore-<run>/`: the set's uploads, fetched before anything is swapped;
- `.tma-previous-<kept>/`: the files that were live, moved aside (never deleted), paired with the
  database copy the same swap kept (`<kept>` is that database's name), so a rollback brings both back;
- `.tma-uploads-swap.json`: the journal of a swap in progress: `{run, database, staged, previous, phase}`.

A swap is: journal (phase `db`) → the database swap → phase `out`: every live entry into the previous
folder → phase `in`: every staged entry into UPLOAD_DIR → journal removed. After a crash, `settle`
finishes or undoes it from the journal, under the database's lock: before the database swap committed
(no kept copy of that run exists) the uploads are left as they were and the staging folder removed;
after it, the move is finished. Both old or both new, never a mix.

TMA Cloud's orphan cleanup reads UPLOAD_DIR's top level and unlinks what no row references; `unlink`
fails on a folder, so these folders are safe from it (TMA Cloud should still be stopped during a
restore: an upload written during the swap would land among whichever files are live at that moment).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.archive.meta import fsync_dir, write_atomically
from worker.errors import BackupError
from worker.faults import crash_point

OURS = ".tma-"
JOURNAL = ".tma-uploads-swap.json"
STAGED_PREFIX = ".tma-restore-"
PREVIOUS_PREFIX = ".tma-previous-"
ROOM_MARGIN = 64 * 1024 * 1024


@dataclass
class Journal:
    run: str
    database: str
    staged: str
    previous: str
    phase: str  # db | out | in
    kept: str | None = None  # the database copy this swap keeps (None: there was no live database)
    scratch: str | None = None  # the database swapped in, by its name before the swap

    def save(self, folder: Path) -> None:
        write_atomically(folder / JOURNAL, json.dumps(self.__dict__))


def read_journal(folder: Path) -> Journal | None:
    try:
        return Journal(**json.loads((folder / JOURNAL).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as error:
        raise BackupError(f"the uploads swap journal {folder / JOURNAL} is unreadable ({error}); "
                          "inspect UPLOAD_DIR by hand") from None


def live_entries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.startswith(OURS))


def check_room(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + ROOM_MARGIN:
        from worker.archive.meta import human_size

        raise BackupError(
            f"not enough free space in UPLOAD_DIR {folder} to restore the uploads beside the live ones: they need "
            f"{human_size(needed)}B (+{human_size(ROOM_MARGIN)}B margin), {human_size(free)}B are free; nothing was touched")


def staged_folder(folder: Path, run: str) -> Path:
    return folder / f"{STAGED_PREFIX}{''.join(char for char in run if char.isalnum() or char == '-')[:48]}"


def files_of(root: Path) -> dict[str, int]:
    """Every regular file under `root` (relative POSIX path → size); symbolic links are not followed."""
    found: dict[str, int] = {}
    for directory, _folders, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            if path.is_file() and not path.is_symlink():
                found[path.relative_to(root).as_posix()] = path.stat().st_size
    return found


def _move_all(source: Path, target: Path, names: list[str]) -> None:
    for name in names:
        os.rename(source / name, target / name)
    fsync_dir(source)
    fsync_dir(target)


def swap_uploads(folder: Path, staged: Path, run: str, database: str, kept_database: str | None,
                 swap_database: Callable[[], Any], scratch: str | None = None) -> tuple[Any, str]:
    """Swap the database (`swap_database()`, which must be atomic) and the uploads together; returns
    what `swap_database` returned and the previous folder's name. Refuses while another swap's journal
    is pending (the caller settles it first)."""
    refuse_if_pending(folder)
    previous = f"{PREVIOUS_PREFIX}{kept_database or run}"
    journal = Journal(run, database, staged.name, previous, "db", kept_database, scratch)
    journal.save(folder)
    try:
        result = swap_database()
    except BaseException:
        (folder / JOURNAL).unlink(missing_ok=True)  # the database is unchanged: so are the uploads
        raise
    crash_point("uploads:after-database-swap")
    finish(folder, journal)
    return result, previous


def refuse_if_pending(folder: Path) -> None:
    pending = read_journal(folder)
    if pending is not None:
        raise BackupError(f"an interrupted uploads swap (run {pending.run}) is pending in {folder}: run "
                          f"`tma-backup repair --database {pending.database}` first; nothing was swapped")


def swap_uploads_only(folder: Path, staged: Path, run: str, database: str) -> str:
    """The staged uploads in, the live ones aside, without a database swap (a crash is finished forward)."""
    refuse_if_pending(folder)
    previous = f"{PREVIOUS_PREFIX}uploads-{staged.name.removeprefix(STAGED_PREFIX)}"
    journal = Journal(run, database, staged.name, previous, "out")
    journal.save(folder)
    finish(folder, journal)
    return previous


def finish(folder: Path, journal: Journal) -> None:
    """Roll the uploads swap forward from wherever it stopped: live entries out, staged entries in."""
    staged, previous = folder / journal.staged, folder / journal.previous
    if journal.phase in ("db", "out"):
        journal.phase = "out"
        journal.save(folder)
        previous.mkdir(mode=0o700, exist_ok=True)
        names = live_entries(folder)
        for number, name in enumerate(names):
            os.rename(folder / name, previous / name)
            if number == len(names) // 2:
                crash_point("uploads:half-moved-out")
        fsync_dir(folder)
        fsync_dir(previous)
        journal.phase = "in"
        journal.save(folder)
    if staged.exists():
        _move_all(staged, folder, sorted(os.listdir(staged)))
        staged.rmdir()
    (folder / JOURNAL).unlink(missing_ok=True)
    fsync_dir(folder)


def settle(folder: Path, database_swapped: Callable[[Journal], bool]) -> str | None:
    """After a crash: finish the uploads swap when its database swap committed, else drop the staging
    folder and leave the uploads as they were. Returns what was done, or None when nothing was pending."""
    journal = read_journal(folder)
    if journal is None:
        return None
    if journal.phase != "db" or database_swapped(journal):
        finish(folder, journal)
        return f"finished the uploads swap of run {journal.run} (its database swap had committed)"
    if journal.staged.startswith(STAGED_PREFIX):  # a rollback's source is a kept folder: never removed
        shutil.rmtree(folder / journal.staged, ignore_errors=True)
    (folder / JOURNAL).unlink(missing_ok=True)
    return f"left the uploads as they were for run {journal.run} (its database swap never happened)"


def drop_staged(folder: Path, staged: Path) -> None:
    if staged.name.startswith(STAGED_PREFIX) and staged.parent == folder:
        shutil.rmtree(staged, ignore_errors=True)


def previous_folders(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(PREVIOUS_PREFIX))
