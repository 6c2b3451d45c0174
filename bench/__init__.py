"""Benchmarks of tma-backup against the bare PostgreSQL tools (see bench/README.md)."""
