"""The `tma-backup` command (`worker.cli.main:main`): the commands in `commands` (one module per command
or group); the helpers they share in `common`, the seed's output style in `output`, the broker side
(dispatch, follow, asking every host) in `follow` and `hosts`."""
