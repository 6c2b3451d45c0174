"""Test harness only: give a just-initialised restic repository a key that is cheap to open.

restic derives each key with scrypt, calibrated at `init` to take about half a second of a core, and pays
that again every time any command opens the repository. The suite opens test repositories thousands of
times (about a third of its CPU time went to it), so, as restic's own test suite does with its
low-security KDF parameters, the test session puts a `restic` first on PATH (`install_shim`) that runs the
machine's restic unchanged and, after a successful `init`, re-wraps the same master key with
N=1024, r=8, p=1. The repository, its config, its master key and every byte the product writes are
restic's own; only the cost of unlocking the key changes. Anything this helper cannot do (another backend,
a password it cannot read, a second key) leaves the repository as restic made it: slower, never wrong.

Key file format (restic's design document): scrypt(password, salt, N, r, p) gives 64 bytes, the AES-256
key and the Poly1305-AES key (k, r); `data` is nonce ‖ AES-256-CTR(master key JSON) ‖ Poly1305-AES tag.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.algorithms import AES
from cryptography.hazmat.primitives.poly1305 import Poly1305

CHEAP = {"N": 1024, "r": 8, "p": 1}


def _derive(password: bytes, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes, bytes]:
    derived = hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=64, maxmem=(1 << 31) - 1)
    return derived[:32], derived[32:48], derived[48:64]  # AES key, Poly1305-AES k, Poly1305 r


def _tag(ciphertext: bytes, nonce: bytes, mac_k: bytes, mac_r: bytes) -> bytes:
    encryptor = Cipher(AES(mac_k), modes.ECB()).encryptor()  # Poly1305-AES: s = AES_k(nonce)
    s = encryptor.update(nonce) + encryptor.finalize()
    return Poly1305.generate_tag(mac_r + s, ciphertext)


def _ctr(key: bytes, nonce: bytes, data: bytes) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    return cipher.update(data) + cipher.finalize()


def rewrap(key_file: bytes, password: bytes) -> bytes:
    """The same key file's master key under the cheap parameters (raises ValueError on a wrong password)."""
    old = json.loads(key_file)
    if old.get("kdf") != "scrypt":
        raise ValueError("not an scrypt key")
    salt, sealed = base64.b64decode(old["salt"]), base64.b64decode(old["data"])
    aes_key, mac_k, mac_r = _derive(password, salt, old["N"], old["r"], old["p"])
    nonce, ciphertext, tag = sealed[:16], sealed[16:-16], sealed[-16:]
    if _tag(ciphertext, nonce, mac_k, mac_r) != tag:
        raise ValueError("wrong password")
    master = _ctr(aes_key, nonce, ciphertext)
    new_salt, new_nonce = os.urandom(64), os.urandom(16)
    aes_key, mac_k, mac_r = _derive(password, new_salt, CHEAP["N"], CHEAP["r"], CHEAP["p"])
    ciphertext = _ctr(aes_key, new_nonce, master)
    sealed = new_nonce + ciphertext + _tag(ciphertext, new_nonce, mac_k, mac_r)
    new = {**old, **CHEAP, "salt": base64.b64encode(new_salt).decode(), "data": base64.b64encode(sealed).decode()}
    return json.dumps(new).encode()


def _option(args: list[str], names: tuple[str, ...]) -> str | None:
    for index, arg in enumerate(args):
        for name in names:
            if arg == name and index + 1 < len(args):
                return args[index + 1]
            if name.startswith("--") and arg.startswith(name + "="):
                return arg[len(name) + 1:]
    return None


def _repository(args: list[str]) -> str | None:
    found = _option(args, ("-r", "--repo")) or os.environ.get("RESTIC_REPOSITORY")
    if found:
        return found
    path = _option(args, ("--repository-file",)) or os.environ.get("RESTIC_REPOSITORY_FILE")
    return Path(path).read_text().strip() if path else None


def _password(args: list[str]) -> bytes | None:
    path = _option(args, ("-p", "--password-file")) or os.environ.get("RESTIC_PASSWORD_FILE")
    if path:
        return Path(path).read_bytes().rstrip(b"\r\n")
    if "RESTIC_PASSWORD" in os.environ:
        return os.environ["RESTIC_PASSWORD"].encode()
    command = _option(args, ("--password-command",)) or os.environ.get("RESTIC_PASSWORD_COMMAND")
    if command:
        return subprocess.run(command, shell=True, check=True, capture_output=True).stdout.rstrip(b"\r\n")
    return None


class _Local:
    def __init__(self, path: str) -> None:
        self.keys = Path(path) / "keys"

    def names(self) -> list[str]:
        return sorted(entry.name for entry in self.keys.iterdir())

    def read(self, name: str) -> bytes:
        return (self.keys / name).read_bytes()

    def write(self, name: str, data: bytes, like: str) -> None:
        partial = self.keys / f".{name}.tmp"
        partial.write_bytes(data)
        partial.chmod(stat.S_IMODE((self.keys / like).stat().st_mode))  # the mode restic gave its own
        partial.rename(self.keys / name)

    def delete(self, name: str) -> None:
        (self.keys / name).unlink()


class _S3:
    def __init__(self, location: str) -> None:
        import boto3  # only for S3 repositories: keeps the shim's start-up short otherwise
        from botocore.config import Config

        parts = urlsplit(location)
        if parts.scheme not in ("http", "https"):
            raise ValueError("an S3 address without an explicit scheme")
        bucket, _, prefix = parts.path.lstrip("/").partition("/")
        self.bucket, self.prefix = bucket, (prefix.strip("/") + "/" if prefix.strip("/") else "") + "keys/"
        self.client: Any = boto3.client("s3", endpoint_url=f"{parts.scheme}://{parts.netloc}",
                                        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                                        config=Config(s3={"addressing_style": "path"}))

    def names(self) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix)
        return sorted(item["Key"][len(self.prefix):] for item in listed.get("Contents", []))

    def read(self, name: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=self.prefix + name)["Body"].read())

    def write(self, name: str, data: bytes, like: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)


def cheapen(args: list[str]) -> bool:
    """Re-wrap the key of the repository `restic <args>` (an `init`) just created; True if it did."""
    location, password = _repository(args), _password(args)
    if not location or password is None:
        return False
    if location.startswith("s3:"):
        backend: _Local | _S3 = _S3(location[3:])
    elif ":" not in location.split("/", 1)[0] or location.startswith("local:"):
        backend = _Local(location.removeprefix("local:"))
    else:
        return False  # rest:, sftp:, rclone: … stay as restic made them
    [name] = backend.names()  # a fresh repository holds exactly one key
    cheap = rewrap(backend.read(name), password)
    backend.write(hashlib.sha256(cheap).hexdigest(), cheap, like=name)  # restic names a key file by its hash
    backend.delete(name)
    return True


def install_shim(directory: Path, real_restic: str) -> Path:
    """Write `directory/restic`: the machine's restic, then `cheapen` after a successful `init`."""
    directory.mkdir(parents=True, exist_ok=True)
    shim = directory / "restic"
    shim.write_text(
        "#!/bin/sh\n"
        "# tma-backup's test session: restic, with cheap KDF parameters on repositories it initialises\n"
        "for arg; do [ \"$arg\" = init ] && break; done\n"
        f"[ \"$arg\" = init ] || exec '{real_restic}' \"$@\"\n"
        f"'{real_restic}' \"$@\" || exit $?\n"
        f"'{sys.executable}' '{Path(__file__).resolve()}' \"$@\" 2>/dev/null || true\n")
    shim.chmod(0o755)
    return shim


if __name__ == "__main__":
    cheapen(sys.argv[1:])
