"""Restore confirmation tokens: random, single-use, expiring, bound to (database, file, sha256).

Only the token's SHA-256 is ever stored (in Redis, under `tma_backup:restore-token:<hash>`, with
RESTORE_TOKEN_TTL); the plain token is shown to the operator once and travels once, masked, in the
restore task's message. Consuming is one atomic GETDEL: a token works once.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass
from typing import Protocol

import redis
from redis.exceptions import RedisError

from worker.errors import BackupError

KEY_PREFIX = "tma_backup:restore-token"
TOKEN_BYTES = 24  # 192 bits


class TokenRefused(BackupError):
    """No such token: never issued, expired, or already used."""


@dataclass(frozen=True)
class TokenBinding:
    """What a token allows: `action` (restore or rollback) of `database`, from `file` (a backup; for a
    rollback, the kept copy to bring back) whose SHA-256 is `sha256` (empty for a rollback), on `host`."""

    database: str
    file: str
    sha256: str
    host: str
    action: str = "restore"


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore(Protocol):
    def put(self, hashed: str, binding: TokenBinding, ttl: int) -> None: ...

    def peek(self, hashed: str) -> TokenBinding | None: ...

    def take(self, hashed: str) -> TokenBinding | None: ...


class RedisTokenStore:
    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def _key(self, hashed: str) -> str:
        return f"{KEY_PREFIX}:{hashed}"

    def put(self, hashed: str, binding: TokenBinding, ttl: int) -> None:
        try:
            self._client.set(self._key(hashed), json.dumps(asdict(binding)), ex=ttl, nx=True)
        except RedisError as error:
            raise BackupError(f"cannot store the restore token in Redis: {error}") from None

    def peek(self, hashed: str) -> TokenBinding | None:
        return self._decode(self._call(self._client.get, hashed))

    def take(self, hashed: str) -> TokenBinding | None:
        return self._decode(self._call(self._client.getdel, hashed))

    def _call(self, method: object, hashed: str) -> bytes | None:
        try:
            return method(self._key(hashed))  # type: ignore[operator,no-any-return]
        except RedisError as error:
            raise BackupError(f"cannot reach Redis for the restore token: {error}") from None

    @staticmethod
    def _decode(raw: bytes | None) -> TokenBinding | None:
        return TokenBinding(**json.loads(raw)) if raw else None


class LocalTokenStore:
    """For in-process runs without a broker: the token lives only as long as this process."""

    def __init__(self) -> None:
        self._bindings: dict[str, TokenBinding] = {}

    def put(self, hashed: str, binding: TokenBinding, ttl: int) -> None:
        self._bindings[hashed] = binding

    def peek(self, hashed: str) -> TokenBinding | None:
        return self._bindings.get(hashed)

    def take(self, hashed: str) -> TokenBinding | None:
        return self._bindings.pop(hashed, None)


def consume(store: TokenStore, token: str, confirm: str, action: str = "restore") -> TokenBinding:
    """Use up the token (atomically), then check that it was issued for `action` and the typed database
    name against its binding. Whatever is refused, the token is used up."""
    binding = store.take(token_hash(token)) if token else None
    if binding is None:
        raise TokenRefused(f"{action} refused: the token is unknown, expired or already used; prepare the {action} again")
    if binding.action != action:
        raise TokenRefused(f"{action} refused: the token was issued for a {binding.action}, not a {action}")
    if confirm != binding.database:
        raise TokenRefused(
            f"{action} refused: the confirmation {confirm!r} does not match the database {binding.database!r}; "
            f"the token is used up, prepare the {action} again"
        )
    return binding
