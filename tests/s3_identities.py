"""A SeaweedFS `weed mini` with several S3 identities (`-s3.config`), each limited to the actions it is
given per bucket (`Read:bucket`, `List:bucket`, `Write:bucket`, `Tagging:bucket`), besides the server's
own admin identity (its `access_key`/`secret_key`, as in `tests/s3_server.py`). Buckets are made by the
admin: a limited identity may not create one."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from tests import s3_server


@dataclass(frozen=True)
class Identity:
    name: str
    actions: tuple[str, ...]
    access_key: str = field(default_factory=lambda: f"tma-{secrets.token_hex(6)}")
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    def settings(self, prefix: str = "BACKUP_REPOSITORY") -> dict[str, str]:
        """The keys as tma-backup's settings name them (`BACKUP_REPOSITORY_…` or `VAULT_REPOSITORY_…`)."""
        return {f"{prefix}_ACCESS_KEY_ID": self.access_key, f"{prefix}_SECRET_ACCESS_KEY": self.secret_key}

    def aws_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


@dataclass
class IdentityServer(s3_server.S3Server):
    identities: tuple[Identity, ...] = ()

    @property
    def config_path(self) -> Path:
        return self.directory / "s3-identities.json"

    def _argv(self) -> list[str]:
        admin = {"name": "admin", "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                 "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        others = [{"name": identity.name, "actions": list(identity.actions),
                   "credentials": [{"accessKey": identity.access_key, "secretKey": identity.secret_key}]}
                  for identity in self.identities]
        self.config_path.write_text(json.dumps({"identities": [admin, *others]}))
        self.config_path.chmod(0o600)
        return [*super()._argv(), f"-s3.config={self.config_path}"]


def start_with_identities(directory: Path, identities: list[Identity], buckets: list[str]) -> IdentityServer:
    """A fresh server in `directory` knowing `identities`, with `buckets` made."""
    directory.mkdir(parents=True, exist_ok=True)
    s3_server.weed_binary()
    taken: set[int] = set()
    ports = [s3_server.free_port_pair(taken) for _ in range(5)]
    server = IdentityServer(directory, *ports, identities=tuple(identities))
    server.start()
    client = server.client()
    for bucket in buckets:
        client.create_bucket(Bucket=bucket)
    return server
