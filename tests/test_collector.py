"""The collector is off while a process imports its modules and always back on after: a worker, beat
or CLI left without it would grow without bound on reference cycles."""

from __future__ import annotations

import gc
import subprocess
import sys

import pytest

from tests.services import REPO
from worker import collector


def test_loading_the_task_modules_freezes_them_and_leaves_the_collector_on() -> None:
    probe = ("import gc; from worker import app; app.loader.import_default_modules(); "
             "import tasks.backup; print(gc.isenabled(), gc.get_freeze_count())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    enabled, frozen = out.stdout.split()
    assert enabled == "True"
    assert int(frozen) > 50_000, "the imported modules' objects are not frozen"


def test_an_import_that_fails_leaves_the_collector_as_it_was() -> None:
    assert gc.isenabled()
    with pytest.raises(ImportError):
        with collector.importing():
            assert not gc.isenabled()
            import worker.no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert gc.isenabled()
    gc.disable()
    try:
        with collector.importing():
            pass
        assert not gc.isenabled(), "a collector that was off was turned on"
    finally:
        gc.enable()
