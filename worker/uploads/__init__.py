"""TMA Cloud's uploads and configuration in the set (`BACKUP_REPOSITORY` with `UPLOAD_DIR`, or TMA's S3
settings with STORAGE_DRIVER=s3).

`references` reads what the database references, inside the dump's own snapshot; `capture` stores the
uploads folder in the repository as the set's uploads part (restic: incremental, content-addressed,
not compressed); `crosscheck` compares the two; `envfile` and the key fingerprint describe the
configuration that goes with them.
"""
