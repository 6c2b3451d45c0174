"""Where the PostgreSQL client tools run: on this host, or inside the database's container.

The pipeline only ever talks to an `Executor`; `choose_executor` picks one from the settings.
"""

from __future__ import annotations

from worker.pg.executors.base import Executor, ToolProcess, ToolResult
from worker.pg.executors.choose import choose_executor

__all__ = ["Executor", "ToolProcess", "ToolResult", "choose_executor"]
