"""Every operator command against a real daemon pair in lab namespaces.

Two namespaces ``fwa`` and ``fwb`` joined by a sync veth run one ``replicator run``
each (:mod:`integration.netns.nodes`). Each kernel table gets its own entries with
``conntrack -I`` (conntrack-tools, the reference), and every command's answer is parsed
and compared with what the kernel, the other node or the metrics endpoint says: not
only exit codes. Text forms are checked for a few commands.

One pair is shared by the whole module (starting daemons is the slow part). Tests run in
file order: the read-only ones first, then the ones that change state (caches, roles,
configuration, a daemon restart); each of those checks against the live state rather
than against what an earlier test left behind.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from integration.netns.lab import Lab, Netns, lab
from integration.netns.nodes import REPO, DaemonNode, NodeSpec, replicator_argv, wait_for
from replicator.control import ControlClient
from replicator.ctformat import parse_conntrack_output
from replicator.kernel_linux import LinuxKernel
from replicator.model import AF_INET, IPPROTO_UDP, CtTuple, Entry, Status, invert

A_ENTRIES = 12  # fw-a's own connections: 10.1.0.1 -> 10.9.0.1, sports 41000..
B_ENTRIES = 5  # fw-b's own connections: 10.2.0.1 -> 10.9.0.1, sports 42000..
SHORTEN = 20  # keepalived.shorten_timeout of both nodes
METRICS_PORT = 9478
REDUMP_ENTRIES = 20000  # a re-dump of this many takes a noticeable fraction of a second
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@dataclass
class Pair:
    """The shared daemon pair."""

    lab: Lab
    a: DaemonNode
    b: DaemonNode
    workdir: Path

    @property
    def fifo(self) -> Path:
        """fw-b's keepalived notify FIFO."""
        assert self.b.spec.notify_fifo is not None
        return self.b.spec.notify_fifo


# --- kernel and CLI helpers -------------------------------------------------------------


def ct_insert(ns: Netns, src: str, sport: int, timeout: int = 300) -> None:
    """One established, assured TCP entry ``src:sport -> 10.9.0.1:80``."""
    ns.run(["conntrack", "-I", "-p", "tcp", "-s", src, "-d", "10.9.0.1",
            "--sport", str(sport), "--dport", "80", "--state", "ESTABLISHED",
            "-t", str(timeout), "-u", "SEEN_REPLY,ASSURED"])


def ct_list(ns: Netns) -> list[Entry]:
    """The namespace's table as conntrack-tools prints it."""
    return parse_conntrack_output(ns.run(["conntrack", "-L", "-o", "extended"]).stdout)


def ct_stats(ns: Netns) -> dict[str, int]:
    """``conntrack -S`` summed over CPUs."""
    totals: dict[str, int] = {}
    for line in ns.run(["conntrack", "-S"]).stdout.splitlines():
        for word in line.split():
            name, _, value = word.partition("=")
            if name != "cpu" and value.isdigit():
                totals[name] = totals.get(name, 0) + int(value)
    return totals


def timeless(entries: list[Entry]) -> set[Entry]:
    """Entries without their timeouts (they tick down between two listings)."""
    return {e._replace(timeout=None) for e in entries}


def dump(node: DaemonNode, cache: str) -> list[Entry]:
    """``replicator dump --CACHE --json`` parsed back into entries."""
    report = node.cli("dump", f"--{cache}")
    assert report["cache"] == cache
    return parse_conntrack_output("\n".join(report["entries"]))


def run_cli(*args: str, prefix: tuple[str, ...] = (), timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """``replicator ARGS`` as a process (exit code and both streams kept)."""
    return subprocess.run([*prefix, *replicator_argv(*args)], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO)


def scrape(node: DaemonNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The node's metrics endpoint, as {(sample name, sorted labels): value}."""
    text = node.ns.run(["curl", "-sf", f"http://127.0.0.1:{METRICS_PORT}/metrics"]).stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def log_lines(node: DaemonNode, since: int, msg: str) -> list[dict[str, str]]:
    """Records with message ``msg`` written to the node's log after byte ``since``,
    as {field: value} (the daemon logs ``key=value`` fields, values quoted if needed)."""
    with node.log.open("rb") as fh:
        fh.seek(since)
        text = fh.read().decode(errors="replace")
    out = []
    for line in text.splitlines():
        record = {k: v.strip('"') for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line)}
        if record.get("msg") == msg:
            out.append(record)
    return out


def log_size(node: DaemonNode) -> int:
    return node.log.stat().st_size


def settled(node: DaemonNode, external: int) -> bool:
    """Peer up, in sync, and the external cache holding ``external`` entries."""
    s = node.try_cli("status")
    return (s is not None and s["peer_up"] and s["in_sync"]
            and s["entries"]["external"] == external)


def wait_settled(pair: Pair) -> None:
    """Both nodes in sync with each other's current kernel table."""
    wait_for(lambda: settled(pair.a, len(ct_list(pair.b.ns)))
             and settled(pair.b, len(ct_list(pair.a.ns))), 30, "both nodes in sync")


def write_fifo(pair: Pair, *lines: str) -> None:
    """Write keepalived FIFO lines (``GROUP "VG_FW" MASTER 150``) to fw-b."""
    fd = os.open(pair.fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, "".join(f"{line}\n" for line in lines).encode())
    finally:
        os.close(fd)


# --- the pair ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    # Search-only for others: `nobody` must reach fw-a's control socket (and nothing else)
    # for the permission test; keys stay 0600.
    workdir = Path(tempfile.mkdtemp(prefix="replicator-ops-"))
    workdir.chmod(0o711)
    try:
        with lab("oc") as the_lab:
            ns_a, ns_b = the_lab.netns("fwa"), the_lab.netns("fwb")
            the_lab.veth(ns_a, "sync0", ns_b, "sync0")
            ns_a.run(["ip", "addr", "add", "10.77.0.1/24", "dev", "sync0"])
            ns_b.run(["ip", "addr", "add", "10.77.0.2/24", "dev", "sync0"])
            # No periodic re-dump: the tests compare counts at single moments. The re-dump
            # path is exercised by resync --kernel, flush --internal and the last test.
            common = {"keepalived": [f"shorten_timeout = {SHORTEN}"],
                      "kernel": ["refresh_interval = 0"]}
            a = DaemonNode(the_lab, ns_a, NodeSpec(
                "fw-a", "fw-b", "10.77.0.1", "10.77.0.2", metrics_port=METRICS_PORT,
                # A permissive file mode: the credential check alone must refuse.
                extra={**common, "control": ['mode = "0666"']}), workdir)
            b = DaemonNode(the_lab, ns_b, NodeSpec(
                "fw-b", "fw-a", "10.77.0.2", "10.77.0.1", metrics_port=METRICS_PORT,
                notify_fifo=workdir / "fw-b.fifo", vrrp_name="VG_FW", extra=common),
                workdir)
            for i in range(A_ENTRIES):
                ct_insert(ns_a, "10.1.0.1", 41000 + i)
            for i in range(B_ENTRIES):
                ct_insert(ns_b, "10.2.0.1", 42000 + i)
            a.start(wait=False)
            b.start(wait=False)
            a.wait_ready()
            b.wait_ready()
            the_pair = Pair(the_lab, a, b, workdir)
            wait_settled(the_pair)
            yield the_pair
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- read-only commands -------------------------------------------------------------------


def test_status_json_matches_the_kernels(pair: Pair) -> None:
    for node, peer in ((pair.a, pair.b), (pair.b, pair.a)):
        s = node.status()
        assert s["node"] == node.spec.name
        assert s["role"] == "INIT"  # no keepalived line yet
        assert s["mode"] == "cache"
        assert s["peer"] == f"{peer.spec.name}@{node.spec.peer_address}:{node.spec.port}"
        assert s["peer_up"] is True
        assert s["in_sync"] is True and s["reason"] == ""
        own = len(ct_list(node.ns))
        assert s["entries"] == {"internal": own, "external": len(ct_list(peer.ns)),
                                "kernel": own}
        assert isinstance(s["replication_lag_seconds"], float)
        assert s["uptime_seconds"] > 0
        assert isinstance(s["epoch"], int)
        # Every connection starts with a digest resync each way.
        last = s["last_resync"]
        assert last is not None and last["direction"] in ("send", "receive")
        assert last["seconds_ago"] >= 0 and last["duration_seconds"] >= 0


def test_status_text(pair: Pair) -> None:
    proc = run_cli("status", "-c", str(pair.b.config))
    assert proc.returncode == 0, proc.stderr
    fields = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    s = pair.b.status()
    assert fields["node"] == "fw-b"
    assert fields["role"] == "INIT"
    assert fields["peer"] == f"{s['peer']} (up)"
    assert fields["in sync"] == "yes"
    assert fields["entries"] == (f"external={A_ENTRIES} internal={B_ENTRIES} "
                                 f"kernel={B_ENTRIES}")
    assert fields["epoch"] == f"{s['epoch']:016x}"
    assert re.fullmatch(r"(digest|full) (send|receive), \d+ entries in [0-9.]+ s, \d+ s ago",
                        fields["last resync"])


def test_dump_equals_the_other_nodes_table(pair: Pair) -> None:
    for node, peer in ((pair.a, pair.b), (pair.b, pair.a)):
        internal = dump(node, "internal")
        external = dump(node, "external")
        assert timeless(internal) == timeless(ct_list(node.ns))
        assert timeless(external) == timeless(ct_list(peer.ns))
        assert len(external) == len(ct_list(peer.ns))
        # Remaining timeouts travel with the entries (300 s at insertion).
        assert all(e.timeout is not None and 0 < e.timeout <= 300 for e in external)
    text = run_cli("dump", "--external", "-c", str(pair.b.config))
    assert text.returncode == 0
    assert timeless(parse_conntrack_output(text.stdout)) == timeless(ct_list(pair.a.ns))


def test_dump_needs_a_cache(pair: Pair) -> None:
    proc = run_cli("dump", "-c", str(pair.a.config))
    assert proc.returncode == 2
    assert "--internal" in proc.stderr and "--external" in proc.stderr


def test_stats_sync_counters_and_kernel_statistics(pair: Pair) -> None:
    before = ct_stats(pair.a.ns)
    stats = pair.a.cli("stats")
    after = ct_stats(pair.a.ns)
    assert stats["sync_messages_sent"] > 0 and stats["sync_messages_received"] > 0
    assert stats["sync_bytes_sent"] > 0 and stats["sync_connections"] >= 1
    assert stats["link_established"] >= 1
    assert stats["protocol_violations"] == 0
    # /proc/net/stat/nf_conntrack summed over CPUs, as `conntrack -S` reports it.
    common = ("found", "invalid", "insert", "insert_failed", "drop", "early_drop",
              "search_restart")
    for name in common:
        assert before[name] <= stats[f"kernel_{name}"] <= after[name], name
    assert stats["kernel_insert"] >= A_ENTRIES  # one per conntrack -I
    assert stats["kernel_entries"] == len(ct_list(pair.a.ns))
    text = run_cli("stats", "-c", str(pair.a.config))
    assert text.returncode == 0
    lines = dict(line.split(" ", 1) for line in text.stdout.splitlines())
    assert float(lines["kernel_entries"]) == stats["kernel_entries"]


def test_metrics_match_status(pair: Pair) -> None:
    for node in (pair.a, pair.b):
        metrics = scrape(node)
        s = node.status()
        for cache in ("internal", "external", "kernel"):
            assert metrics[("replicator_entries", (("cache", cache),))] == s["entries"][cache]
        assert metrics[("replicator_peer_up", ())] == 1
        assert metrics[("replicator_in_sync", ())] == 1
        assert metrics[("replicator_role", (("replicator_role", s["role"]),))] == 1
        assert sum(v for (name, _), v in metrics.items() if name == "replicator_role") == 1
        assert metrics[("replicator_messages_total", (("direction", "sent"),))] > 0


def test_check_exits_0_when_in_sync(pair: Pair) -> None:
    proc = run_cli("check", "-c", str(pair.b.config))
    assert (proc.returncode, proc.stdout.strip()) == (0, "ok")
    assert pair.b.cli("check") == {"ok": True, "reason": ""}


def test_verify(pair: Pair) -> None:
    report = pair.a.cli("verify")
    assert report == {"ok": True, "checked": len(ct_list(pair.a.ns)), "problems": []}
    proc = run_cli("verify", "-c", str(pair.b.config))
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"ok: {len(ct_list(pair.b.ns))} entries checked"


def test_config_check_good_and_bad(pair: Pair) -> None:
    good = run_cli("config", "check", "-c", str(pair.a.config), "--json")
    assert good.returncode == 0
    assert json.loads(good.stdout) == {"ok": True, "path": str(pair.a.config), "node": "fw-a"}
    text = run_cli("config", "check", "-c", str(pair.a.config))
    assert text.stdout.strip() == f"ok: {pair.a.config}"
    bad = pair.workdir / "bad.toml"
    bad.write_text(pair.a.config.read_text().replace("[sync]\n", "[sync]\nbatchsize = 9\n"))
    proc = run_cli("config", "check", "-c", str(bad))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "sync.batchsize" in proc.stderr
    missing_key = pair.workdir / "nokey.toml"
    missing_key.write_text(pair.a.config.read_text().replace("fw-a.key", "absent.key"))
    proc = run_cli("config", "check", "-c", str(missing_key))
    assert proc.returncode == 1 and "absent.key" in proc.stderr


def test_keygen_and_fingerprint(pair: Pair) -> None:
    key, cert = pair.workdir / "new.key", pair.workdir / "new.crt"
    made = run_cli("keygen", "--key", str(key), "--cert", str(cert), "--name", "fw-new")
    assert made.returncode == 0, made.stderr
    fingerprint = made.stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert key.stat().st_mode & 0o777 == 0o600
    shown = run_cli("fingerprint", str(cert))
    assert (shown.returncode, shown.stdout.strip()) == (0, fingerprint)
    again = run_cli("keygen", "--key", str(key), "--cert", str(cert))
    assert again.returncode == 1 and str(key) in again.stderr
    other = run_cli("fingerprint", str(pair.workdir / "fw-a.crt"))
    assert other.stdout.strip() != fingerprint


def test_control_socket_refuses_other_users(pair: Pair) -> None:
    socket_path = pair.workdir / "fw-a.sock"
    assert socket_path.stat().st_mode & 0o777 == 0o666  # the file mode lets anyone connect
    key = ("replicator_auth_failures_total", (("reason", "control"),))
    before = scrape(pair.a).get(key, 0.0)
    since = log_size(pair.a)
    proc = run_cli("status", "--socket", str(socket_path), prefix=tuple(NOBODY))
    assert proc.returncode == 1
    uid = int(subprocess.run(["id", "-u", "nobody"], capture_output=True, text=True,
                             check=True).stdout)
    assert f"permission denied for uid {uid}" in proc.stderr
    assert proc.stdout == ""
    assert scrape(pair.a)[key] == before + 1
    refused = log_lines(pair.a, since, "control request refused")
    assert [r["uid"] for r in refused] == [str(uid)]
    # Root is still served.
    assert pair.a.status()["node"] == "fw-a"


# --- commands that change state -------------------------------------------------------------


def test_flush_internal_rereads_the_kernel(pair: Pair) -> None:
    report = pair.a.cli("flush", "--internal")
    assert report["count"] == len(ct_list(pair.a.ns))
    assert report["detail"] == "internal cache re-read from the kernel"
    assert timeless(dump(pair.a, "internal")) == timeless(ct_list(pair.a.ns))
    wait_settled(pair)


def test_flush_external_empties_and_refills(pair: Pair) -> None:
    since = log_size(pair.b)
    report = pair.b.cli("flush", "--external")
    assert report == {"count": len(ct_list(pair.a.ns)),
                      "detail": "external cache emptied; full resync requested"}
    wait_settled(pair)
    assert timeless(dump(pair.b, "external")) == timeless(ct_list(pair.a.ns))
    # fw-a answered the request with a full resync of its table.
    wait_for(lambda: any(r["full"] == "True" and r["direction"] == "send"
                         for r in log_lines(pair.a, 0, "resync completed")), 10, "full resync")
    assert log_lines(pair.b, since, "resync completed")


def test_resync_kernel_and_peer(pair: Pair) -> None:
    ct_insert(pair.a.ns, "10.1.0.2", 43000)
    report = pair.a.cli("resync", "--kernel")
    assert report == {"count": len(ct_list(pair.a.ns)), "detail": "kernel table re-read"}
    assert pair.a.status()["entries"]["internal"] == len(ct_list(pair.a.ns))
    report = pair.b.cli("resync", "--peer")
    assert report["detail"] == "full resync requested from the peer"
    wait_for(lambda: (last := pair.b.status()["last_resync"]) is not None
             and last["full"] and last["direction"] == "receive"
             and last["entries"] == len(ct_list(pair.a.ns)), 15, "full resync received")
    assert timeless(dump(pair.b, "external")) == timeless(ct_list(pair.a.ns))


def test_bulk_send(pair: Pair) -> None:
    since = log_size(pair.b)
    report = pair.b.cli("bulk-send")
    assert report == {"count": len(ct_list(pair.b.ns)),
                      "detail": "full resync to the peer started"}
    wait_for(lambda: any(r["full"] == "True" and r["direction"] == "receive"
                         and r["entries"] == str(len(ct_list(pair.b.ns)))
                         for r in log_lines(pair.a, 0, "resync completed")), 15, "bulk received")
    wait_for(lambda: any(r["full"] == "True" and r["direction"] == "send"
                         for r in log_lines(pair.b, since, "resync completed")), 15, "bulk sent")
    assert timeless(dump(pair.a, "external")) == timeless(ct_list(pair.b.ns))


def test_commit_writes_the_external_cache_into_the_kernel(pair: Pair) -> None:
    wait_settled(pair)
    peer_listing = ct_list(pair.a.ns)
    peer_table = timeless(peer_listing)
    own = timeless(ct_list(pair.b.ns))
    report = pair.b.cli("commit")
    assert report["applied"] == len(peer_table) and report["failed"] == 0
    assert report["seconds"] >= 0
    kernel = ct_list(pair.b.ns)
    assert timeless(kernel) == peer_table | own
    # Remaining timeouts were carried over: each copy expires when the original does
    # (whole seconds, rounded on the way; allow for the time between the two listings).
    remaining = {e._replace(timeout=None): e.timeout for e in peer_listing}
    for entry in kernel:
        original = remaining.get(entry._replace(timeout=None))
        if original is not None:
            assert entry.timeout is not None and original - 10 <= entry.timeout <= original + 2
    metrics = scrape(pair.b)
    assert metrics[("replicator_commit_duration_seconds_count", ())] >= 1


def test_shorten_timers_caps_kernel_timeouts(pair: Pair) -> None:
    before = ct_list(pair.b.ns)
    long_lived = [e for e in before if e.timeout is not None and e.timeout > SHORTEN]
    assert len(long_lived) == len(before) > B_ENTRIES  # its own and the committed ones
    report = pair.b.cli("shorten-timers")
    assert report == {"count": len(long_lived), "detail": f"timeouts capped at {SHORTEN} s"}
    after = ct_list(pair.b.ns)
    # The same entries, each with its timeout capped (not removed, not reset to 0).
    assert timeless(after) == timeless(before)
    assert all(e.timeout is not None and SHORTEN - 10 < e.timeout <= SHORTEN for e in after)
    # Nothing left above the cap once the daemon has seen the kernel's UPDATE events for
    # its own writes (it selects entries from its mirror of the table).
    wait_for(lambda: pair.b.cli("shorten-timers")["count"] == 0, 10, "nothing left to cap")
    # Put fw-b's table back as it was (its own entries, long-lived) for the next tests.
    pair.b.ns.run(["conntrack", "-F"])
    for i in range(B_ENTRIES):
        ct_insert(pair.b.ns, "10.2.0.1", 42000 + i)
    wait_settled(pair)


def informational_logged(node: DaemonNode) -> bool:
    """Send an informational keepalived line; True if its (info level) record was logged."""
    since = log_size(node)
    report = node.cli("notify", "INSTANCE", "VI_1", "MASTER_PRIORITY", "100")
    assert report["verdict"] == "informational"
    # The record is written before the answer is sent.
    return bool(log_lines(node, since, "keepalived transition"))


def test_sighup_applies_live_keys_and_names_restart_keys(pair: Pair) -> None:
    a = pair.a
    wait_settled(pair)
    assert informational_logged(a)
    original = a.spec
    since = log_size(a)
    a.spec = NodeSpec(**{**vars(original), "ignore_addresses": ("10.1.0.2/32",),
                         "extra": {**original.extra, "sync": ["batch = 256"]}})
    a.write_config()
    a.config.write_text(a.config.read_text().replace('level = "info"', 'level = "warning"'))
    assert a.proc is not None
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_for(lambda: log_lines(a, since, "reload: these keys need a restart to take effect"),
             10, "the reload warning")
    (restart,) = log_lines(a, since, "reload: these keys need a restart to take effect")
    assert restart["keys"] == "sync.batch"
    # log.level = "warning" is live: the info record of the reload itself is gone, and so
    # are later ones.
    assert not log_lines(a, since, "reloaded")
    assert not informational_logged(a)
    # filters.ignore_addresses is live: fw-a withdraws its entry from 10.1.0.2 from
    # fw-b's copy of its table.
    ignored = [e for e in ct_list(a.ns) if e.orig.src == bytes([10, 1, 0, 2])]
    assert len(ignored) == 1
    wait_for(lambda: pair.b.status()["entries"]["external"] == len(ct_list(a.ns)) - 1,
             10, "the ignored entry withdrawn from the peer")
    assert timeless(dump(pair.b, "external")) == timeless(ct_list(a.ns)) - timeless(ignored)
    assert timeless(dump(a, "internal")) == timeless(ct_list(a.ns)) - timeless(ignored)
    # Back to the original configuration.
    since = log_size(a)
    a.spec = original
    a.write_config()
    os.kill(a.proc.pid, signal.SIGHUP)
    wait_for(lambda: log_lines(a, since, "reloaded"), 10, "reloaded again")
    (reloaded,) = log_lines(a, since, "reloaded")
    assert set(reloaded["live"].split(",")) == {"filters.ignore_addresses", "log.level"}
    assert informational_logged(a)
    wait_for(lambda: pair.b.status()["entries"]["external"] == len(ct_list(a.ns)),
             10, "the entry back on the peer")


def test_sighup_keeps_the_running_configuration_on_a_bad_file(pair: Pair) -> None:
    a = pair.a
    since = log_size(a)
    good = a.config.read_text()
    a.config.write_text(good.replace("[sync]\n", "[sync]\nbatchsize = 9\n"))
    try:
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGHUP)
        wait_for(lambda: log_lines(
            a, since, "reload refused, keeping the running configuration"), 10, "refusal")
    finally:
        a.config.write_text(good)
    assert "sync.batchsize" in log_lines(
        a, since, "reload refused, keeping the running configuration")[0]["error"]
    assert a.status()["peer_up"] is True


def test_notify_command_drives_the_role(pair: Pair) -> None:
    a = pair.a
    since = log_size(a)
    assert a.cli("notify", "INSTANCE", "VI_1", "BACKUP", "100") == {
        "verdict": "accepted", "role": "BACKUP"}
    assert a.cli("notify", "INSTANCE", "VI_1", "BACKUP", "100") == {
        "verdict": "duplicate", "role": "BACKUP"}
    assert a.cli("notify", "INSTANCE", "VI_1", "MASTER_RX_LOWER_PRI", "100") == {
        "verdict": "informational", "role": "BACKUP"}
    wait_for(lambda: [r["action"] for r in log_lines(a, since, "role action done")] == [
        "become-receiver", "shorten-timers", "request-resync"], 15, "backup plan")
    assert a.status()["role"] == "BACKUP"
    proc = run_cli("notify", "INSTANCE", "VI_1", "MASTER", "150", "-c", str(a.config))
    assert (proc.returncode, proc.stdout.strip()) == (0, "accepted: role MASTER")
    wait_for(lambda: [r["action"] for r in log_lines(a, since, "role action done")][3:] == [
        "commit", "become-sender", "bulk-send"], 15, "master plan")
    status = a.status()
    assert status["role"] == "MASTER" and status["in_sync"] is True
    # Gauges are refreshed every second.
    wait_for(lambda: scrape(a)[("replicator_role", (("replicator_role", "MASTER"),))] == 1,
             5, "the role metric")
    bad = run_cli("notify", "INSTANCE", "VI_1", "PRIMARY", "150", "-c", str(a.config))
    assert bad.returncode == 2


def fifo_roles(pair: Pair, since: int) -> list[tuple[str, str, str]]:
    return [(r["state"], r["verdict"], r["role"])
            for r in log_lines(pair.b, since, "keepalived transition")]


@pytest.mark.parametrize("order", list(itertools.permutations(("MASTER", "BACKUP", "FAULT"))))
def test_keepalived_fifo_transitions(pair: Pair, order: tuple[str, str, str]) -> None:
    b = pair.b
    since = log_size(b)
    start = b.status()["role"]
    lines = []
    expected = []
    role = start
    for state in order:
        # keepalived's FIFO: the sync group's line (followed), a member instance's line
        # (not followed) and a repeated group line (duplicate).
        lines += [f'GROUP "VG_FW" {state} 100', f'INSTANCE "VI_1" {state} 100',
                  f'GROUP "VG_FW" {state} 100']
        verdict = "duplicate" if state == role else "accepted"
        expected += [(state, verdict, state), (state, "not-followed", state),
                     (state, "duplicate", state)]
        role = state
    write_fifo(pair, *lines)
    wait_for(lambda: len(fifo_roles(pair, since)) == len(expected), 10, "FIFO lines read")
    assert fifo_roles(pair, since) == expected
    wait_for(lambda: b.status()["role"] == order[-1], 10, "final role")
    plans = {"MASTER": ["commit", "become-sender", "bulk-send"],
             "BACKUP": ["become-receiver", "shorten-timers", "request-resync"],
             "FAULT": ["become-receiver", "shorten-timers"]}
    # The lines arrive in one read, faster than any action runs: the first accepted
    # transition starts its first action, each later one supersedes the rest of the
    # plan before it, and the latest plan runs to its end.
    accepted = [state for state, verdict, _ in expected if verdict == "accepted"]
    plan_runs = [plans[accepted[0]][0], *plans[accepted[-1]]]
    wait_for(lambda: len(log_lines(b, since, "role action done")) >= len(plan_runs), 15,
             "the plans done")
    time.sleep(0.5)  # nothing more may follow
    assert [r["action"] for r in log_lines(b, since, "role action done")] == plan_runs
    assert b.status()["role"] == order[-1]


def test_check_with_the_peer_down_and_restart_changes_the_epoch(pair: Pair) -> None:
    a, b = pair.a, pair.b
    # fw-b as a backup is not trivially ok (a master always is).
    write_fifo(pair, 'GROUP "VG_FW" BACKUP 100')
    wait_for(lambda: b.status()["role"] == "BACKUP", 10, "fw-b BACKUP")
    # Fresh long-lived tables: the role tests shortened timers and committed entries,
    # which would expire while this test runs.
    for ns, src, sport, count in ((a.ns, "10.1.0.1", 41000, A_ENTRIES),
                                  (b.ns, "10.2.0.1", 42000, B_ENTRIES)):
        ns.run(["conntrack", "-F"])
        for i in range(count):
            ct_insert(ns, src, sport + i)
    wait_settled(pair)
    assert b.status()["entries"]["external"] == A_ENTRIES
    epoch = a.status()["epoch"]
    a.kill()
    wait_for(lambda: not b.status()["peer_up"], 15, "fw-b sees the peer down")
    # fw-b held a complete copy when the peer went away: it may take over with it
    # (the peer may be dead: refusing would keep a dead master's VIPs in place).
    proc = run_cli("check", "-c", str(b.config))
    assert proc.returncode == 0, proc.stdout
    status = b.status()
    assert status["in_sync"] is True and status["peer_up"] is False
    assert status["replication_lag_seconds"] is None
    wait_for(lambda: scrape(b)[("replicator_peer_up", ())] == 0, 5, "the peer_up metric")
    verify = run_cli("verify", "-c", str(b.config))
    assert verify.returncode == 1 and "peer not connected" in verify.stderr
    # The peer's table is kept while it is away.
    assert status["entries"]["external"] == A_ENTRIES
    # Restart amnesia: a restarted daemon is INIT with a new epoch until keepalived
    # tells it its role again.
    a.start()
    wait_settled(pair)
    s = a.status()
    assert s["epoch"] != epoch and s["role"] == "INIT"
    assert s["last_resync"] is not None
    wait_for(lambda: run_cli("check", "-c", str(b.config)).returncode == 0, 15, "check ok")
    # With no daemon at all, check fails too (keepalived's track_script sees 1).
    a.stop()
    gone = run_cli("check", "-c", str(a.config))
    assert gone.returncode == 1 and gone.stderr.startswith("replicator: ")


def test_hot_standby_verify_finds_and_commit_repairs_a_missing_entry(netlab: Lab) -> None:
    """Hot mode: a BACKUP keeps the peer's entries in its kernel; ``verify`` compares the
    kernel with them entry by entry, and ``commit`` writes only what is missing."""
    ns_a, ns_b = netlab.netns("hta"), netlab.netns("htb")
    netlab.veth(ns_a, "sync0", ns_b, "sync0")
    ns_a.run(["ip", "addr", "add", "10.78.0.1/24", "dev", "sync0"])
    ns_b.run(["ip", "addr", "add", "10.78.0.2/24", "dev", "sync0"])
    workdir = Path(tempfile.mkdtemp(prefix="replicator-hot-"))
    try:
        a = DaemonNode(netlab, ns_a, NodeSpec("hot-a", "hot-b", "10.78.0.1", "10.78.0.2",
                                              mode="hot"), workdir)
        b = DaemonNode(netlab, ns_b, NodeSpec("hot-b", "hot-a", "10.78.0.2", "10.78.0.1",
                                              mode="hot"), workdir)
        for i in range(A_ENTRIES):
            ct_insert(ns_a, "10.1.0.1", 41000 + i)
        a.start(wait=False)
        b.start()
        a.wait_ready()
        a.notify("MASTER", 150)
        b.notify("BACKUP", 100)
        table = timeless(ct_list(ns_a))
        wait_for(lambda: timeless(ct_list(ns_b)) == table, 20, "the standby's kernel loaded")
        wait_for(lambda: b.try_cli("check") is not None, 20, "the standby in sync")
        # checked: its own table (empty: injected entries are not its own) + the peer's.
        assert b.cli("verify") == {"ok": True, "checked": A_ENTRIES, "problems": []}
        victim = ct_list(ns_b)[0]
        ns_b.run(["conntrack", "-D", "-p", "tcp", "-s", "10.1.0.1",
                  "--sport", str(victim.orig.sport)])
        wait_for(lambda: b.status()["entries"]["kernel"] == A_ENTRIES - 1, 10,
                 "the daemon sees the deletion")
        proc = run_cli("verify", "-c", str(b.config))
        assert proc.returncode == 1
        head, *problems = proc.stdout.strip().splitlines()
        assert head == f"FAILED: {A_ENTRIES} entries checked"
        assert len(problems) == 1 and problems[0].startswith("  missing in kernel: ")
        (missing,) = parse_conntrack_output(problems[0].split(": ", 1)[1])
        assert missing._replace(timeout=None) == victim._replace(timeout=None)
        assert b.cli("commit")["applied"] == 1  # only what the kernel lacks
        assert timeless(ct_list(ns_b)) == table
        assert b.cli("verify")["ok"] is True
        # Re-reading the standby's kernel (operator commands here; the same happens every
        # kernel.refresh_interval) must not make the injected copies its own table and
        # stream them back: the master's external cache stays empty.
        assert b.cli("resync", "--kernel")["count"] == A_ENTRIES
        assert b.cli("flush", "--internal")["count"] == 0
        assert a.cli("verify")["ok"] is True  # a round trip over the link after the re-reads
        assert b.status()["entries"] == {"internal": 0, "external": A_ENTRIES,
                                         "kernel": A_ENTRIES}
        assert a.status()["entries"]["external"] == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _upsert(netns: str, entries: list[Entry]) -> int:
    async with LinuxKernel(netns) as kernel:
        result = await kernel.upsert(entries)
    assert result.errors == []
    return result.applied


def udp_entries(count: int) -> list[Entry]:
    """``count`` replied UDP entries ``10.3.x.y:5000 -> 10.9.0.1:53``, 300 s left."""
    out = []
    for i in range(count):
        orig = CtTuple(bytes([10, 3, i >> 8, i & 255]), bytes([10, 9, 0, 1]), IPPROTO_UDP,
                       5000, 53)
        out.append(Entry(AF_INET, orig, invert(orig), status=int(Status.SEEN_REPLY),
                         timeout=300))
    return out


def test_check_stays_ok_while_the_kernel_is_re_dumped(netlab: Lab) -> None:
    """A standby in sync stays in sync while it re-dumps its own table every
    ``kernel.refresh_interval``: that dump says nothing about the peer's table."""
    ns_a, ns_b = netlab.netns("rda"), netlab.netns("rdb")
    netlab.veth(ns_a, "sync0", ns_b, "sync0")
    ns_a.run(["ip", "addr", "add", "10.79.0.1/24", "dev", "sync0"])
    ns_b.run(["ip", "addr", "add", "10.79.0.2/24", "dev", "sync0"])
    workdir = Path(tempfile.mkdtemp(prefix="replicator-redump-"))
    try:
        a = DaemonNode(netlab, ns_a, NodeSpec("rd-a", "rd-b", "10.79.0.1", "10.79.0.2"),
                       workdir)
        b = DaemonNode(netlab, ns_b, NodeSpec("rd-b", "rd-a", "10.79.0.2", "10.79.0.1",
                                              extra={"kernel": ["refresh_interval = 1"]}),
                       workdir)
        assert trio.run(_upsert, ns_b.name, udp_entries(REDUMP_ENTRIES)) == REDUMP_ENTRIES
        a.start(wait=False)
        b.start()
        a.wait_ready()
        b.notify("BACKUP", 100)
        client = ControlClient(workdir / "rd-b.sock", timeout=10)
        wait_for(lambda: client.check()["ok"], 30, "the standby in sync")
        answers: dict[str, int] = {}
        deadline = time.monotonic() + 4  # four re-dumps
        while time.monotonic() < deadline:
            report = client.check()
            answers[report["reason"] or "ok"] = answers.get(report["reason"] or "ok", 0) + 1
        assert set(answers) == {"ok"}, answers
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
