"""The commands of `tma-backup`, one module per command or group; `worker.cli.main` registers them."""
