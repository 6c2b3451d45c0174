"""Signed task messages: Celery's `auth` serializer (`celery.security`), or plain JSON when unset.

With TASK_SIGNING_KEY, TASK_SIGNING_CERT and TASK_SIGNING_CERT_STORE set, every process that loads
`worker.celery_config` (workers, beat, Flower, the CLI) signs the task and control messages it sends with
the key, and accepts only messages signed by a certificate in the store: an unsigned message, or one signed
by anyone else, is logged and dropped by the worker before any task code runs. Results and events stay JSON
(Flower reads events as JSON; the CLI reads results as JSON).

Celery 5's `auth` serializer supports RSA keys only (`celery.security.key`, `celery.security.certificate`):
`tma-backup keys init` makes an RSA 3072 key and a self-signed certificate with `cryptography`.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.errors import BackupError
from worker.settings import Settings, SettingsError

KEY_BITS = 3072
KEY_FILE = "task-signing.key"
CERT_FILE = "task-signing.crt"
STORE_FOLDER = "cert-store"
EXPIRY_WARNING = datetime.timedelta(days=30)
DIGEST = "sha256"


def check(settings: Settings) -> list[str]:
    """Validate the three files as Celery will use them; returns warnings (a key other users can read, a
    certificate that expires soon). Raises SettingsError naming the variable when Celery could not sign
    or verify with them, or when this process's own certificate is not in the store (its own messages, a
    chain's next link or a worker's reply, would then be rejected)."""
    from celery.exceptions import SecurityError
    from celery.security.certificate import Certificate, FSCertStore
    from celery.security.key import PrivateKey
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key_path, cert_path, store_path = settings.TASK_SIGNING_KEY, settings.TASK_SIGNING_CERT, settings.TASK_SIGNING_CERT_STORE
    if key_path is None or cert_path is None or store_path is None:
        raise SettingsError("TASK_SIGNING_KEY, TASK_SIGNING_CERT and TASK_SIGNING_CERT_STORE must all be set")
    key_pem, cert_pem = _read(key_path, "TASK_SIGNING_KEY"), _read(cert_path, "TASK_SIGNING_CERT")

    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except Exception as error:  # ValueError (not PEM), TypeError (encrypted), UnsupportedAlgorithm
        raise SettingsError(f"TASK_SIGNING_KEY: {key_path} is not an unencrypted PEM private key ({error})") from None
    if not isinstance(private, rsa.RSAPrivateKey):
        raise SettingsError(f"TASK_SIGNING_KEY: {key_path} is not an RSA key; Celery's message signing supports "
                            "RSA only (`tma-backup keys init` makes one)")
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as error:
        raise SettingsError(f"TASK_SIGNING_CERT: {cert_path} is not a PEM certificate ({error})") from None
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or public.public_numbers() != private.public_key().public_numbers():
        raise SettingsError(f"TASK_SIGNING_CERT: {cert_path} is not the certificate of TASK_SIGNING_KEY {key_path}")
    now = datetime.datetime.now(datetime.UTC)
    expires = certificate.not_valid_after_utc
    if now >= expires:
        raise SettingsError(f"TASK_SIGNING_CERT: {cert_path} expired on {expires:%Y-%m-%d}: make a new key and "
                            "certificate (`tma-backup keys init`) and add the certificate to every cert store")
    try:
        PrivateKey(key_pem)
        own = Certificate(cert_pem.decode())
        store = FSCertStore(str(store_path))
    except (SecurityError, OSError, ValueError) as error:  # an invalid, expired or duplicate certificate
        raise SettingsError(f"TASK_SIGNING_CERT_STORE: {store_path}: {error}") from None
    try:
        stored = store[own.get_id()]
    except SecurityError:
        raise SettingsError(
            f"TASK_SIGNING_CERT_STORE: {store_path} does not hold TASK_SIGNING_CERT {cert_path}: this process's own "
            "messages (a chain's next link, a worker's replies) would be rejected; copy the certificate there"
        ) from None
    if stored.get_pubkey().public_numbers() != public.public_numbers():
        raise SettingsError(f"TASK_SIGNING_CERT_STORE: {store_path} holds another certificate under the issuer "
                            f"and serial number of TASK_SIGNING_CERT {cert_path}")

    warnings = []
    mode = key_path.stat().st_mode & 0o777
    if mode & 0o077:
        warnings.append(f"TASK_SIGNING_KEY {key_path} is mode {mode:04o}: whoever can read it can send any task; "
                        f"`chmod 600 {key_path}`")
    if expires - now < EXPIRY_WARNING:
        warnings.append(f"TASK_SIGNING_CERT {cert_path} expires on {expires:%Y-%m-%d}: after that every message "
                        "signed with it is rejected; make a new key (`tma-backup keys init`) and rotate (README)")
    return warnings


def _read(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise SettingsError(f"{variable}: {path} is not readable ({error.strerror})") from None


def celery_settings(settings: Settings) -> dict[str, Any]:
    """The Celery settings of signed task messages: tasks and control messages (`task_serializer` is also
    the broadcast mailbox's serializer) signed, and only signed ones accepted; results stay JSON, and the
    result backend accepts JSON (without `result_accept_content` it would inherit `accept_content`)."""
    return {
        "task_serializer": "auth",
        "accept_content": ["auth"],
        "result_serializer": "json",
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "security_key": str(settings.TASK_SIGNING_KEY),
        "security_certificate": str(settings.TASK_SIGNING_CERT),
        "security_cert_store": str(settings.TASK_SIGNING_CERT_STORE),
        "security_digest": DIGEST,
    }


def setup_security(sender: Any, **kwargs: Any) -> None:
    """`app.on_after_configure`: register the `auth` serializer in this process, from the app's own
    `security_*` settings (Celery's registry is process-wide; pool processes inherit it by fork). JSON
    stays decodable for results and events; every other serializer is disabled."""
    sender.setup_security(allowed_serializers=["json"], digest=sender.conf.security_digest)


@dataclass(frozen=True)
class KeyFiles:
    key: Path
    cert: Path
    store: Path
    stored_cert: Path
    expires: datetime.datetime

    def settings_lines(self) -> list[str]:
        return [f"TASK_SIGNING_KEY={self.key}", f"TASK_SIGNING_CERT={self.cert}",
                f"TASK_SIGNING_CERT_STORE={self.store}"]


def create_keys(directory: Path, days: int, name: str) -> KeyFiles:
    """An RSA key (mode 0600), its self-signed certificate valid for `days`, and a cert store folder holding
    that certificate, in `directory` (created 0700 when missing). Never overwrites: raises BackupError
    when any of the three exists."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    directory = directory.expanduser().absolute()
    key_path, cert_path, store = directory / KEY_FILE, directory / CERT_FILE, directory / STORE_FOLDER
    existing = [str(path) for path in (key_path, cert_path, store) if os.path.lexists(path)]
    if existing:
        one = len(existing) == 1
        raise BackupError(f"{', '.join(existing)} already {'exists' if one else 'exist'}: refusing to overwrite; "
                          f"move {'it' if one else 'them'} away or choose another --dir")

    private = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tma-backup task signing {name} {now:%Y-%m-%d}")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())  # Celery names a certificate by its issuer and serial
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(private, hashes.SHA256())
    )
    key_pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    cert_pem = certificate.public_bytes(serialization.Encoding.PEM)
    # Named by the certificate's fingerprint: certificates from several `keys init` never clash in one store.
    stored_cert = store / f"tma-backup-{certificate.fingerprint(hashes.SHA256()).hex()[:16]}.crt"

    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    created: list[Path] = []
    try:
        _write_new(key_path, key_pem, 0o600, created)
        _write_new(cert_path, cert_pem, 0o644, created)
        store.mkdir(mode=0o755)
        created.append(store)
        _write_new(stored_cert, cert_pem, 0o644, created)
    except OSError:
        for path in reversed(created):  # nothing half made: a later run must not find a key without its store
            path.rmdir() if path.is_dir() else path.unlink(missing_ok=True)
        raise
    return KeyFiles(key_path, cert_path, store, stored_cert, certificate.not_valid_after_utc)


def _write_new(path: Path, data: bytes, mode: int, created: list[Path]) -> None:
    """Create `path` with exactly `mode` (never through a symlink, never over an existing file)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    created.append(path)
    with os.fdopen(descriptor, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask only ever removes bits; this makes the mode exact
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
