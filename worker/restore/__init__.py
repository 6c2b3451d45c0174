"""Restore: prepare and confirmation tokens, scratch databases and the swap by rename, rollback,
and drills that never touch the live database."""
