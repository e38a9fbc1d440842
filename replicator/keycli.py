"""``replicator keygen`` and ``replicator fingerprint``: node keys for the peer link.

``keygen`` writes a new EC P-256 key (mode 0600, never overwriting a file) and its
self-signed certificate, and prints the certificate's fingerprint: the value to pin on
the other node (``tls.peer_fingerprints``) after copying the certificate there
(``tls.peer_certs``). ``fingerprint`` prints the fingerprint of an existing certificate,
to compare with what the other node's operator reads out.
"""

from __future__ import annotations

import argparse
import datetime
import socket
from pathlib import Path
from typing import Any

from . import keys


def register(subparsers: Any) -> None:
    """Add ``keygen`` and ``fingerprint`` to the ``replicator`` parser."""
    keygen = subparsers.add_parser(
        "keygen",
        help="create this node's key and self-signed certificate",
        description="Create an EC P-256 key (mode 0600) and a self-signed certificate; "
        "print the certificate's fingerprint. Existing files are never overwritten.",
    )
    keygen.add_argument("--key", type=Path, required=True, metavar="PATH",
                        help="private key file to create")
    keygen.add_argument("--cert", type=Path, required=True, metavar="PATH",
                        help="certificate file to create")
    keygen.add_argument("--name", default=None, metavar="NODE",
                        help="node name in the certificate (default: the short host name)")
    keygen.add_argument("--days", type=int, default=keys.DEFAULT_VALIDITY_DAYS, metavar="N",
                        help=f"validity in days (default {keys.DEFAULT_VALIDITY_DAYS})")
    keygen.set_defaults(handler=_handle_keygen)

    fingerprint = subparsers.add_parser(
        "fingerprint",
        help="print a certificate's fingerprint",
        description="Print the SHA-256 fingerprint of a PEM certificate (the peer pin).",
    )
    fingerprint.add_argument("cert", type=Path, metavar="CERT", help="PEM certificate file")
    fingerprint.set_defaults(handler=_handle_fingerprint)


def _handle_keygen(args: argparse.Namespace) -> int:
    name = args.name if args.name is not None else socket.gethostname().split(".")[0]
    identity = keys.generate_identity(name, datetime.datetime.now(datetime.UTC), args.days)
    keys.write_identity(identity, args.key, args.cert)
    print(identity.fingerprint)
    return 0


def _handle_fingerprint(args: argparse.Namespace) -> int:
    print(keys.load_peer_certificates([args.cert])[0].fingerprint)
    return 0
