"""What replicator reads from the kernel equals what ``conntrack -L`` shows, field by field.

Real TCP, UDP and ICMP flows (IPv4 and IPv6) cross a firewall namespace that masquerades,
forwards a port (DNAT), sets a ct mark, a ct label and a ct zone (``firewall.py``). The
table is then read three ways and compared with conntrack-tools' listing, the reference:

* through the **event source**: the mirror starts on an empty table, so every entry of
  its cache was built from events alone (NEW/UPDATE merged; DESTROY removed);
* through the **dump** (:meth:`LinuxKernel.dump`);
* through the **command** ``replicator ct dump [--json] --netns``.

Every field the text form shows must match, the timeout within 2 s (a cached entry's
timeout is the one its last event reported, so it is aged by the time since that event).
The cache and the dump must also agree on the fields the text form cannot show (all status
bits, TCP window scales and flags, ids). The test checks that the compared set really
contains masqueraded, DNATed, marked, labelled and zoned entries of both families.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import trio

from integration.netns import firewall
from integration.netns.firewall import Flows, Topology
from integration.netns.lab import Lab
from replicator.cache import Change
from replicator.ctcli import entry_to_json
from replicator.ctformat import parse_conntrack_output, text_projection
from replicator.kernel_linux import LinuxKernel
from replicator.mirror import Mirror
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    CtTuple,
    Entry,
    EntryKey,
    Status,
    TcpState,
    dnat_target,
    invert,
    snat_target,
)
from replicator.record import key as packed_key
from replicator.record import unpack_key

TOLERANCE = 2
REPO = Path(__file__).resolve().parents[2]


def reference(topo: Topology) -> dict[EntryKey, Entry]:
    """The table as conntrack-tools lists it (labels as bit numbers)."""
    text = firewall.conntrack(topo.fw, ["-L", "-o", "extended,labels"])
    entries = parse_conntrack_output(text)
    table = {e.key: e for e in entries}
    assert len(table) == len(entries)
    return table


def make_traffic(topo: Topology) -> Flows:
    """Closed TCP flows (TIME_WAIT), open ones of every kind, pings; the open flows."""
    closed = topo.open_flows([("tcp", firewall.SERVER.v4, firewall.ECHO_PORT),
                              ("tcp", firewall.FW_LAN.v6, firewall.FORWARD_PORT)])
    closed.close()
    flows = topo.open_flows(firewall.standard_flows())
    topo.ping(4)
    topo.ping(6)
    return flows


def assert_cases_present(table: dict[EntryKey, Entry]) -> None:
    """The compared set holds every case the ruleset makes, for both families."""
    entries = list(table.values())
    for family in (AF_INET, AF_INET6):
        mine = [e for e in entries if e.family == family]
        protos = {e.orig.proto for e in mine}
        icmp = IPPROTO_ICMP if family == AF_INET else IPPROTO_ICMPV6
        assert {IPPROTO_TCP, IPPROTO_UDP, icmp} <= protos, protos
        assert any(snat_target(e) for e in mine), "no masqueraded entry"
        assert any(dnat_target(e) and snat_target(e) for e in mine), "no DNAT entry"
        assert any(e.mark == firewall.MARK for e in mine), "no marked entry"
        label = (1 << firewall.LABEL_BIT).to_bytes(16, "little")
        assert any(e.labels == label for e in mine), "no labelled entry"
        assert any(e.zone == firewall.ZONE for e in mine), "no zoned entry"
        states = {e.tcp.state for e in mine if e.tcp is not None}
        assert {TcpState.ESTABLISHED, TcpState.TIME_WAIT} <= states, states
        assert any(e.status & Status.ASSURED for e in mine)


def assert_matches_text(name: str, ours: dict[EntryKey, Entry],
                        ref: dict[EntryKey, Entry], age: dict[EntryKey, float]) -> None:
    """``ours`` shows exactly what ``ref`` shows; timeouts (aged by ``age``) within 2 s."""
    assert ours.keys() == ref.keys(), f"{name}: different entries"
    for key, theirs in ref.items():
        mine = text_projection(ours[key])
        assert mine._replace(timeout=None) == theirs._replace(timeout=None), name
        assert mine.timeout is not None and theirs.timeout is not None
        expected = mine.timeout - age.get(key, 0.0)
        assert abs(expected - theirs.timeout) <= TOLERANCE, (name, mine, theirs)


async def test_event_source_and_dump_match_conntrack(netlab: Lab) -> None:
    topo = firewall.build(netlab)
    topo.start_server()
    arrived: dict[EntryKey, float] = {}

    def record(changes: list[Change]) -> None:
        now = trio.current_time()
        for key, _, _ in changes:
            arrived[unpack_key(key)] = now

    async with LinuxKernel(topo.fw.name) as port:
        mirror = Mirror(port, record)
        async with trio.open_nursery() as nursery:
            await nursery.start(mirror.run)
            assert len(mirror.cache) == 0  # everything below comes from events
            flows = await trio.to_thread.run_sync(make_traffic, topo)
            dump: list[Entry] = []
            with trio.fail_after(10):
                while {e.key for e in dump} != mirror.cache.snapshot().keys():
                    await trio.sleep(0.1)
                    dump = await port.dump()
            ref = await trio.to_thread.run_sync(reference, topo)
            listed_at = trio.current_time()
            dump = await port.dump()
            cache = mirror.cache.snapshot()
            nursery.cancel_scope.cancel()
    flows.close()

    assert mirror.stats.overruns == 0 and mirror.stats.reconciliations == 1
    assert_cases_present(ref)
    age = {key: listed_at - arrived[key] for key in cache}
    assert_matches_text("events", cache, ref, age)
    dumped = {e.key: e for e in dump}
    assert_matches_text("dump", dumped, ref, {})
    # What the text cannot show: events and dump agree on every other field too.
    for key, entry in dumped.items():
        assert cache[key]._replace(timeout=None) == entry._replace(timeout=None)


def replicator_ct_dump(topo: Topology, *options: str) -> str:
    return subprocess.run(
        [sys.executable, "-m", "replicator.cli", "ct", "dump", *options,
         "--netns", topo.fw.name],
        capture_output=True, text=True, check=True, cwd=REPO, timeout=60,
    ).stdout


def test_ct_dump_command_matches_conntrack(netlab: Lab) -> None:
    topo = firewall.build(netlab)
    topo.start_server()
    flows = make_traffic(topo)
    # The reference between the two runs, so each is compared with a listing taken
    # within a second or so of it.
    text = replicator_ct_dump(topo)
    ref = reference(topo)
    lines = replicator_ct_dump(topo, "--json").splitlines()
    flows.close()

    assert_cases_present(ref)
    listed = {e.key: e for e in parse_conntrack_output(text)}
    assert_matches_text("ct dump", listed, ref, {})

    by_orig = {json.dumps([v["family"], v["zone"], v["orig"]]): v for v in map(
        entry_to_json, ref.values())}
    assert len(lines) == len(by_orig)
    for line in lines:
        ours = json.loads(line)
        theirs = by_orig[json.dumps([ours["family"], ours["zone"], ours["orig"]])]
        for field in ("proto", "reply", "mark", "labels"):
            assert ours[field] == theirs[field], field
        assert ("ASSURED" in ours["status"]) == ("ASSURED" in theirs["status"])
        assert ("SEEN_REPLY" in ours["status"]) == ("SEEN_REPLY" in theirs["status"])
        assert ours.get("tcp", {}).get("state") == theirs.get("tcp", {}).get("state")
        assert abs(ours["timeout"] - theirs["timeout"]) <= TOLERANCE


def test_ct_events_command_reports_real_events(netlab: Lab) -> None:
    topo = firewall.build(netlab)
    with subprocess.Popen(
        [sys.executable, "-m", "replicator.cli", "ct", "events", "--json", "--count", "2",
         "--netns", topo.fw.name],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    ) as proc:
        try:
            # The command subscribes some time after it starts: ping until it has seen
            # two events (a ping makes a NEW event, and an UPDATE when the reply passes).
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                topo.ping(4)
                time.sleep(0.1)
            out, _ = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert len(events) == 2
    assert {e["event"] for e in events} <= {"new", "update", "destroy"}
    assert all(e["proto"] == IPPROTO_ICMP and e["orig"]["src"] == firewall.CLIENT.v4
               and e["reply"]["dst"] == firewall.FW_WAN.v4 and e["portid"] == 0
               for e in events)


async def test_own_injections_are_cached_as_echoes(netlab: Lab) -> None:
    ns = netlab.netns("fw")
    published: list[Change] = []
    async with LinuxKernel(ns.name) as port:
        mirror = Mirror(port, published.extend)
        orig = firewall_tuple()
        entry = Entry(AF_INET, orig, invert(orig), status=Status.SEEN_REPLY, timeout=100)
        async with trio.open_nursery() as nursery:
            await nursery.start(mirror.run)
            result = await port.upsert([entry])
            assert result.errors == []
            for _ in range(200):
                if packed_key(entry) in mirror.cache:
                    break
                await trio.sleep(0.05)
            assert mirror.stats.echoes >= 1
            assert published == []  # never sent back to the peer
            cached = mirror.cache.get(packed_key(entry))
            assert cached is not None and cached.reply == entry.reply
            nursery.cancel_scope.cancel()


def firewall_tuple() -> CtTuple:
    return CtTuple(bytes([10, 9, 8, 7]), bytes([10, 9, 8, 1]), IPPROTO_UDP, 5555, 53)
