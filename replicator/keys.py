"""Node keys and self-signed certificates: generation, fingerprints, safe loading.

Each node has one private key (EC P-256) and a self-signed certificate for it. The
certificate is public: it is copied to the peer, which trusts exactly that certificate
and additionally pins its SHA-256 fingerprint (see :mod:`replicator.tlsctx`). There is
no certificate authority: a compromised CA cannot impersonate a node, and nothing but
the two certificate files is needed to set a pair up.

P-256 rather than Ed25519 because every TLS 1.3 stack (and FIPS builds of OpenSSL)
supports ``ecdsa_secp256r1_sha256``; both would be fine cryptographically.

The private key file must be readable by its owner only: :func:`check_key_file_permissions`
refuses a key that group or others can read or write, or that belongs to another user,
so a daemon never starts on a key that may have leaked.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import ConfigError

#: Prefix of every fingerprint string; the hash is the SHA-256 of the DER certificate.
FINGERPRINT_PREFIX = "sha256:"

#: Default certificate lifetime. Long on purpose: an expired certificate stops the
#: sync link, and rotation is an explicit operator procedure (docs/security.md).
DEFAULT_VALIDITY_DAYS = 3650

#: Start of validity is backdated so a peer whose clock is a little behind still
#: accepts a freshly generated certificate.
_BACKDATE = datetime.timedelta(hours=1)

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HEX_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class GeneratedIdentity:
    """A freshly generated key (PKCS#8 PEM, unencrypted) and its self-signed certificate."""

    key_pem: bytes
    cert_pem: bytes
    fingerprint: str


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """This node's key and certificate as found on disk, checked and ready for TLS."""

    key_path: Path
    cert_path: Path
    cert_pem: bytes
    fingerprint: str


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """One certificate the peer may present (several overlap during a key rotation)."""

    path: Path
    cert_pem: bytes
    fingerprint: str


def generate_identity(
    name: str, now: datetime.datetime, days: int = DEFAULT_VALIDITY_DAYS
) -> GeneratedIdentity:
    """Generate an EC P-256 key and a self-signed certificate for node ``name``.

    ``now`` (timezone-aware) starts the validity period, which lasts ``days`` days.
    The certificate allows both TLS roles (serverAuth and clientAuth) because either
    node may dial or listen.
    """
    if not _NODE_NAME.match(name):
        raise ConfigError(
            f"node name {name!r} must be 1-63 characters of letters, digits, '.', '_' or '-'"
        )
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got {days}")
    if now.tzinfo is None:
        raise ConfigError("certificate start time must be timezone-aware")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"replicator {name}")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # Not a CA: even if an operator's trust list were ever mixed with a real CA,
        # this certificate cannot vouch for another one.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return GeneratedIdentity(key_pem=key_pem, cert_pem=cert_pem, fingerprint=fingerprint(cert_pem))


def write_identity(identity: GeneratedIdentity, key_path: Path, cert_path: Path) -> None:
    """Write a generated identity; the key with mode 0600. Never overwrites a file.

    The key file is created with ``O_EXCL`` and mode 0600 in one step, so it is never
    readable by anyone else, not even for an instant. Refusing to overwrite keeps a
    typo from destroying the key a running pair depends on (rotation writes new files).
    """
    for path in (key_path, cert_path):
        if path.exists():
            raise ConfigError(f"{path} already exists; refusing to overwrite it")
    _write_new(key_path, identity.key_pem, 0o600)
    try:
        _write_new(cert_path, identity.cert_pem, 0o644)
    except BaseException:
        key_path.unlink()
        raise


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    # The umask may have cleared bits of `mode` (never added any): make it exact.
    os.chmod(path, mode)


def fingerprint_der(cert_der: bytes) -> str:
    """The pin of a DER certificate: ``"sha256:"`` + lowercase hex SHA-256."""
    return FINGERPRINT_PREFIX + hashlib.sha256(cert_der).hexdigest()


def fingerprint(cert_pem: bytes) -> str:
    """The pin of a PEM certificate (the SHA-256 of its DER form), as ``"sha256:hex"``.

    Raises :class:`ConfigError` if ``cert_pem`` does not hold exactly one certificate.
    """
    return fingerprint_der(_parse_certificate(cert_pem).public_bytes(serialization.Encoding.DER))


def normalize_fingerprint(text: str) -> str:
    """Canonical form of a fingerprint an operator typed or pasted.

    Accepts ``sha256:`` followed by 64 hex digits, optionally separated by colons (the
    ``openssl x509 -fingerprint -sha256`` style), in either case. Raises ConfigError.
    """
    body = text.strip().lower()
    if not body.startswith(FINGERPRINT_PREFIX):
        raise ConfigError(f"fingerprint {text!r} must start with {FINGERPRINT_PREFIX!r}")
    digits = body.removeprefix(FINGERPRINT_PREFIX).replace(":", "")
    if not _HEX_FINGERPRINT.match(digits):
        raise ConfigError(f"fingerprint {text!r} must have 64 hexadecimal digits")
    return FINGERPRINT_PREFIX + digits


def check_key_file_permissions(path: Path) -> None:
    """Refuse a private key file others could read, replace, or that someone else owns.

    Raises :class:`ConfigError` naming the file when it is not a regular file, when any
    group or other permission bit is set (read leaks the key, write lets it be
    replaced), or when it is owned by neither the current user nor root.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"key file {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise ConfigError(
            f"key file {path} is accessible by group or others (mode {mode:04o}); "
            f"run: chmod 600 {path}"
        )
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"key file {path} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}) or root"
        )


def load_identity(key_path: Path, cert_path: Path) -> NodeIdentity:
    """Load and check this node's key and certificate.

    Checks the key file's permissions first, then that the key parses and is the
    private half of the certificate's public key, so a mismatched pair is reported at
    start-up rather than as an obscure TLS failure.
    """
    check_key_file_permissions(key_path)
    key_pem = _read(key_path, "key file")
    cert_pem = _read(cert_path, "certificate file")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"key file {key_path} does not hold an unencrypted PEM key") from exc
    cert = _parse_certificate(cert_pem, cert_path)
    if key.public_key() != cert.public_key():
        raise ConfigError(f"key file {key_path} does not match certificate {cert_path}")
    return NodeIdentity(
        key_path=key_path,
        cert_path=cert_path,
        cert_pem=cert_pem,
        fingerprint=fingerprint(cert_pem),
    )


def load_peer_certificates(
    paths: list[Path], pinned: frozenset[str] | None = None
) -> tuple[PeerCertificate, ...]:
    """Load the certificates the peer may present (one, or two during a rotation).

    ``pinned``, if given, is the set of fingerprints the operator verified out of band:
    every certificate file must then match one of them, so a certificate file swapped
    on disk is refused at start-up (ConfigError naming it).
    """
    if not paths:
        raise ConfigError("at least one peer certificate is required")
    loaded: list[PeerCertificate] = []
    for path in paths:
        # Re-encoded from the parsed certificate: whatever else the file holds (text,
        # other PEM blocks) never reaches OpenSSL's trust store.
        cert = _parse_certificate(_read(path, "peer certificate file"), path)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        fp = fingerprint_der(cert.public_bytes(serialization.Encoding.DER))
        if pinned is not None and fp not in pinned:
            raise ConfigError(
                f"peer certificate {path} has fingerprint {fp}, which is not pinned"
            )
        loaded.append(PeerCertificate(path=path, cert_pem=cert_pem, fingerprint=fp))
    return tuple(loaded)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from exc


def _parse_certificate(cert_pem: bytes, path: Path | None = None) -> x509.Certificate:
    where = f" in {path}" if path is not None else ""
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"no valid PEM certificate{where}") from exc
    if len(certs) != 1:
        raise ConfigError(f"expected exactly one certificate{where}, found {len(certs)}")
    return certs[0]
