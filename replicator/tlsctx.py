"""TLS contexts for the peer link, and what a handshake failure means.

Design (the "why" behind every line here):

* **Mutual TLS 1.3 only.** Both contexts pin the protocol to TLS 1.3 (no downgrade
  surface, forward secrecy from ephemeral ECDHE in every handshake, AEAD records whose
  nonces derive from per-connection keys and a 64-bit record counter: a replayed,
  reordered or altered record fails authentication). Both sides require a certificate
  (``CERT_REQUIRED``): the listener refuses a dialer without one.
* **Self-signed certificates as the only trust anchors.** Stdlib :mod:`ssl` has no
  custom verification callback, so the peer's own certificate (public material copied
  to this node) is loaded as the *only* CA of the context: OpenSSL then accepts exactly
  that certificate (it is self-signed, not a CA, so it cannot vouch for any other one).
  The system CA store is never loaded.
* **Fingerprint pinning after the handshake.** :func:`check_peer` compares the SHA-256
  of the certificate the peer actually presented with the accepted set. This is defence
  in depth: even if a real CA certificate were ever put in the trust list by mistake,
  only the pinned leaf certificates pass.
* **A list of accepted peer certificates.** During a key rotation the peer may present
  the old or the new certificate; both are trusted and pinned until the old one is
  removed (procedure in docs/security.md).
* **No hostname check.** Identity is the pinned certificate, not a DNS name, so
  ``check_hostname`` is off; nothing is weakened because the trust store holds nothing
  but the pinned certificates.
* **No session resumption.** Session tickets are disabled (``num_tickets = 0``,
  ``OP_NO_TICKET``): every connection is a full handshake in which both certificates
  are presented and checked again. There is no 0-RTT data (stdlib ssl never sends it).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import AuthenticationError, ConfigError
from .keys import (
    NodeIdentity,
    PeerCertificate,
    fingerprint_der,
    load_identity,
    load_peer_certificates,
)


def _base_context(
    protocol: ssl._SSLMethod, identity: NodeIdentity, peers: Sequence[PeerCertificate]
) -> ssl.SSLContext:
    if not peers:
        raise ConfigError("no peer certificate to trust (tls.peer_certs is empty)")
    ctx = ssl.SSLContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_cert_chain(certfile=identity.cert_path, keyfile=identity.key_path)
    ctx.load_verify_locations(cadata="".join(p.cert_pem.decode("ascii") for p in peers))
    return ctx


def server_context(identity: NodeIdentity, peers: Sequence[PeerCertificate]) -> ssl.SSLContext:
    """The listener's context: TLS 1.3, our certificate, a client certificate required."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, identity, peers)
    ctx.num_tickets = 0
    return ctx


def client_context(identity: NodeIdentity, peers: Sequence[PeerCertificate]) -> ssl.SSLContext:
    """The dialer's context: TLS 1.3, our certificate offered, the server's verified."""
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, identity, peers)


@dataclass(frozen=True, slots=True)
class Credentials:
    """Everything the peer link needs to authenticate: both contexts and the pins."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    #: Fingerprints the peer may present (several during a key rotation overlap).
    accepted: frozenset[str]
    #: This node's own fingerprint (for logs and status).
    own: str


def credentials(identity: NodeIdentity, peers: Sequence[PeerCertificate]) -> Credentials:
    """Build both contexts trusting ``peers`` and pinning exactly their fingerprints.

    Refuses (ConfigError) a peer certificate that is this node's own: two nodes sharing
    one key could not tell each other apart, nor a connection reflected back to them.
    """
    for peer in peers:
        if peer.fingerprint == identity.fingerprint:
            raise ConfigError(
                f"peer certificate {peer.path} is this node's own certificate; "
                "each node needs its own key (replicator keygen)"
            )
    return Credentials(
        server=server_context(identity, peers),
        client=client_context(identity, peers),
        accepted=frozenset(p.fingerprint for p in peers),
        own=identity.fingerprint,
    )


def load_credentials(
    key: Path, cert: Path, peer_certs: Sequence[Path], peer_fingerprints: Sequence[str] = ()
) -> Credentials:
    """Credentials from the files of the ``[tls]`` configuration (start-up and SIGHUP).

    Checks the key file's permissions and that key and certificate match
    (:func:`~replicator.keys.load_identity`); every peer certificate must match one of
    ``peer_fingerprints`` when that is not empty. Raises ConfigError naming the file.
    """
    return peer_credentials(load_identity(key, cert), peer_certs, peer_fingerprints)


def peer_credentials(
    identity: NodeIdentity, peer_certs: Sequence[Path], peer_fingerprints: Sequence[str] = ()
) -> Credentials:
    """Credentials for a loaded ``identity`` and the peer certificates in these files.

    What SIGHUP uses: the peers' certificates and pins are live configuration, this
    node's own key and certificate are not (a new identity needs a restart), so a
    reload keeps the identity the daemon started with.
    """
    pinned = frozenset(peer_fingerprints) if peer_fingerprints else None
    return credentials(identity, load_peer_certificates(list(peer_certs), pinned))


def check_peer(cert_der: bytes | None, accepted: frozenset[str]) -> str:
    """The peer's fingerprint if its presented certificate is pinned, else AuthenticationError.

    ``cert_der`` is ``SSLObject.getpeercert(binary_form=True)`` after the handshake.
    """
    if cert_der is None:
        raise AuthenticationError("the peer presented no certificate")
    fp = fingerprint_der(cert_der)
    if fp not in accepted:
        raise AuthenticationError(f"the peer's certificate {fp} is not pinned")
    return fp
