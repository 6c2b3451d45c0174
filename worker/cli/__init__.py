"""The `tma-backup` command (`worker.cli.main:main`): one module per command group; the helpers they
share in `common`, the seed's output style in `output`, the broker side (dispatch, follow) in `follow`."""
