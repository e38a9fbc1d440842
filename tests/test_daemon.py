"""Two daemons end to end: fake kernels, real mutual TLS on loopback, real control sockets.

The kernel is the in-memory fake (the real kernel is proven in integration/netns/);
everything else is the production code: mirror, sync session, peer link, role machine,
control socket and metrics.
"""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import socket
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from replicator import ctformat, record
from replicator.config import Config, parse_config
from replicator.control import CacheName, Command, ControlClient, Request, ResyncSource
from replicator.daemon import (
    DEFAULT_COMMIT_TIMEOUT,
    SNAPSHOT_STEP,
    Daemon,
    KernelWriter,
    copy_tcp_flags,
)
from replicator.errors import KernelError
from replicator.kernel import InjectResult
from replicator.kernel_fake import FakeKernel
from replicator.keys import generate_identity, write_identity
from replicator.metrics import Metrics
from replicator.model import (
    AF_INET,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    TcpFlag,
    TcpInfo,
    invert,
)
from replicator.role import Role, VrrpEvent, VrrpKind, VrrpState
from replicator.sync import PeerHello, ProtocolViolation
from replicator.viprole import IPAddress, held_addresses

WAN = bytes([198, 51, 100, 1])
#: The virtual address of the tests that configure one (keepalived's VIP).
VIP = ipaddress.ip_address("198.51.100.254")


def with_vips(cfg: Config, *vips: IPAddress) -> Config:
    """``cfg`` with these ``keepalived.virtual_addresses``."""
    return replace(cfg, keepalived=replace(cfg.keepalived, virtual_addresses=vips))


def addresses_of(held: set[IPAddress]) -> Callable[[str | None], set[IPAddress]]:
    """What a daemon reads as its interfaces' addresses: ``held``."""
    def read(netns: str | None) -> set[IPAddress]:
        return set(held)
    return read


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def flow(i: int, *, proto: int = IPPROTO_TCP, snat: bool = True) -> Entry:
    orig = CtTuple(bytes([10, 0, i // 250, i % 250 + 1]), bytes([192, 0, 2, 80]), proto,
                   40000 + i % 20000, 443)
    reply = invert(orig)
    if snat:
        reply = reply._replace(dst=WAN, dport=1024 + i)
    tcp = TcpInfo(3, 7, 7, 0x23, 0x23) if proto == IPPROTO_TCP else None
    return Entry(AF_INET, orig, reply, status=0x0E, timeout=3600, mark=i % 3, tcp=tcp)


@dataclass
class Node:
    name: str
    config: Config
    kernel: FakeKernel
    daemon: Daemon
    metrics_port: int

    def client(self) -> ControlClient:
        return ControlClient(self.config.control.socket, timeout=10.0)

    async def call(self, command: Command, arg: str = "") -> object:
        client = self.client()
        return await trio.to_thread.run_sync(client.call, Request(command, arg))


def make_config(tmp: Path, name: str, peer: str, *, port: int, peer_port: int, mode: str,
                metrics_port: int) -> str:
    return f"""
[node]
name = "{name}"
[sync]
listen_address = "127.0.0.1"
peer_address = "127.0.0.1"
listen_port = {port}
peer_port = {peer_port}
peer_name = "{peer}"
mode = "{mode}"
buckets = 64
batch = 64
[sync.timers]
ack_timeout = 1.0
keepalive_interval = 0.2
dead_interval = 3.0
anti_entropy_interval = 0
[tls]
key = "{tmp}/{name}.key"
cert = "{tmp}/{name}.crt"
peer_certs = ["{tmp}/{peer}.crt"]
[kernel]
conntrack_events = "leave"
refresh_interval = 0
[control]
socket = "{tmp}/{name}.sock"
[metrics]
address = "127.0.0.1:{metrics_port}"
[keepalived]
shorten_timeout = 15
"""


Pair = Callable[..., AbstractAsyncContextManager[tuple[Node, Node]]]


@pytest.fixture
def pair_factory(tmp_path: Path) -> Pair:
    now = datetime.datetime.now(datetime.UTC)
    for name in ("fw-a", "fw-b"):
        write_identity(generate_identity(name, now), tmp_path / f"{name}.key",
                       tmp_path / f"{name}.crt")

    @asynccontextmanager
    async def pair(mode: str, *, b_holds: Iterable[Entry] = (),
                   held: dict[str, set[IPAddress]] | None = None,
                   ) -> AsyncIterator[tuple[Node, Node]]:
        """Two daemons, A's started first; ``b_holds``: entries in B's kernel before
        its daemon starts; ``held``: the addresses the interfaces of the nodes it
        names hold (those then have ``keepalived.virtual_addresses = [VIP]``)."""
        ports = {"fw-a": free_port(), "fw-b": free_port()}
        nodes = []
        for name, peer in (("fw-a", "fw-b"), ("fw-b", "fw-a")):
            mport = free_port()
            text = make_config(tmp_path, name, peer, port=ports[name],
                               peer_port=ports[peer], mode=mode, metrics_port=mport)
            addresses: Callable[[str | None], set[IPAddress]] = held_addresses
            if held is not None and name in held:
                text += f'virtual_addresses = ["{VIP}"]\n'
                addresses = addresses_of(held[name])
            cfg = parse_config(text)
            kernel = FakeKernel()
            if name == "fw-b":
                kernel.add_many(b_holds)
            daemon = Daemon(cfg, kernel, environ={}, addresses=addresses)
            nodes.append(Node(name, cfg, kernel, daemon, mport))
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.daemon.run)
            yield nodes[0], nodes[1]
            nursery.cancel_scope.cancel()

    return pair


async def eventually(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Poll state owned by the daemons' tasks (they expose no event for each test)."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.02)


def kernel_view(kernel: FakeKernel) -> dict[object, tuple[object, ...]]:
    """What must survive a copy: tuples, zone, mark, labels, TCP state."""
    return {
        k: (e.reply, e.zone, e.mark, e.labels, e.tcp.state if e.tcp else None)
        for k, e in kernel.table.items()
    }


async def test_cache_mode_replicates_then_commits_on_promotion(
    pair_factory: Pair,
) -> None:
    async with pair_factory("cache") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(300))
        await eventually(lambda: len(b.daemon.session.external) == 300)
        # Cache mode: the standby's kernel is untouched until promotion.
        assert b.kernel.table == {}
        status = await b.call(Command.STATUS)
        assert isinstance(status, dict)
        assert status["entries"]["external"] == 300
        assert status["peer_up"] is True
        check = await b.call(Command.CHECK)
        assert check == {"ok": True, "reason": ""}

        # verify on the active: a copy damaged on the standby is found, listed, repaired.
        damaged = flow(7)
        external = b.daemon.session.external
        damaged_key = record.key(damaged)
        external.delete(external.table.bucket_of(damaged_key), damaged_key)
        report = await a.call(Command.VERIFY)
        assert isinstance(report, dict) and report["ok"] is False
        line = ctformat.format_entry(next(e for e in a.daemon.session.local_entries()
                                          if e.key == damaged.key))
        assert "  " + line in report["problems"]
        await eventually(lambda: damaged_key in external)
        assert (await a.call(Command.VERIFY))["ok"] is True  # type: ignore[index]

        # Updates and deletes propagate.
        a.kernel.remove(flow(0).key)
        a.kernel.modify(flow(1).key, mark=77)
        await eventually(lambda: len(b.daemon.session.external) == 299)
        ext = b.daemon.session.external
        await eventually(lambda: (e := ext.get(record.key(flow(1)))) is not None
                         and e.mark == 77)

        # Failover: B becomes MASTER and commits; A becomes BACKUP.
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await eventually(lambda: len(b.kernel.table) == 299)
        assert kernel_view(b.kernel) == kernel_view(a.kernel)
        # The commit's echoes were never received (the event socket left the NEW and
        # UPDATE groups meanwhile); the promotion's re-read filled the mirror.
        await eventually(lambda: b.daemon.mirror.synced
                         and b.daemon.mirror.cache.snapshot() == b.kernel.table)
        assert b.daemon.mirror.stats.echoes == 0
        # Sequence edges cannot be copied: committed TCP entries are written liberal.
        assert all(e.tcp.flags_orig & e.tcp.flags_reply & TcpFlag.BE_LIBERAL
                   for e in b.kernel.table.values() if e.tcp is not None)
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        # The new master owns the entries it committed (they came back as echoes) and
        # streams them to the old one, which would need them to fail back.
        await eventually(lambda: len(a.daemon.session.external) == 299)
        # A shortened the timers of the entries it no longer owns.
        await eventually(lambda: all(e.timeout is not None and e.timeout <= 15
                                     for e in a.kernel.table.values()))

        # The metrics endpoint agrees with status.
        status = await b.call(Command.STATUS)
        assert isinstance(status, dict)
        await trio.sleep(1.2)  # one gauge refresh period
        text = await trio.to_thread.run_sync(
            lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{b.metrics_port}/metrics", timeout=5).read().decode())
        assert 'replicator_entries{cache="kernel"} 299.0' in text
        assert f'replicator_entries{{cache="external"}} {status["entries"]["external"]}.0' in text
        assert "replicator_peer_up 1.0" in text
        assert 'replicator_role{replicator_role="MASTER"} 1.0' in text


async def test_an_operator_commit_answers_then_the_mirror_rereads_the_kernel(
    pair_factory: Pair,
) -> None:
    async with pair_factory("cache") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(120))
        await eventually(lambda: len(b.daemon.session.external) == 120)
        result = await b.call(Command.COMMIT)
        assert isinstance(result, dict) and result["applied"] == 120
        assert len(b.kernel.table) == 120
        # The commit's echoes were never received; a background re-read replaces them.
        assert b.daemon.mirror.stats.echoes == 0
        assert b.daemon.mirror.stale
        await eventually(lambda: b.daemon.mirror.synced
                         and b.daemon.mirror.cache.snapshot() == b.kernel.table)


async def test_a_commit_updates_the_entries_the_kernel_still_holds(
    pair_factory: Pair,
) -> None:
    """A node that was master not long ago still holds entries (timers shortened): its
    commit passes those its mirror holds as ``existing`` (written as updates), the
    rest as creates, and the table ends up as the peer's."""
    async with pair_factory("cache") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(120))
        await eventually(lambda: len(b.daemon.session.external) == 120)
        b.kernel.add_many(flow(i)._replace(mark=5, timeout=10) for i in range(0, 120, 3))
        await eventually(lambda: len(b.daemon.mirror.cache) == 40)
        calls: list[tuple[int, int, bool]] = []
        upsert_records = b.kernel.upsert_records

        async def spy(records: Sequence[bytes], now: float, **kw: Any) -> InjectResult:
            calls.append((len(records), len(kw.get("existing", ())),
                          kw.get("takeover", False)))
            return await upsert_records(records, now, **kw)

        b.kernel.upsert_records = spy  # type: ignore[method-assign]
        result = await b.call(Command.COMMIT)
        assert isinstance(result, dict) and result["applied"] == 120
        # A commit has the node to itself: the port may keep its threads apart.
        assert calls == [(80, 40, True)]
        assert kernel_view(b.kernel) == kernel_view(a.kernel)


async def test_a_send_stuck_on_the_peer_does_not_stop_the_event_reader(
    pair_factory: Pair,
) -> None:
    """The event reader leaves the driver turns to send but never waits for a send: a
    peer that stops reading (a full socket buffer) must not keep the active from
    reading its kernel's events (the kernel drops what the event socket cannot hold)."""
    async with pair_factory("cache") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(10))
        await eventually(lambda: len(b.daemon.session.external) == 10)
        conn = a.daemon._conn
        assert conn is not None
        stuck = trio.Event()

        async def never_done(payloads: Sequence[bytes]) -> None:
            stuck.set()
            await trio.sleep_forever()

        conn.send_frames = never_done  # type: ignore[method-assign]
        a.kernel.add(flow(10))
        await stuck.wait()  # the driver is stuck in a send
        read = a.daemon.mirror.stats.events
        for start in range(11, 400, 50):  # a read each
            a.kernel.add_many(flow(i) for i in range(start, min(start + 50, 400)))
            await trio.testing.wait_all_tasks_blocked()
        # Read as events (a re-read of the table would fill the cache too).
        await eventually(lambda: a.daemon.mirror.stats.events == read + 389)
        assert len(a.daemon.mirror.cache) == 400
        assert a.daemon.session.local_count == 400
        assert len(b.daemon.session.external) < 400


async def test_hot_mode_standby_kernel_follows_the_active(
    pair_factory: Pair,
) -> None:
    async with pair_factory("hot") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(200))
        a.kernel.add_many(flow(i, proto=IPPROTO_UDP, snat=False) for i in range(200, 250))
        await eventually(lambda: len(b.kernel.table) == 250)
        assert kernel_view(b.kernel) == kernel_view(a.kernel)
        # B's injections are echoes: B sends none of them back as its own entries.
        assert b.daemon.session.local_count == 0
        a.kernel.remove(flow(5).key)
        await eventually(lambda: flow(5).key not in b.kernel.table)
        # Promotion needs no commit: nothing is missing.
        result = await b.call(Command.COMMIT)
        assert isinstance(result, dict)
        assert result["applied"] == 0 and result["failed"] == 0
        report = await b.call(Command.VERIFY)
        assert report == {"ok": True, "checked": 249, "problems": []}
        # Promotion: B's injected entries become B's own table, streamed to A.
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        await eventually(lambda: len(a.daemon.session.external) == 249)
        assert b.daemon.session.local_count == 249
        dump = await b.call(Command.DUMP, CacheName.EXTERNAL.value)
        assert isinstance(dump, dict)
        assert len(dump["entries"]) == 249


async def test_a_hot_standby_reads_no_echo_and_a_reread_sends_back_no_copy(
    pair_factory: Pair,
) -> None:
    """The standby's writes are not read back: the writer tells the mirror what it
    wrote. A re-read of the kernel then finds the copies as the kernel holds them (TCP
    flags liberal, unlike the peer's records): still the peer's, nothing is sent back."""
    async with pair_factory("hot") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(100))
        await eventually(lambda: len(b.kernel.table) == 100)
        await b.daemon.writer.wait_idle()
        mirror = b.daemon.mirror
        assert mirror.ignores_echoes
        assert mirror.stats.echoes == 0 and mirror.stats.echoes_ignored >= 100
        # The writer's report stands in for the echoes: every copy is known.
        assert {record.key(flow(i)) for i in range(100)} <= set(dict(mirror.cache.items()))
        published = mirror.stats.published
        sent = b.daemon.session.stats.entries_sent, b.daemon.session.stats.deletes_sent
        await b.daemon.resync(ResyncSource.KERNEL)
        assert mirror.stats.published > published  # the kernel's versions differ ...
        await trio.sleep(0.3)
        # ... but they are the peer's entries: none became the standby's own, not even
        # for a moment (sent, then deleted by the re-read's snapshot).
        assert b.daemon.session.local_count == 0
        assert len(a.daemon.session.external) == 0
        assert (b.daemon.session.stats.entries_sent,
                b.daemon.session.stats.deletes_sent) == sent
        assert kernel_view(b.kernel) == kernel_view(a.kernel)


async def test_a_restarted_hot_standby_shortens_what_the_peer_no_longer_holds(
    pair_factory: Pair,
) -> None:
    """Copies written before the restart, of connections that ended meanwhile
    (90-99), get a short timeout when keepalived says BACKUP (its plan shortens the
    timers of what the peer does not hold, then the peer's full resync restores the
    timeouts of the live ones); they would otherwise live out their timeouts (days, for
    established TCP) and be announced as the standby's own meanwhile.

    A is master before B's daemon starts, as when B alone restarts (its role from the
    address it holds: told MASTER only after B's table had reached it, it would have
    committed B's stale copies into its own kernel, as a takeover does)."""
    async with pair_factory("hot", b_holds=[flow(i) for i in range(100)],
                            held={"fw-a": {VIP}}) as (a, b):
        await eventually(lambda: a.daemon.role is Role.MASTER)
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(90))
        limit = b.config.keepalived.shorten_timeout
        strays = [flow(i).key for i in range(90, 100)]
        await eventually(lambda: all((b.kernel.table[k].timeout or 0) <= limit
                                     for k in strays))
        assert all((b.kernel.table[flow(i).key].timeout or 0) > limit for i in range(90))
        assert kernel_view(b.kernel).keys() == kernel_view(a.kernel).keys() | set(strays)


async def test_flushing_a_hot_standbys_cache_leaves_no_stale_copy_in_its_kernel(
    pair_factory: Pair,
) -> None:
    async with pair_factory("hot") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        await b.call(Command.NOTIFY, 'INSTANCE "VI_1" BACKUP 100')
        a.kernel.add_many(flow(i) for i in range(60))
        await eventually(lambda: len(b.kernel.table) == 60)
        # Called directly so that nothing runs between the flush and the deletes on the
        # active: they reach the standby before the resync it asked for, when its
        # external cache holds no copy they could remove from the kernel.
        report = await b.daemon.flush(CacheName.EXTERNAL)
        for i in range(10):
            a.kernel.remove(flow(i).key)
        assert report["count"] == 60
        await eventually(lambda: len(b.daemon.session.external) == 50
                         and len(b.kernel.table) == 50)
        assert set(b.kernel.table) == set(a.kernel.table)
        # None of the copies became the standby's own entries (streamed back to A).
        await trio.sleep(0.3)
        assert b.daemon.session.local_count == 0
        assert len(a.daemon.session.external) == 0


def lone_config(tmp_path: Path) -> Config:
    """The configuration of node fw-a (cache mode) whose peer fw-b never answers."""
    now = datetime.datetime.now(datetime.UTC)
    for name in ("fw-a", "fw-b"):
        write_identity(generate_identity(name, now), tmp_path / f"{name}.key",
                       tmp_path / f"{name}.crt")
    return parse_config(make_config(tmp_path, "fw-a", "fw-b", port=free_port(),
                                    peer_port=free_port(), mode="cache",
                                    metrics_port=free_port()))


async def test_check_says_why_the_peer_is_not_connected(tmp_path: Path) -> None:
    # A peer of another protocol version (an upgrade half done) is refused on every
    # attempt: `check` and `status` say so instead of a bare "not connected".
    cfg = lone_config(tmp_path)
    daemon = Daemon(cfg, FakeKernel())
    why = "peer speaks sync protocol version 3, this node 4"
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert await daemon.check() == {"ok": False, "reason": "peer not connected"}
        daemon._on_event(ProtocolViolation(why))
        assert await daemon.check() == {"ok": False, "reason": f"peer not connected: {why}"}
        assert (await daemon.status())["reason"] == f"peer not connected: {why}"
        # A connection that gets as far as the peer's HELLO forgets it.
        daemon._on_event(PeerHello("fw-b", 1, restarted=False))
        assert await daemon.check() == {"ok": False, "reason": "peer not connected"}
        nursery.cancel_scope.cancel()


async def test_systemd_ready_status_and_watchdog(tmp_path: Path) -> None:
    """READY=1 once started, STATUS= with role/peer/entries, WATCHDOG=1 while healthy."""
    cfg = lone_config(tmp_path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(str(tmp_path / "notify"))
    environ = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"}
    kernel = FakeKernel()
    kernel.add(flow(1))
    daemon = Daemon(cfg, kernel, environ=environ)
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        # A standby that never held a complete copy of the peer's table refuses.
        assert await daemon.check() == {"ok": False, "reason": "peer not connected"}
        with trio.fail_after(10):
            while not any("WATCHDOG=1" in m for m in seen):
                seen.append((await sock.recv(4096)).decode())
        nursery.cancel_scope.cancel()
    sock.close()
    ready = next(m for m in seen if "READY=1" in m)
    assert "STATUS=role=INIT peer=down internal=1 external=0" in ready


@pytest.mark.parametrize("tracking", [False, True])
async def test_hot_writes_get_a_timeout_and_liberal_tcp_unless_tracking(
    autojump_clock: trio.testing.MockClock, tracking: bool,
) -> None:
    # Sequence edges cannot be copied: TCP copies are written BE_LIBERAL unless window
    # tracking is asked for; a create needs a timeout.
    assert copy_tcp_flags(tracking) == (0 if tracking else TcpFlag.BE_LIBERAL)
    kernel = FakeKernel()
    writer = KernelWriter(kernel, Metrics(), window_tracking=tracking)
    now = trio.current_time()
    timeless, udp = flow(1)._replace(timeout=None), flow(2, proto=IPPROTO_UDP)
    writer.put([record.pack(timeless, record.deadline_of(None, now)),
                record.pack(udp, now + 30)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.wait_idle()
        nursery.cancel_scope.cancel()
    written = kernel.table[timeless.key]
    assert written.timeout == DEFAULT_COMMIT_TIMEOUT
    assert written.tcp is not None and timeless.tcp is not None
    liberal = 0 if tracking else TcpFlag.BE_LIBERAL
    assert written.tcp.flags_orig == timeless.tcp.flags_orig | liberal
    assert written.tcp.flags_reply == timeless.tcp.flags_reply | liberal
    assert kernel.table[udp.key].tcp is None and kernel.table[udp.key].timeout == 30


async def test_sighup_takes_new_peer_certificates_but_keeps_this_nodes_key(
    tmp_path: Path,
) -> None:
    now = datetime.datetime.now(datetime.UTC)
    identities = {name: generate_identity(name, now) for name in ("fw-a", "fw-b", "fw-b2",
                                                                  "fw-x")}
    for name, identity in identities.items():
        write_identity(identity, tmp_path / f"{name}.key", tmp_path / f"{name}.crt")
    text = make_config(tmp_path, "fw-a", "fw-b", port=free_port(), peer_port=free_port(),
                       mode="cache", metrics_port=free_port())
    path = tmp_path / "replicator.toml"
    path.write_text(text)
    daemon = Daemon(parse_config(text), FakeKernel(), config_path=path, environ={})
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert daemon.link is not None
        given: list[tuple[str, frozenset[str]]] = []
        original = daemon.link.set_credentials

        def record(credentials: Any) -> None:
            given.append((credentials.own, credentials.accepted))
            original(credentials)

        daemon.link.set_credentials = record  # type: ignore[method-assign]
        # A rotation on the peer (new certificate) and, by mistake, a new key here too:
        # tls.key/tls.cert need a restart, so the running identity must stay.
        path.write_text(text.replace("fw-b.crt", "fw-b2.crt")
                        .replace("fw-a.key", "fw-x.key").replace("fw-a.crt", "fw-x.crt"))
        daemon.reload()
        assert given == [(identities["fw-a"].fingerprint,
                          frozenset({identities["fw-b2"].fingerprint}))]
        assert daemon.config.tls.key == tmp_path / "fw-a.key"
        nursery.cancel_scope.cancel()


async def test_hot_writes_take_the_time_spent_queued_off_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    kernel = FakeKernel()
    writer = KernelWriter(kernel, Metrics())
    now = trio.current_time()
    writer.put([record.pack(flow(1)._replace(timeout=100), now + 100),
                record.pack(flow(2)._replace(timeout=3), now + 3)])
    await trio.sleep(5)  # e.g. a kernel refusing writes, or a long burst ahead of them
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.wait_idle()
        nursery.cancel_scope.cancel()
    # A copy never outlives the original (and what is still alive keeps a second).
    assert kernel.table[flow(1).key].timeout == 95
    assert kernel.table[flow(2).key].timeout == 1


async def test_hot_writes_count_the_timeout_from_when_the_peer_sent_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The session read the peer's message 4 s after the peer built it (a busy
    # standby): the timeouts in it were current 4 s ago, not now.
    kernel = FakeKernel()
    writer = KernelWriter(kernel, Metrics())
    await trio.sleep(10)
    since = trio.current_time() - 4
    writer.put([record.pack(flow(1)._replace(timeout=100), since + 100)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.wait_idle()
        nursery.cancel_scope.cancel()
    assert kernel.table[flow(1).key].timeout == 96


async def test_overlapping_rereads_of_the_kernel_take_turns(pair_factory: Pair) -> None:
    # The periodic refresh, a role change and an operator's resync can each re-read the
    # kernel while another one runs; the session's snapshot is given in parts, so they
    # must not interleave (the drill saw a daemon die of it on promotion).
    async with pair_factory("hot") as (a, b):
        await a.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
        a.kernel.add_many(flow(i) for i in range(3 * SNAPSHOT_STEP))
        await eventually(lambda: len(b.daemon.session.external) == 3 * SNAPSHOT_STEP)
        # The MASTER plan re-reads the kernel too (become-sender): under load it could
        # still be running when the three below end, its snapshot not finished.
        await eventually(lambda: a.daemon.machine.settled)
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(a.daemon.resync, ResyncSource.KERNEL)
        assert a.daemon.session.local_count == 3 * SNAPSHOT_STEP
        assert not a.daemon.session.snapshot_running


def refusing(real: Callable[..., Awaitable[Any]], times: int,
             meanwhile: Callable[[], Awaitable[None]] | None = None
             ) -> Callable[..., Awaitable[Any]]:
    """``real``, except that its first ``times`` calls fail as the netlink socket
    refuses a datagram under memory pressure (after ``meanwhile``, if given)."""
    left = times

    async def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal left
        if left:
            left -= 1
            if meanwhile is not None:
                await meanwhile()
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return await real(*args, **kwargs)

    return call


async def test_a_hot_write_that_fails_whole_is_retried_and_loses_nothing(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture,
) -> None:
    # The netlink socket refuses the write (ENOMEM under memory pressure): the changes
    # stay queued, newer ones win, and the write is tried again after a back-off.
    kernel = FakeKernel()
    writer = KernelWriter(kernel, Metrics())

    async def meanwhile() -> None:
        await trio.lowlevel.checkpoint()
        # Meanwhile the peer changed entry 1: the retry must write that state.
        writer.put([record.pack(flow(1)._replace(mark=9), trio.current_time() + 100)])

    kernel.upsert_records = refusing(  # type: ignore[method-assign,assignment]
        kernel.upsert_records, 2, meanwhile)
    now = trio.current_time()
    writer.put([record.pack(flow(i), now + 100) for i in range(1, 4)])
    with caplog.at_level(logging.WARNING, logger="replicator.daemon"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer.run)
            await writer.wait_idle()
            nursery.cancel_scope.cancel()
    assert writer.failures == 2
    assert trio.current_time() - now >= 3  # 1 s, then 2 s
    assert set(kernel.table) == {flow(i).key for i in range(1, 4)}
    assert kernel.table[flow(1).key].mark == 9
    retries = [r for r in caplog.records if "failed; retrying" in r.getMessage()]
    assert [r.fields["retry_in"] for r in retries] == [1.0, 2.0]  # type: ignore[attr-defined]


async def test_a_hot_batch_whose_deletes_fail_retries_only_the_deletes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The upserts of the batch were written: the retry neither writes nor counts them
    again, and the mirror is told each change once."""
    kernel = FakeKernel()
    kernel.add(flow(9))
    told: list[tuple[list[bytes], list[bytes]]] = []
    writer = KernelWriter(kernel, Metrics(),
                          wrote=lambda w, d: told.append(([k for k, _ in w], d)))
    kernel.delete = refusing(kernel.delete, 1)  # type: ignore[method-assign,assignment]
    upserts = kernel.upsert_records
    calls = 0

    async def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return await upserts(*args, **kwargs)

    kernel.upsert_records = counting  # type: ignore[method-assign]
    now = trio.current_time()
    writer.put([record.pack(flow(i), now + 100) for i in range(1, 4)])
    writer.put_deletes([flow(9)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.wait_idle()
        nursery.cancel_scope.cancel()
    assert writer.failures == 1 and calls == 1
    assert writer.written == 4  # three creates, one delete: each once
    assert set(kernel.table) == {flow(i).key for i in range(1, 4)}
    keys = [record.key(flow(i)) for i in range(1, 4)]
    assert told == [(keys, []), ([], [record.key(flow(9))])]


async def test_a_hot_batch_is_split_by_what_the_mirror_knows_in_the_queued_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Creates for the keys the mirror does not hold, updates for those it does, each
    in the order queued (a key queued again keeps its place, its newest record wins);
    the mirror is told what was written but not what the kernel refused."""
    kernel = FakeKernel(max_entries=5)
    kernel.add(flow(9))
    kernel.add(flow(5))
    told: list[tuple[list[tuple[bytes, bytes]], list[bytes]]] = []
    known = {record.key(flow(5)), record.key(flow(9))}
    writer = KernelWriter(kernel, Metrics(), known=known,
                          wrote=lambda w, d: told.append((list(w), list(d))))
    calls: list[tuple[list[bytes], list[bytes]]] = []
    upserts = kernel.upsert_records

    async def recording(records: Sequence[bytes], now: float, **kwargs: Any) -> Any:
        calls.append((list(records), list(kwargs["existing"])))
        # A hot standby's writes share the CPUs with its receiving: no takeover.
        assert not kwargs.get("takeover", False)
        return await upserts(records, now, **kwargs)

    kernel.upsert_records = recording  # type: ignore[method-assign]
    now = trio.current_time()
    recs = {i: record.pack(flow(i), now + 100) for i in range(1, 7)}
    writer.put(iter(recs.values()))  # any iterable
    recs[2] = record.pack(flow(2)._replace(mark=7), now + 100)
    writer.put([recs[2]])
    writer.put_deletes([flow(9)])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await writer.wait_idle()
        nursery.cancel_scope.cancel()
    assert calls == [([recs[i] for i in (1, 2, 3, 4, 6)], [recs[5]])]
    # Room for three creates (5 entries at most): 4 and 6 were refused.
    assert writer.errors == {errno.ENOMEM: 2}
    assert kernel.table[flow(2).key].mark == 7
    assert told == [([(record.key(flow(i)), recs[i]) for i in (1, 2, 3, 5)], []),
                    ([], [record.key(flow(9))])]
    assert flow(9).key not in kernel.table


async def test_restarted_nodes_take_their_roles_from_the_virtual_addresses(
        pair_factory: Pair, caplog: pytest.LogCaptureFixture) -> None:
    """keepalived says nothing to a restarted daemon until its next transition: the
    virtual addresses say which node is the master, and a hot standby that knows it is
    one writes the peer's changes into its kernel (in INIT it would not)."""
    stale = flow(7)._replace(tcp=TcpInfo(state=3))  # an old copy in B's kernel
    with caplog.at_level(logging.INFO, logger="replicator.daemon"):
        async with pair_factory("hot", held={"fw-a": {VIP}, "fw-b": set()},
                                b_holds=[stale]) as (a, b):
            await eventually(lambda: a.daemon.machine.settled and b.daemon.machine.settled)
            assert (a.daemon.role, b.daemon.role) == (Role.MASTER, Role.BACKUP)
            a.kernel.add_many(flow(i) for i in range(20))
            await eventually(lambda: kernel_view(b.kernel) == kernel_view(a.kernel))
            # A later line from keepalived takes over as usual.
            await b.call(Command.NOTIFY, 'INSTANCE "VI_1" MASTER 150')
            assert b.daemon.role is Role.MASTER
    said = [r.fields["state"] for r in caplog.records  # type: ignore[attr-defined]
            if r.getMessage() == "role taken from the virtual addresses"]
    assert sorted(said) == ["BACKUP", "MASTER"]


@pytest.mark.parametrize("addresses", ["some", "unreadable", "refused"])
async def test_the_role_waits_for_keepalived_when_the_addresses_do_not_tell(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, addresses: str) -> None:
    other = ipaddress.ip_address("10.0.0.1")
    cfg = with_vips(lone_config(tmp_path), VIP, other)

    def read(netns: str | None) -> set[IPAddress]:
        if addresses == "unreadable":
            raise OSError(errno.EPERM, "Operation not permitted")
        if addresses == "refused":
            raise KernelError("reading the addresses: (1, 'Operation not permitted')",
                              errno.EPERM)
        return {VIP}

    daemon = Daemon(cfg, FakeKernel(), environ={}, addresses=read)
    with caplog.at_level(logging.WARNING, logger="replicator.daemon"):
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            assert daemon.role is Role.INIT
            nursery.cancel_scope.cancel()
    [warning] = [r for r in caplog.records if "waits for keepalived" in r.getMessage()]
    if addresses == "some":
        assert (warning.fields["held"], warning.fields["missing"]) == (  # type: ignore[attr-defined]
            str(VIP), str(other))
    else:
        assert "not permitted" in warning.fields["error"]  # type: ignore[attr-defined]


async def test_a_line_from_keepalived_during_the_look_wins(tmp_path: Path) -> None:
    cfg = with_vips(lone_config(tmp_path), VIP)
    daemon: Daemon | None = None

    def read(netns: str | None) -> set[IPAddress]:
        # keepalived's line arrives while the addresses are read (they say BACKUP).
        assert daemon is not None
        trio.from_thread.run_sync(daemon.runner.feed, VrrpEvent(
            VrrpKind.INSTANCE, "VI_1", VrrpState.MASTER, 150))
        return set()

    daemon = Daemon(cfg, FakeKernel(), environ={}, addresses=read)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert daemon.role is Role.MASTER and daemon.machine.transitions == 1
        await eventually(lambda: daemon is not None and daemon.machine.settled)
        nursery.cancel_scope.cancel()


async def test_a_restarted_master_passes_its_check_with_the_peer_unreachable(
        tmp_path: Path) -> None:
    """In INIT a restarted master fails ``check`` until its peer is back and in sync,
    so keepalived's track_script would demote it for nothing; holding the virtual
    addresses, it is MASTER at once and passes."""
    cfg = with_vips(lone_config(tmp_path), VIP)  # fw-b never answers
    for held, expected in (({VIP}, {"ok": True, "reason": ""}),
                           (set(), {"ok": False, "reason": "peer not connected"})):
        daemon = Daemon(cfg, FakeKernel(), environ={}, addresses=addresses_of(held))
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            await eventually(lambda d=daemon: d.machine.settled)  # type: ignore[misc]
            assert await daemon.check() == expected
            nursery.cancel_scope.cancel()
