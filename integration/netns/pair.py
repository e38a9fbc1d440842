"""A running daemon pair (active + standby) in lab namespaces, for attack and fault tests.

Topology: three namespaces on one bridge (in a fourth, ``sw``), all in 10.77.0.0/24:
``act`` (10.77.0.1, the active), ``sby`` (10.77.0.2, the standby), ``x`` (10.77.0.3,
the attacker or the test's helpers). The sync link runs between ``act`` and ``sby``.

Entries are written into the active's table by a separate batched injector socket
(:class:`~replicator.kernel_linux.LinuxKernel` of the test process, entered into the
namespace): it stands in for traffic. The lab prefix is ignored by the daemons' filter,
so the sync connection and any attack connection tracked by the kernel never count.

Equality is checked on normalised entries: their ``conntrack -L`` text
(:func:`replicator.ctformat.format_entry`, the text projection: no id, no counters),
timeouts within :data:`TIMEOUT_SLACK`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from integration.netns.lab import Lab, Netns
from integration.netns.nodes import DaemonNode, NodeSpec, wait_for
from replicator import ctformat
from replicator.kernel_linux import LinuxKernel, dump
from replicator.model import (
    AF_INET,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    EntryKey,
    Status,
    TcpInfo,
    TcpState,
    invert,
)
from replicator.netns import entered

SUBNET = "10.77.0.0/24"
ACTIVE_IP, STANDBY_IP, ATTACKER_IP = "10.77.0.1", "10.77.0.2", "10.77.0.3"
PORT = 3790
#: Seconds an entry's remaining timeout may differ between two copies (the kernel's
#: keeps ticking; the copy got the value of the last event or refresh).
TIMEOUT_SLACK = 60
ENTRY_TIMEOUT = 3600


@dataclass
class Pair:
    """The lab's namespaces and the two daemons."""

    lab: Lab
    active: DaemonNode
    standby: DaemonNode
    attacker: Netns
    #: First entry number (:func:`synthetic`) no test has used yet on this pair.
    next_entry: int = 0
    #: Last octet of the next unused attacker address (:meth:`new_addresses`).
    next_host: int = 10

    def take_entries(self, count: int) -> int:
        """Reserve ``count`` entry numbers; return the first."""
        first = self.next_entry
        self.next_entry += count
        return first

    def new_addresses(self, count: int) -> list[str]:
        """``count`` fresh addresses on the attacker's interface (one per attack, so
        each attack's log lines can be told apart)."""
        first = self.next_host
        self.next_host += count
        return add_addresses(self.attacker, count, first)

    @property
    def nodes(self) -> tuple[DaemonNode, DaemonNode]:
        """Both daemons."""
        return self.active, self.standby


def make_pair(the_lab: Lab, workdir: Path, *, mode: str = "hot",
              active_extra: dict[str, list[str]] | None = None,
              standby_extra: dict[str, list[str]] | None = None,
              active_rcvbuf: int = 64 << 20, start: bool = True) -> Pair:
    """Create the namespaces, write both configs and (with ``start``) start the daemons.

    The active is told it is MASTER and the standby BACKUP (as keepalived would).
    """
    sw = the_lab.netns("sw")
    act, sby, x = the_lab.netns("act"), the_lab.netns("sby"), the_lab.netns("x")
    ports = []
    for ns, addr in ((act, ACTIVE_IP), (sby, STANDBY_IP), (x, ATTACKER_IP)):
        port = f"p{ns.name[-3:]}"
        the_lab.veth(sw, port, ns, "eth0")
        ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
        ports.append(port)
    the_lab.bridge(sw, "br0", ports)
    for ns in (act, sby):
        ns.sysctl("net.netfilter.nf_conntrack_events", 1)
    active = DaemonNode(the_lab, act, NodeSpec(
        name="act", peer_name="sby", listen_address=ACTIVE_IP, peer_address=STANDBY_IP,
        mode=mode, port=PORT, extra=active_extra or {}, rcvbuf_bytes=active_rcvbuf,
        ignore_addresses=(SUBNET,), vrrp_name="VI_1"), workdir)
    standby = DaemonNode(the_lab, sby, NodeSpec(
        name="sby", peer_name="act", listen_address=STANDBY_IP, peer_address=ACTIVE_IP,
        mode=mode, port=PORT, extra=standby_extra or {}, ignore_addresses=(SUBNET,),
        vrrp_name="VI_1"), workdir)
    pair = Pair(the_lab, active, standby, x)
    if start:
        start_pair(pair)
    return pair


def start_pair(pair: Pair) -> None:
    """Start both daemons, set their roles and wait for the link."""
    for node in pair.nodes:
        node.start()
    pair.active.notify("MASTER")
    pair.standby.notify("BACKUP")
    wait_for(lambda: all(n.status()["peer_up"] for n in pair.nodes), 30, "the sync link")


# --- entries ------------------------------------------------------------------------


def synthetic(start: int, count: int) -> list[Entry]:
    """Entries number ``start`` .. ``start + count - 1`` of a fixed family of distinct
    ESTABLISHED TCP entries (reply = plain inverse, so no reply tuple clashes).

    Sources walk 10.64.0.0/10 with 10 ports each: different ranges never overlap.
    """
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    dst = ipaddress.IPv4Address("192.0.2.1").packed
    out = []
    for i in range(start, start + count):
        orig = CtTuple((base + i // 10).to_bytes(4, "big"), dst, IPPROTO_TCP,
                       20000 + i % 10, 443)
        out.append(Entry(AF_INET, orig, invert(orig), status=Status.SEEN_REPLY | Status.ASSURED,
                         timeout=ENTRY_TIMEOUT, tcp=TcpInfo(TcpState.ESTABLISHED)))
    return out


class Writer:
    """Writes entries into one namespace's table (stands in for traffic there)."""

    def __init__(self, ns: Netns) -> None:
        self.ns = ns

    def upsert(self, entries: Sequence[Entry]) -> None:
        """Create or update ``entries``; every one must be applied."""
        self._run("upsert", entries)

    def delete(self, entries: Sequence[Entry]) -> None:
        """Delete ``entries``."""
        self._run("delete", entries)

    def _run(self, op: str, entries: Sequence[Entry]) -> None:
        async def go() -> None:
            async with LinuxKernel(self.ns.name) as kernel:
                result = await getattr(kernel, op)(entries)
            if result.errors:
                raise AssertionError(f"{op}: {len(result.errors)} failed: {result.errors[:3]}")

        trio.run(go)


def kernel_table(ns: Netns) -> list[Entry]:
    """The namespace's conntrack table (dumped on a socket of its own)."""
    return trio.run(dump, ns.name)


# --- comparison ---------------------------------------------------------------------

#: The lab /24 as the first three bytes of an IPv4 address (a fast membership test).
_LAB = ipaddress.ip_network(SUBNET).network_address.packed[:3]


def _in_lab(entry: Entry) -> bool:
    o, r = entry.orig, entry.reply
    return _LAB in (o.src[:3], o.dst[:3], r.src[:3], r.dst[:3])


def normalise(entries: Iterable[Entry]) -> dict[EntryKey, Entry]:
    """Entries keyed, reduced to their text projection, lab traffic left out."""
    out = {}
    for entry in entries:
        if entry.family == AF_INET and _in_lab(entry):
            continue
        e = ctformat.text_projection(entry)
        out[e.key] = e
    return out


def differences(expected: dict[EntryKey, Entry], actual: dict[EntryKey, Entry],
                limit: int = 5) -> list[str]:
    """How ``actual`` differs from ``expected`` (empty if equal within the slack)."""
    problems: list[str] = []
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    if missing or extra:
        problems.append(f"{len(missing)} missing, {len(extra)} extra "
                        f"(of {len(expected)} expected)")
    for key in expected.keys() & actual.keys():
        a, b = expected[key], actual[key]
        if a._replace(timeout=None) != b._replace(timeout=None):
            problems.append(f"differs: {a} != {b}")
        elif abs((a.timeout or 0) - (b.timeout or 0)) > TIMEOUT_SLACK:
            problems.append(f"timeout {a.timeout} != {b.timeout}")
        if len(problems) >= limit:
            break
    return problems


#: A normalised line's timeout: the number after the family and protocol columns.
_TIMEOUT = re.compile(r"^(\S+ +\d+ \S+ +\d+) (\d+) ")
_LAB_TEXT = "=" + SUBNET.rsplit(".", 1)[0] + "."


def text_table(lines: Iterable[str]) -> dict[str, int]:
    """Normalised ``conntrack -L`` lines as {line without its timeout: timeout (-1 if
    none)}, lab traffic left out. Comparing text is what ``conntrack -L`` equality
    means, and it is several times cheaper than parsing large tables back."""
    out = {}
    for line in lines:
        if _LAB_TEXT in line:
            continue
        m = _TIMEOUT.match(line)
        if m is None:
            out[line] = -1
        else:
            out[m[1] + line[m.end() - 1:]] = int(m[2])
    return out


def entries_text(entries: Iterable[Entry]) -> dict[str, int]:
    """:func:`text_table` of entries (e.g. a kernel dump)."""
    return text_table(ctformat.format_entry(e) for e in entries if not _in_lab(e))


def text_differences(expected: dict[str, int], actual: dict[str, int],
                     limit: int = 3) -> list[str]:
    """How ``actual`` differs from ``expected`` (empty if equal, timeouts within the
    slack): counts and a few examples."""
    missing = expected.keys() - actual.keys()
    extra = actual.keys() - expected.keys()
    problems = []
    if missing or extra:
        problems.append(f"{len(missing)} missing (e.g. {sorted(missing)[:limit]}), "
                        f"{len(extra)} extra (e.g. {sorted(extra)[:limit]}) "
                        f"of {len(expected)} expected")
    late = [k for k in expected.keys() & actual.keys()
            if abs(expected[k] - actual[k]) > TIMEOUT_SLACK]
    if late:
        problems.append(f"{len(late)} timeouts differ, e.g. {late[0]}: "
                        f"{expected[late[0]]} != {actual[late[0]]}")
    return problems


def external_cache(node: DaemonNode) -> dict[str, int]:
    """The node's external cache (``replicator dump --external``) as a text table."""
    return text_table(node.cli("dump", "--external")["entries"])


def pair_differences(pair: Pair, *, hot: bool = True) -> list[str]:
    """How the standby's external cache (and, in hot mode, kernel) differ from the
    active's table."""
    truth = entries_text(kernel_table(pair.active.ns))
    problems = [f"external: {p}" for p in text_differences(truth, external_cache(pair.standby))]
    if hot:
        kernel = entries_text(kernel_table(pair.standby.ns))
        problems += [f"standby kernel: {p}" for p in text_differences(truth, kernel)]
    return problems


def counts_match(pair: Pair, *, hot: bool = True) -> bool:
    """The link is up and the standby's external cache (and, with ``hot``, its kernel)
    has as many entries as the active's internal cache: a cheap necessary condition
    of equality (the standby's kernel must hold nothing of its own)."""
    act, sby = pair.active.status(), pair.standby.status()
    want = act["entries"]["internal"]
    return bool(act["peer_up"] and sby["peer_up"] and sby["entries"]["external"] == want
                and (not hot or sby["entries"]["kernel"] == want))


def converge(pair: Pair, timeout: float, what: str, *, hot: bool = True) -> float:
    """Wait until the standby equals the active exactly; print and return the seconds.

    Raises AssertionError with the remaining differences if it never does.
    """
    start = time.monotonic()
    problems: list[str] = []
    while time.monotonic() - start < timeout:
        # Cheap first (large tables take seconds to dump and compare): the counts.
        if not counts_match(pair, hot=hot):
            problems = ["entry counts differ"]
            time.sleep(0.5)
            continue
        problems = pair_differences(pair, hot=hot)
        if not problems:
            seconds = time.monotonic() - start
            print(f"converged after {what}: {seconds:.2f} s")
            return seconds
        time.sleep(0.5)
    raise AssertionError(f"no convergence {timeout} s after {what}: {problems}\n"
                         f"active log:\n{pair.active.log_tail(15)}\n"
                         f"standby log:\n{pair.standby.log_tail(15)}")


def stats(node: DaemonNode) -> dict[str, Any]:
    """``replicator stats --json``."""
    result: dict[str, Any] = node.cli("stats")
    return result


def log_lines(node: DaemonNode, needle: str) -> list[str]:
    """Lines of the node's log containing ``needle``."""
    return [line for line in node.log.read_text(errors="replace").splitlines()
            if needle in line]


def set_config(node: DaemonNode, key: str, value: str) -> None:
    """Replace the line ``key = ...`` of the node's config file (first occurrence)
    with ``key = value`` (``value`` is TOML, e.g. ``'"10.0.0.1"'``)."""
    lines = node.config.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.split("=", 1)[0].strip() == key:
            lines[i] = f"{key} = {value}"
            node.config.write_text("\n".join(lines) + "\n")
            return
    raise KeyError(f"{key} not in {node.config}")


def toml_paths(paths: Iterable[Path]) -> str:
    """A TOML array of paths."""
    return "[" + ", ".join(f'"{p}"' for p in paths) + "]"


def connect_from(ns: Netns, source: str, target: tuple[str, int],
                 timeout: float = 10.0) -> socket.socket:
    """A TCP connection from ``source`` in ``ns`` to ``target`` (blocking, ``timeout``)."""
    with entered(ns.name):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(target)
    except OSError:
        sock.close()
        raise
    return sock


def add_addresses(ns: Netns, count: int, first: int = 10) -> list[str]:
    """Give ``ns``'s eth0 ``count`` more addresses 10.77.0.<first>...; return them."""
    addresses = [f"10.77.0.{first + i}" for i in range(count)]
    for addr in addresses:
        ns.run(["ip", "addr", "add", f"{addr}/24", "dev", "eth0"])
    return addresses


class BackgroundWrites:
    """Creates entries in a thread, a batch every ``interval`` s, while a block runs.

    ``with BackgroundWrites(writer, start) as bg: ...`` then ``bg.next`` is the first
    entry number not used (the entries written are ``start .. bg.next - 1``).
    """

    def __init__(self, writer: Writer, start: int, batch: int = 50,
                 interval: float = 0.2) -> None:
        self.writer, self.start, self.next = writer, start, start
        self._batch, self._interval = batch, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.writer.upsert(synthetic(self.next, self._batch))
                self.next += self._batch
                self._stop.wait(self._interval)
        except BaseException as exc:  # reported by __exit__
            self._error = exc

    def __enter__(self) -> BackgroundWrites:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self.next == self.start:
            raise AssertionError("no entry was written in the background")


def reload(node: DaemonNode) -> None:
    """SIGHUP the daemon and wait until it logged that it reloaded."""
    assert node.proc is not None
    done = len(log_lines(node, "reloaded"))
    os.kill(node.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(log_lines(node, "reloaded")) > done, 20, f"{node.spec.name} reload")


def restart(node: DaemonNode, role: str) -> None:
    """Stop the daemon cleanly, start it again and restore its keepalived role."""
    node.stop()
    node.start()
    node.notify(role)
