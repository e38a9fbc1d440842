"""Prometheus metrics: one registry per daemon, served over HTTP or rendered as text.

Names follow Prometheus conventions (base units, ``_total`` counters). The daemon owns
one :class:`Metrics` and updates it as things happen; labels are small closed sets
(cache names, directions, errno names, failure reasons), never per-entry values.

Serving uses prometheus_client's own HTTP server, which runs in a daemon thread: a
scrape only reads the registry, so the trio loop is never blocked by it.
"""

from __future__ import annotations

import threading
from typing import NamedTuple
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from .config import Endpoint
from .role import Role

#: Commit durations: from a handful of entries (ms) to 250 k+ entries (seconds).
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric replicator exports, registered in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.entries = Gauge(
            "replicator_entries",
            "Entries per cache: internal (this node), external (the peer's), kernel.",
            ["cache"],
            registry=r,
        )
        self.peer_up = Gauge(
            "replicator_peer_up", "1 while the authenticated sync link is up.", registry=r
        )
        self.in_sync = Gauge(
            "replicator_in_sync",
            "1 while this node could take over without losing state (replicator check).",
            registry=r,
        )
        self.replication_lag = Gauge(
            "replicator_replication_lag_seconds",
            "Age of the oldest change not yet acknowledged by the peer.",
            registry=r,
        )
        self.messages = Counter(
            "replicator_messages",
            "Sync messages by direction (sent, received).",
            ["direction"],
            registry=r,
        )
        self.bytes = Counter(
            "replicator_bytes",
            "Sync payload bytes by direction (sent, received).",
            ["direction"],
            registry=r,
        )
        self.resyncs = Counter(
            "replicator_resyncs",
            "Resyncs by kind (kernel: re-dump of the own table, after loss or every "
            "kernel.refresh_interval; peer: full table from the peer; "
            "digest: anti-entropy repair).",
            ["kind"],
            registry=r,
        )
        self.enobufs = Counter(
            "replicator_enobufs",
            "ENOBUFS overruns of the kernel event socket (events were lost).",
            registry=r,
        )
        self.undecodable_events = Counter(
            "replicator_undecodable_events",
            "Kernel event datagrams skipped because they could not be decoded "
            "(repaired by a re-dump).",
            registry=r,
        )
        self.event_socket_failures = Counter(
            "replicator_event_socket_failures",
            "Errors of the kernel event socket other than overruns, and failed attempts "
            "to subscribe again after one (each followed by a re-dump).",
            registry=r,
        )
        self.injection_errors = Counter(
            "replicator_injection_errors",
            "Entries the kernel refused to create, update or delete, by errno name.",
            ["errno"],
            registry=r,
        )
        self.commit_duration = Histogram(
            "replicator_commit_duration_seconds",
            "Time to commit the external cache to the kernel.",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.auth_failures = Counter(
            "replicator_auth_failures",
            "Refused peers by reason (e.g. tls, fingerprint, control).",
            ["reason"],
            registry=r,
        )
        self.role = Enum(
            "replicator_role",
            "The keepalived role of this node.",
            states=[role.value for role in Role],
            registry=r,
        )
        self.role.state(Role.INIT.value)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        data: bytes = generate_latest(self.registry)
        return data


class MetricsServer(NamedTuple):
    """A running metrics endpoint; call :meth:`close` to stop it."""

    port: int
    server: WSGIServer
    thread: threading.Thread

    def close(self) -> None:
        """Stop serving and wait for the server thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def serve_metrics(metrics: Metrics, address: Endpoint) -> MetricsServer:
    """Serve ``/metrics`` on ``address`` from a background thread.

    Port 0 picks a free port (tests); the chosen one is in the result. Binding happens
    here, so an address in use is an ``OSError`` now rather than a silent thread death.
    """
    server, thread = start_http_server(address.port, str(address.host), registry=metrics.registry)
    return MetricsServer(server.server_port, server, thread)
