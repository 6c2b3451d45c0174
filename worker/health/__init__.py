"""What the look-only commands report (`tma-backup status`, `list`, `verify`), as plain data that a task
can return and the CLI prints: the status facts of one host (`facts`), when a restore drill was due
(`drill_due`), the facts of several worker hosts merged into one answer (`combine`), and backups listed
and verified as data (`files`). Nothing here changes anything."""
