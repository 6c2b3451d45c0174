"""Uploads restored beside the live ones and swapped together with the database, inside UPLOAD_DIR.

UPLOAD_DIR may be a mount point (compose's bind mount), which cannot itself be renamed, so everything
happens inside it, where every rename stays on one file system:

- `.tma-restore-<run>/`: the set's uploads, fetched before anything is swapped;
- `.tma-previous-<kept>/`: the files that were live, moved aside (never deleted), paired with the
  database copy the same swap kept (`<kept>` is that database's name), so a rollback brings both back;
- `.tma-uploads-swap.json`: the journal of a swap in progress: `{run, database, staged, previous, phase}`.

A swap is: journal (phase `db`) → the database swap → phase `out`: every live entry of TMA Cloud's into
the previous folder → phase `in`: every staged entry into UPLOAD_DIR → journal removed. After a crash,
`settle` finishes or undoes it from the journal, under the database's lock: before the database swap
committed (no kept copy of that run exists) the uploads are left as they were and the staging folder
removed; after it, the move is finished. Both old or both new, never a mix. Running the same journal
again changes nothing more, so a crash or an error at any point is settled by the next repair.

UPLOAD_DIR's entries are TMA Cloud's except the tool's own (`.tma-*`) and the file system's
`lost+found` (UPLOAD_DIR on a disk of its own): those are never captured (`capture_excludes`), never
moved out, never moved in. A live entry no rename can move (a mount point, a folder the worker's user
may not move) stays where it is and is named in the result; a staged entry of the same name is not
forced over it.

TMA Cloud's orphan cleanup reads UPLOAD_DIR's top level and unlinks what no row references; `unlink`
fails on a folder, so these folders are safe from it (TMA Cloud should still be stopped during a
restore: an upload written during the swap would land among whichever files are live at that moment).
"""

from __future__ import annotations

import errno
import glob
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
# Files set aside by a swap that kept no database copy (`--uploads-only`, a fresh server): trimmed to
# RESTORE_KEEP_PREVIOUS by age, where the others go with their database copy.
UNPAIRED_PREFIX = f"{PREVIOUS_PREFIX}uploads-"
NOT_TMAS = frozenset({"lost+found"})  # the file system's own folder at the root of a disk
ROOM_MARGIN = 64 * 1024 * 1024
# A live entry that fails to move with one of these stays where it is (a mount point: EBUSY; a folder the
# worker's user may not move: EACCES/EPERM); any other error stops the swap, which a repair then finishes.
CANNOT_MOVE = frozenset({errno.EBUSY, errno.EACCES, errno.EPERM})


@dataclass
class Journal:
    run: str
    database: str
    staged: str
    previous: str
    phase: str  # db | out | in
    kept: str | None = None  # the database copy this swap keeps (None: there was no live database)
    scratch: str | None = None  # the database swapped in, by its name before the swap
    sha256: str | None = None  # the backup being restored (a rerun of the same restore finds its work done)

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


def is_tmas(name: str) -> bool:
    """Whether a top-level entry of UPLOAD_DIR is TMA Cloud's (not the tool's own, not `lost+found`)."""
    return not name.startswith(OURS) and name not in NOT_TMAS


def live_entries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if is_tmas(name))


def capture_excludes(folder: Path) -> list[str]:
    """restic `--exclude` patterns that keep everything but TMA Cloud's entries out of a capture of
    `folder` (restic matches them against the absolute path it reads, the folder's real path)."""
    roots = dict.fromkeys([os.path.realpath(folder), str(folder.absolute())])
    names = [f"{OURS}*", *[glob.escape(name) for name in sorted(NOT_TMAS)]]
    return [f"{glob.escape(root)}/{name}" for root in roots for name in names]


def check_room(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed + ROOM_MARGIN:
        from worker.archive.meta import human_size

        raise BackupError(
            f"not enough free space in UPLOAD_DIR {folder} to restore the uploads beside the live ones: they need "
            f"{human_size(needed)}B (+{human_size(ROOM_MARGIN)}B margin), {human_size(free)}B are free; nothing was touched")


def staged_folder(folder: Path, run: str) -> Path:
    return folder / f"{STAGED_PREFIX}{_safe(run)}"


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


@dataclass
class Swapped:
    """What an uploads swap did: the folder the live files went to, and the live entries it could not move."""

    previous: str
    left: list[str]


def swap_uploads(folder: Path, staged: Path, run: str, database: str, kept_database: str | None,
                 swap_database: Callable[[], Any], scratch: str | None = None,
                 sha256: str | None = None) -> tuple[Any, Swapped]:
    """Swap the database (`swap_database()`, which must be atomic) and the uploads together; returns
    what `swap_database` returned and what the uploads swap did. Refuses while another swap's journal
    is pending (the caller settles it first)."""
    refuse_if_pending(folder)
    previous = f"{PREVIOUS_PREFIX}{kept_database}" if kept_database else f"{UNPAIRED_PREFIX}{_safe(run)}"
    journal = Journal(run, database, staged.name, previous, "db", kept_database, scratch, sha256)
    journal.save(folder)
    try:
        result = swap_database()
    except BaseException:
        (folder / JOURNAL).unlink(missing_ok=True)  # the database is unchanged: so are the uploads
        raise
    crash_point("uploads:after-database-swap")
    return result, Swapped(previous, finish(folder, journal))


def refuse_if_pending(folder: Path) -> None:
    pending = read_journal(folder)
    if pending is not None:
        raise BackupError(f"an interrupted uploads swap (run {pending.run}) is pending in {folder}: run "
                          f"`tma-backup repair --database {pending.database}` first; nothing was swapped")


def swap_uploads_only(folder: Path, staged: Path, run: str, database: str) -> Swapped:
    """The staged uploads in, the live ones aside, without a database swap (a crash is finished forward)."""
    refuse_if_pending(folder)
    previous = f"{UNPAIRED_PREFIX}{staged.name.removeprefix(STAGED_PREFIX)}"
    journal = Journal(run, database, staged.name, previous, "out")
    journal.save(folder)
    return Swapped(previous, finish(folder, journal))


def _safe(text: str) -> str:
    return "".join(char for char in text if char.isalnum() or char == "-")[:48]


def finish(folder: Path, journal: Journal) -> list[str]:
    """Roll the uploads swap forward from wherever it stopped: TMA's live entries out, the staged ones
    in. Returns the live entries that could not be moved (they stay; see the module's docstring)."""
    staged, previous = folder / journal.staged, folder / journal.previous
    left: list[str] = []
    if journal.phase in ("db", "out"):
        journal.phase = "out"
        journal.save(folder)
        previous.mkdir(mode=0o700, exist_ok=True)
        names = live_entries(folder)
        for number, name in enumerate(names):
            try:
                os.rename(folder / name, previous / name)
            except OSError as error:
                if error.errno not in CANNOT_MOVE:
                    raise
                left.append(name)
            if number == len(names) // 2:
                crash_point("uploads:half-moved-out")
        fsync_dir(folder)
        fsync_dir(previous)
        journal.phase = "in"
        journal.save(folder)
    if staged.exists():
        # Only TMA's entries, and never over a live one that stayed: an older set may hold the tool's own
        # folders, and a live entry that could not move out keeps its place. What is not moved in goes
        # with the staging folder.
        names = [name for name in sorted(os.listdir(staged)) if is_tmas(name)]
        kept_in_place = [name for name in names if os.path.lexists(folder / name)]
        left = sorted({*left, *kept_in_place})
        _move_all(staged, folder, [name for name in names if name not in kept_in_place])
        shutil.rmtree(staged)
    (folder / JOURNAL).unlink(missing_ok=True)
    fsync_dir(folder)
    return left


@dataclass
class Settled:
    """What `settle` did with an interrupted swap: finished it (`forward`) or undid it."""

    journal: Journal
    forward: bool

    @property
    def message(self) -> str:
        if self.forward:
            return f"finished the uploads swap of run {self.journal.run} (its database swap had committed)"
        return f"left the uploads as they were for run {self.journal.run} (its database swap never happened)"


def settle(folder: Path, database_swapped: Callable[[Journal], bool]) -> Settled | None:
    """After a crash: finish the uploads swap when its database swap committed, else drop the staging
    folder and leave the uploads as they were. Returns what was done, or None when nothing was pending."""
    journal = read_journal(folder)
    if journal is None:
        return None
    if journal.phase != "db" or database_swapped(journal):
        finish(folder, journal)
        return Settled(journal, True)
    if journal.staged.startswith(STAGED_PREFIX):  # a rollback's source is a kept folder: never removed
        shutil.rmtree(folder / journal.staged, ignore_errors=True)
    (folder / JOURNAL).unlink(missing_ok=True)
    return Settled(journal, False)


def drop_staged(folder: Path, staged: Path) -> None:
    if staged.name.startswith(STAGED_PREFIX) and staged.parent == folder:
        shutil.rmtree(staged, ignore_errors=True)


def previous_folders(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith(PREVIOUS_PREFIX))


def leftovers(folder: Path, kept_databases: set[str], keep: int) -> list[str]:
    """What the tool left in UPLOAD_DIR that nothing needs any more (nothing while a swap is pending):
    staging folders of restores that died before their swap, files set aside with a database copy that
    is gone (`kept_databases`: the copies that exist), and unpaired set-aside files beyond the newest
    `keep`. Sorted names."""
    if read_journal(folder) is not None:
        return []
    doomed: list[str] = []
    unpaired: list[tuple[float, str]] = []
    for name in os.listdir(folder):
        path = folder / name
        if not path.is_dir() or path.is_symlink():
            continue
        if name.startswith(STAGED_PREFIX):
            doomed.append(name)
        elif name.startswith(UNPAIRED_PREFIX):
            unpaired.append((path.stat().st_mtime, name))
        elif name.startswith(PREVIOUS_PREFIX) and name.removeprefix(PREVIOUS_PREFIX) not in kept_databases:
            doomed.append(name)
    unpaired.sort()
    doomed += [name for _, name in unpaired[: max(len(unpaired) - keep, 0)]]
    return sorted(doomed)


def tidy(folder: Path, kept_databases: set[str], keep: int) -> list[str]:
    """Remove `leftovers()` (call under the database's lock). Returns the names removed."""
    doomed = leftovers(folder, kept_databases, keep)
    for name in doomed:
        shutil.rmtree(folder / name)
    if doomed:
        fsync_dir(folder)
    return doomed
