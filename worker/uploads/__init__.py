"""TMA Cloud's uploads and configuration in the set (`BACKUP_REPOSITORY` with `UPLOAD_DIR`, or TMA's S3
settings with STORAGE_DRIVER=s3).

`config` says whether a run captures uploads and which configuration file goes with them; `references`
reads what the database references, inside the dump's own snapshot; `capture` stores the uploads folder
in the repository as the set's uploads part (restic: incremental, content-addressed, not compressed);
`crosscheck` compares the two (and fingerprints FILE_ENCRYPTION_KEY); `s3_settings`, `s3_errors` and
`s3_mirror` make TMA Cloud's bucket (STORAGE_DRIVER=s3) a local mirror to capture; `restore` and `swap`
bring a set's uploads back beside the live ones and swap them together with the database.
"""
