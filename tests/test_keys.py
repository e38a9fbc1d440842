"""Node keys: generation, files and permissions, fingerprints, loading, the CLI, TLS contexts."""

from __future__ import annotations

import datetime
import os
import re
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from replicator import cli, keys, tlsctx
from replicator.errors import AuthenticationError, ConfigError

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _write(tmp_path: Path, name: str) -> keys.NodeIdentity:
    generated = keys.generate_identity(name, NOW)
    keys.write_identity(generated, tmp_path / f"{name}.key", tmp_path / f"{name}.crt")
    return keys.load_identity(tmp_path / f"{name}.key", tmp_path / f"{name}.crt")


def test_generated_certificate_is_self_signed_p256_for_both_tls_roles() -> None:
    generated = keys.generate_identity("fw-a", NOW, days=30)
    cert = x509.load_pem_x509_certificate(generated.cert_pem)
    assert cert.issuer == cert.subject
    assert "fw-a" in cert.subject.rfc4514_string()
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert cert.not_valid_before_utc < NOW
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=30)


def test_fingerprint_is_the_sha256_of_the_der_certificate() -> None:
    generated = keys.generate_identity("fw-a", NOW)
    cert = x509.load_pem_x509_certificate(generated.cert_pem)
    expected = "sha256:" + cert.fingerprint(hashes.SHA256()).hex()
    assert keys.fingerprint(generated.cert_pem) == expected == generated.fingerprint


def test_two_generated_identities_differ() -> None:
    a = keys.generate_identity("fw", NOW)
    b = keys.generate_identity("fw", NOW)
    assert a.fingerprint != b.fingerprint
    assert a.key_pem != b.key_pem


@pytest.mark.parametrize(
    ("name", "days", "now", "message"),
    [
        ("", 1, NOW, "node name"),
        ("a/b", 1, NOW, "node name"),
        ("fw", 0, NOW, "at least 1 day"),
        ("fw", 1, NOW.replace(tzinfo=None), "timezone-aware"),
    ],
)
def test_generation_refuses_bad_parameters(
    name: str, days: int, now: datetime.datetime, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        keys.generate_identity(name, now, days)


def test_key_is_written_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        identity = _write(tmp_path, "fw-a")
    finally:
        os.umask(old)
    assert (identity.key_path.stat().st_mode & 0o777) == 0o600
    assert (identity.cert_path.stat().st_mode & 0o777) == 0o644


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    identity = _write(tmp_path, "fw-a")
    before = identity.key_path.read_bytes()
    again = keys.generate_identity("fw-a", NOW)
    with pytest.raises(ConfigError, match="already exists"):
        keys.write_identity(again, identity.key_path, tmp_path / "new.crt")
    with pytest.raises(ConfigError, match="already exists"):
        keys.write_identity(again, tmp_path / "new.key", identity.cert_path)
    assert identity.key_path.read_bytes() == before
    assert not (tmp_path / "new.key").exists()


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644])
def test_key_accessible_by_group_or_others_is_refused_naming_the_file(
    tmp_path: Path, mode: int
) -> None:
    identity = _write(tmp_path, "fw-a")
    identity.key_path.chmod(mode)
    with pytest.raises(ConfigError, match=re.escape(f"key file {identity.key_path} is accessible")):
        keys.check_key_file_permissions(identity.key_path)
    with pytest.raises(ConfigError, match=re.escape(str(identity.key_path))):
        keys.load_identity(identity.key_path, identity.cert_path)


def test_owner_only_key_is_accepted(tmp_path: Path) -> None:
    identity = _write(tmp_path, "fw-a")
    for mode in (0o600, 0o400):
        identity.key_path.chmod(mode)
        keys.check_key_file_permissions(identity.key_path)


def test_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    # Needs root to chown, as every test run of this project has.
    identity = _write(tmp_path, "fw-a")
    os.chown(identity.key_path, 54321, 54321)
    with pytest.raises(ConfigError, match=re.escape(f"{identity.key_path} is owned by uid 54321")):
        keys.check_key_file_permissions(identity.key_path)


def test_missing_or_non_regular_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.key"):
        keys.check_key_file_permissions(tmp_path / "nope.key")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        keys.check_key_file_permissions(tmp_path / "dir")


def test_load_identity_checks_the_key_matches_the_certificate(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    b = _write(tmp_path, "fw-b")
    assert a.fingerprint == keys.fingerprint(a.cert_path.read_bytes())
    with pytest.raises(ConfigError, match="does not match certificate"):
        keys.load_identity(a.key_path, b.cert_path)


def test_load_identity_refuses_garbage_files(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    junk = tmp_path / "junk"
    junk.write_bytes(b"not pem")
    junk.chmod(0o600)
    with pytest.raises(ConfigError, match="unencrypted PEM key"):
        keys.load_identity(junk, a.cert_path)
    with pytest.raises(ConfigError, match=re.escape(f"no valid PEM certificate in {junk}")):
        keys.load_identity(a.key_path, junk)


def test_fingerprint_needs_exactly_one_certificate() -> None:
    one = keys.generate_identity("fw", NOW).cert_pem
    with pytest.raises(ConfigError, match="no valid PEM certificate"):
        keys.fingerprint(b"garbage")
    with pytest.raises(ConfigError, match="found 2"):
        keys.fingerprint(one + one)


@pytest.mark.parametrize(
    "text",
    [
        "sha256:" + "ab" * 32,
        "SHA256:" + "AB" * 32,
        "sha256:" + ":".join(["AB"] * 32),
        "  sha256:" + "ab" * 32 + "\n",
    ],
)
def test_fingerprints_are_normalized(text: str) -> None:
    assert keys.normalize_fingerprint(text) == "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "text", ["ab" * 32, "sha256:" + "ab" * 31, "sha256:" + "zz" * 32, "md5:00"]
)
def test_malformed_fingerprints_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="fingerprint"):
        keys.normalize_fingerprint(text)


def test_peer_certificates_are_checked_against_pinned_fingerprints(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    b = _write(tmp_path, "fw-b")
    loaded = keys.load_peer_certificates([a.cert_path, b.cert_path])
    assert [p.fingerprint for p in loaded] == [a.fingerprint, b.fingerprint]
    pinned = keys.load_peer_certificates([a.cert_path], frozenset({a.fingerprint}))
    assert pinned[0].cert_pem == a.cert_pem
    unpinned = re.escape(f"peer certificate {b.cert_path} has fingerprint")
    with pytest.raises(ConfigError, match=unpinned):
        keys.load_peer_certificates([a.cert_path, b.cert_path], frozenset({a.fingerprint}))
    with pytest.raises(ConfigError, match="at least one"):
        keys.load_peer_certificates([])
    with pytest.raises(ConfigError, match=r"missing\.crt"):
        keys.load_peer_certificates([tmp_path / "missing.crt"])


def test_only_the_certificate_of_a_peer_file_reaches_the_trust_store(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    noisy = tmp_path / "noisy.crt"
    noisy.write_bytes(b"subject: whatever\n" + a.cert_pem + b"trailing text\n")
    (loaded,) = keys.load_peer_certificates([noisy])
    assert loaded.cert_pem == a.cert_pem
    assert loaded.fingerprint == a.fingerprint


def test_cli_keygen_prints_the_fingerprint_and_fingerprint_reads_it_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, cert = tmp_path / "n.key", tmp_path / "n.crt"
    assert cli.main(["keygen", "--key", str(key), "--cert", str(cert), "--name", "fw-a",
                     "--days", "10"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == keys.fingerprint(cert.read_bytes())
    assert (key.stat().st_mode & 0o777) == 0o600
    assert cli.main(["fingerprint", str(cert)]) == 0
    assert capsys.readouterr().out.strip() == printed
    assert cli.main(["keygen", "--key", str(key), "--cert", str(tmp_path / "x.crt")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_tls_contexts_are_tls13_only_and_require_certificates(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    b = _write(tmp_path, "fw-b")
    creds = tlsctx.credentials(a, keys.load_peer_certificates([b.cert_path]))
    assert creds.accepted == frozenset({b.fingerprint})
    assert creds.own == a.fingerprint
    for ctx in (creds.server, creds.client):
        assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname is False
        assert ctx.options & ssl.OP_NO_TICKET
        # Only the pinned peer certificate is trusted: no system CAs.
        assert ctx.cert_store_stats()["x509"] == 1
    assert creds.server.num_tickets == 0


def test_credentials_refuse_this_nodes_own_certificate_as_the_peer(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    with pytest.raises(ConfigError, match="this node's own certificate"):
        tlsctx.credentials(a, keys.load_peer_certificates([a.cert_path]))
    with pytest.raises(ConfigError, match="no peer certificate"):
        tlsctx.credentials(a, ())


def test_check_peer_accepts_only_pinned_certificates() -> None:
    generated = keys.generate_identity("fw-b", NOW)
    der = x509.load_pem_x509_certificate(generated.cert_pem).public_bytes(Encoding.DER)
    assert tlsctx.check_peer(der, frozenset({generated.fingerprint})) == generated.fingerprint
    with pytest.raises(AuthenticationError, match="is not pinned"):
        tlsctx.check_peer(der, frozenset({"sha256:" + "00" * 32}))
    with pytest.raises(AuthenticationError, match="no certificate"):
        tlsctx.check_peer(None, frozenset({generated.fingerprint}))


def test_load_credentials_from_the_tls_configuration_files(tmp_path: Path) -> None:
    a = _write(tmp_path, "fw-a")
    b = _write(tmp_path, "fw-b")
    b2 = _write(tmp_path, "fw-b2")
    creds = tlsctx.load_credentials(a.key_path, a.cert_path, [b.cert_path, b2.cert_path])
    assert creds.accepted == {b.fingerprint, b2.fingerprint}
    assert creds.own == a.fingerprint
    pinned = tlsctx.load_credentials(
        a.key_path, a.cert_path, [b.cert_path], [b.fingerprint, b2.fingerprint]
    )
    assert pinned.accepted == {b.fingerprint}
    with pytest.raises(ConfigError, match="is not pinned"):
        tlsctx.load_credentials(a.key_path, a.cert_path, [b2.cert_path], [b.fingerprint])
    a.key_path.chmod(0o640)
    with pytest.raises(ConfigError, match=re.escape(str(a.key_path))):
        tlsctx.load_credentials(a.key_path, a.cert_path, [b.cert_path])
