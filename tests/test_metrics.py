"""Prometheus metrics: names, labels, exposition, the HTTP endpoint."""

from __future__ import annotations

import ipaddress
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from replicator.config import Endpoint
from replicator.metrics import Metrics, serve_metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_metric_is_exported_under_its_documented_name() -> None:
    metrics = Metrics()
    metrics.entries.labels(cache="internal").set(120)
    metrics.entries.labels(cache="external").set(80)
    metrics.entries.labels(cache="kernel").set(121)
    metrics.peer_up.set(1)
    metrics.in_sync.set(1)
    metrics.replication_lag.set(0.02)
    metrics.messages.labels(direction="sent").inc(10)
    metrics.bytes.labels(direction="received").inc(690)
    metrics.resyncs.labels(kind="peer").inc()
    metrics.enobufs.inc(2)
    metrics.undecodable_events.inc(4)
    metrics.event_socket_failures.inc(5)
    metrics.injection_errors.labels(errno="ENOMEM").inc(3)
    metrics.commit_duration.observe(0.3)
    metrics.auth_failures.labels(reason="fingerprint").inc()
    metrics.role.state("MASTER")
    got = samples(metrics)
    assert got[("replicator_entries", (("cache", "internal"),))] == 120
    assert got[("replicator_entries", (("cache", "kernel"),))] == 121
    assert got[("replicator_peer_up", ())] == 1
    assert got[("replicator_in_sync", ())] == 1
    assert got[("replicator_replication_lag_seconds", ())] == 0.02
    assert got[("replicator_messages_total", (("direction", "sent"),))] == 10
    assert got[("replicator_bytes_total", (("direction", "received"),))] == 690
    assert got[("replicator_resyncs_total", (("kind", "peer"),))] == 1
    assert got[("replicator_enobufs_total", ())] == 2
    assert got[("replicator_undecodable_events_total", ())] == 4
    assert got[("replicator_event_socket_failures_total", ())] == 5
    assert got[("replicator_injection_errors_total", (("errno", "ENOMEM"),))] == 3
    assert got[("replicator_commit_duration_seconds_count", ())] == 1
    assert got[("replicator_commit_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert got[("replicator_commit_duration_seconds_bucket", (("le", "0.25"),))] == 0
    assert got[("replicator_auth_failures_total", (("reason", "fingerprint"),))] == 1
    assert got[("replicator_role", (("replicator_role", "MASTER"),))] == 1
    assert got[("replicator_role", (("replicator_role", "INIT"),))] == 0


def test_role_starts_at_init_and_registries_are_private() -> None:
    first, second = Metrics(), Metrics()
    first.enobufs.inc()
    assert samples(first)[("replicator_enobufs_total", ())] == 1
    assert samples(second)[("replicator_enobufs_total", ())] == 0
    assert samples(second)[("replicator_role", (("replicator_role", "INIT"),))] == 1


def test_served_over_http() -> None:
    metrics = Metrics()
    metrics.peer_up.set(1)
    server = serve_metrics(metrics, Endpoint(ipaddress.ip_address("127.0.0.1"), 0))
    try:
        assert server.port > 0
        url = f"http://127.0.0.1:{server.port}/metrics"
        # No proxy, whatever the environment says: this is a loopback fetch.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=10) as response:
            body = response.read().decode()
    finally:
        server.close()
    assert "replicator_peer_up 1.0" in body.splitlines()
    assert not server.thread.is_alive()
