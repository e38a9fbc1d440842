"""Capture real ctnetlink messages from the kernel, to regenerate ``tests/data``.

Run as root: ``.venv/bin/python -m integration.netns.capture [tests/data]``.

A three-namespace lab (client -- fw -- server) with an nftables ruleset on ``fw`` that
masquerades, DNATs (v4 and v6), sets ``ct mark``, ``ct label`` and a ``ct zone`` on some
flows and attaches the FTP helper; TCP/UDP/ICMP/ICMPv6 traffic (including an FTP
passive-mode exchange so a related entry with a master appears) crosses ``fw``. SCTP and
GRE entries cannot be produced by packets here (no SCTP sockets, no GRE devices in this
kernel), so they are created through ctnetlink and then appear in events and dumps like
any other. Recorded on ``fw``, with ``nf_conntrack_events=1``:

* every event datagram (groups NEW, UPDATE, DESTROY), including the DESTROY events of
  a final flush;
* the datagrams of a full dump taken while the table is populated, and the text that
  ``conntrack -L -o extended,labels`` printed right after it (see
  :func:`conntrack_listing` for how labels are printed as bit numbers).

Files written: ``ctnetlink.bin`` (records ``u8 kind, u32 length, bytes``; kind 0 = event
datagram, 1 = dump datagram, native byte order) and ``conntrack-L.txt``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from integration.netns.lab import Lab, Netns, lab, run
from replicator import ctnetlink
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_GRE,
    IPPROTO_SCTP,
    IPPROTO_UDP,
    IPPROTO_UDPLITE,
    CtTuple,
    Entry,
    SctpInfo,
    SctpState,
    Status,
    invert,
)
from replicator.netlink import NETLINK_NETFILTER
from replicator.netns import entered

EVENT, DUMP = 0, 1
RECORD = struct.Struct("=BI")
FIXTURE = "ctnetlink.bin"
TEXT = "conntrack-L.txt"
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
#: NFNLGRP_CONNTRACK_NEW, _UPDATE, _DESTROY.
CT_GROUPS = (1, 2, 3)

RULESET = """
table inet cap {
    ct helper ftp-std { type "ftp" protocol tcp; }
    chain raw_pre {
        type filter hook prerouting priority raw;
        udp dport 5353 ct zone set 7
        udp sport 5353 ct zone set 7
    }
    chain pre {
        type nat hook prerouting priority dstnat;
        ip daddr 10.0.1.1 tcp dport 8080 dnat ip to 10.0.2.2:80
        ip6 daddr fd01::1 tcp dport 8080 dnat ip6 to [fd02::2]:80
    }
    chain forward {
        type filter hook forward priority filter;
        tcp dport 21 ct helper set "ftp-std"
        ct state new tcp dport 80 ct mark set 0x2a
        ct state new udp dport 53 ct label set 3
        ct state new ip6 nexthdr tcp ct label set 100
    }
    chain post {
        type nat hook postrouting priority srcnat;
        oifname "fw-s" ip saddr 10.0.1.0/24 masquerade
        oifname "fw-s" ip6 saddr fd01::/64 masquerade
    }
}
"""

# Small servers (run in the server namespace): TCP 80/21 on v4+v6, UDP 53/5353 echo,
# a passive-mode FTP dialogue on 21 with a data listener on port 10000.
SERVER = r"""
import socket, threading
def tcp(port, fam, handler):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port)); s.listen(64)
    def loop():
        while True:
            c, _ = s.accept()
            threading.Thread(target=handler, args=(c,), daemon=True).start()
    threading.Thread(target=loop, daemon=True).start()
def http(c):
    c.recv(1024); c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello"); c.close()
def ftp(c):
    c.sendall(b"220 ready\r\n"); c.recv(1024)
    c.sendall(b"227 Entering Passive Mode (10,0,2,2,39,16).\r\n"); c.recv(1024); c.close()
def data(c):
    c.sendall(b"x" * 100); c.close()
held = []
def hold(c):
    held.append(c); c.recv(1024); c.sendall(b"ok")
for fam in (socket.AF_INET, socket.AF_INET6):
    tcp(80, fam, http)
    tcp(7, fam, hold)
tcp(21, socket.AF_INET, ftp)
tcp(10000, socket.AF_INET, data)
def udp(port, fam):
    s = socket.socket(fam, socket.SOCK_DGRAM)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", port))
    def loop():
        while True:
            d, a = s.recvfrom(2048); s.sendto(d, a)
    threading.Thread(target=loop, daemon=True).start()
for fam in (socket.AF_INET, socket.AF_INET6):
    udp(53, fam); udp(5353, fam)
print("ready", flush=True)
threading.Event().wait()
"""

CLIENT = r"""
import socket, time
def get(addr, port, fam):
    c = socket.create_connection((addr, port), timeout=5)
    c.sendall(b"GET / HTTP/1.0\r\n\r\n")
    while c.recv(1024): pass
    c.close()
for _ in range(3):
    get("10.0.2.2", 80, socket.AF_INET)
    get("10.0.1.1", 8080, socket.AF_INET)
    get("fd02::2", 80, socket.AF_INET6)
    get("fd01::1", 8080, socket.AF_INET6)
for addr, fam in (("10.0.2.2", socket.AF_INET), ("fd02::2", socket.AF_INET6)):
    for port in (53, 5353):
        u = socket.socket(fam, socket.SOCK_DGRAM); u.settimeout(5)
        u.sendto(b"ping", (addr, port)); u.recv(100); u.close()
c = socket.create_connection(("10.0.2.2", 21), timeout=5)
c.recv(1024); c.sendall(b"PASV\r\n"); c.recv(1024)
d = socket.create_connection(("10.0.2.2", 10000), timeout=5)
while d.recv(1024): pass
d.close(); c.sendall(b"QUIT\r\n"); c.close()
# Long-lived connections so the dump sees ESTABLISHED entries with window scaling.
kept = []
for addr in ("10.0.2.2", "fd02::2"):
    k = socket.create_connection((addr, 7), timeout=5)
    k.sendall(b"hi"); k.recv(10); kept.append(k)
# Unanswered: a SYN the server drops (SYN_SENT, [UNREPLIED]) and UDP to a closed port.
try:
    socket.create_connection(("10.0.2.2", 9), timeout=0.3)
except OSError:
    pass
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.sendto(b"x", ("10.0.2.2", 9999)); u.close()
print("done", flush=True)
time.sleep(60)
"""


def build(the_lab: Lab) -> tuple[Netns, Netns, Netns]:
    """client -- fw -- server, v4 and v6, forwarding and the capture ruleset on fw."""
    client, fw, server = the_lab.netns("c"), the_lab.netns("fw"), the_lab.netns("s")
    the_lab.veth(client, "c-fw", fw, "fw-c")
    the_lab.veth(fw, "fw-s", server, "s-fw")
    for ns, script in (
        (client, "ip addr add 10.0.1.2/24 dev c-fw; ip -6 addr add fd01::2/64 dev c-fw nodad;"
                 "ip route add default via 10.0.1.1; ip -6 route add default via fd01::1"),
        (fw, "ip addr add 10.0.1.1/24 dev fw-c; ip addr add 10.0.2.1/24 dev fw-s;"
             "ip -6 addr add fd01::1/64 dev fw-c nodad; ip -6 addr add fd02::1/64 dev fw-s nodad"),
        (server, "ip addr add 10.0.2.2/24 dev s-fw; ip -6 addr add fd02::2/64 dev s-fw nodad;"
                 "ip route add default via 10.0.2.1; ip -6 route add default via fd02::1"),
    ):
        ns.sh(script)
    fw.sysctl("net.ipv4.ip_forward", 1)
    fw.sysctl("net.ipv6.conf.all.forwarding", 1)
    fw.sysctl("net.netfilter.nf_conntrack_events", 1)
    # Counters and timestamps: attributes the decoder must skip, fields the text
    # parser must drop.
    fw.sysctl("net.netfilter.nf_conntrack_acct", 1)
    fw.sysctl("net.netfilter.nf_conntrack_timestamp", 1)
    fw.nft(RULESET)
    server.nft("table inet sink {\n chain input {\n type filter hook input priority 0;\n"
               " tcp dport 9 drop\n }\n}\n")
    return client, fw, server


# conntrack prints label *names* from /etc/xtables/connlabel.conf (compiled-in path, no
# override). To get bit numbers without touching the host's /etc, the listing runs in a
# private mount namespace with an overlay on /etc that holds a connlabel.conf naming
# every bit by its decimal number.
_LISTING = """
mount -t overlay overlay -o lowerdir=/etc,upperdir="$1/upper",workdir="$1/work" /etc
mkdir -p /etc/xtables
i=0
while [ $i -lt 128 ]; do echo "$i $i"; i=$((i + 1)); done > /etc/xtables/connlabel.conf
exec ip netns exec "$2" conntrack -L -o extended,labels
"""


def conntrack_listing(ns: Netns) -> str:
    """``conntrack -L -o extended,labels`` inside ``ns``, labels printed as bit numbers."""
    with tempfile.TemporaryDirectory(prefix="rp-connlabel-") as tmp:
        os.mkdir(os.path.join(tmp, "upper"))
        os.mkdir(os.path.join(tmp, "work"))
        return run(["unshare", "--mount", "--propagation", "private",
                    "sh", "-ec", _LISTING, "listing", tmp, ns.name]).stdout


def open_socket(ns: Netns, groups: tuple[int, ...] = ()) -> socket.socket:
    """A raw NETLINK_NETFILTER socket created inside ``ns``, joined to ``groups``."""
    with entered(ns.name):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
    sock.bind((0, 0))
    for group in groups:
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)
    return sock


def drain(sock: socket.socket) -> Iterator[bytes]:
    """Every datagram queued on ``sock`` (non-blocking)."""
    sock.setblocking(False)
    while True:
        try:
            yield sock.recv(1 << 16)
        except BlockingIOError:
            return


def request(sock: socket.socket, messages: list[bytes]) -> list[tuple[int, int]]:
    """Send request messages (each asking for an ACK) and collect ``(seq, errno)``."""
    sock.setblocking(True)
    sock.send(b"".join(messages))
    acks: list[tuple[int, int]] = []
    while len(acks) < len(messages):
        acks.extend(ctnetlink.parse_acks(sock.recv(1 << 16)))
    return acks


def dump(sock: socket.socket, family: int = 0) -> list[bytes]:
    """The raw datagrams of one full dump."""
    sock.setblocking(True)
    sock.send(ctnetlink.encode_dump_request(1, family))
    datagrams = []
    while True:
        data = sock.recv(1 << 20)
        datagrams.append(data)
        if ctnetlink.decode_dump(data)[1]:
            return datagrams


def synthetic_entries() -> list[Entry]:
    """Entries packets cannot make here: SCTP (with vtags), GRE (with keys), UDP-Lite."""
    a, b = bytes([10, 0, 1, 2]), bytes([10, 0, 2, 2])
    a6, b6 = bytes.fromhex("fd01" + "00" * 13 + "02"), bytes.fromhex("fd02" + "00" * 13 + "02")
    status = Status.SEEN_REPLY | Status.ASSURED
    sctp = CtTuple(a, b, IPPROTO_SCTP, 5000, 38412)
    sctp6 = CtTuple(a6, b6, IPPROTO_SCTP, 5001, 38412)
    gre = CtTuple(a, b, IPPROTO_GRE, 0x1234, 0x5678)
    lite = CtTuple(a6, b6, IPPROTO_UDPLITE, 7000, 7001)
    return [
        Entry(AF_INET, sctp, invert(sctp), status=status, timeout=300, mark=5,
              sctp=SctpInfo(SctpState.ESTABLISHED, 0xDEADBEEF, 0x01020304)),
        Entry(AF_INET6, sctp6, invert(sctp6), zone=9, status=status, timeout=300,
              sctp=SctpInfo(SctpState.COOKIE_WAIT, 7, 0)),
        Entry(AF_INET, gre, invert(gre), status=status, timeout=600),
        Entry(AF_INET6, lite, invert(lite), timeout=120, mark=0xFFFFFFFF),
    ]


def expiring_entry() -> Entry:
    """An entry that times out during the run: the dump evicts it, and its DESTROY
    event then carries no CTA_TIMEOUT (the kernel omits a zero timeout)."""
    t = CtTuple(bytes([10, 0, 1, 2]), bytes([10, 0, 2, 2]), IPPROTO_UDP, 4444, 4445)
    return Entry(AF_INET, t, invert(t), timeout=1)


def capture(out: Path) -> None:
    """Run the scenario and write the fixture files into ``out``."""
    with lab("cap") as the_lab:
        client, fw, server = build(the_lab)
        events = open_socket(fw, CT_GROUPS)
        control = open_socket(fw)
        srv = the_lab.spawn(server, [sys.executable, "-c", SERVER], stdout=-1)
        assert srv.stdout is not None
        srv.stdout.readline()
        request(control, [ctnetlink.encode_create(expiring_entry(), 99, ack=True)])
        client.run(["ping", "-c", "2", "-i", "0.2", "10.0.2.2"])
        client.run(["ping", "-6", "-c", "2", "-i", "0.2", "fd02::2"])
        cli = the_lab.spawn(client, [sys.executable, "-c", CLIENT], stdout=-1)
        assert cli.stdout is not None
        cli.stdout.readline()
        injected = [ctnetlink.encode_create(e, seq, ack=True)
                    for seq, e in enumerate(synthetic_entries(), 100)]
        bad = [ack for ack in request(control, injected) if ack[1] != 0]
        if bad:
            raise RuntimeError(f"injecting synthetic entries failed: {bad} "
                               f"({[os.strerror(e) for _, e in bad]})")
        time.sleep(1.2)  # the expiring entry is gone by now
        records = [(EVENT, d) for d in drain(events)]
        records += [(DUMP, d) for d in dump(control)]
        text = conntrack_listing(fw)
        fw.run(["conntrack", "-F"])
        time.sleep(0.3)
        records += [(EVENT, d) for d in drain(events)]
        events.close()
        control.close()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / FIXTURE, "wb") as f:
        for kind, data in records:
            f.write(RECORD.pack(kind, len(data)) + data)
    (out / TEXT).write_text(text)


def load(path: Path) -> list[tuple[int, bytes]]:
    """Read a fixture written by :func:`capture`: ``[(kind, datagram), ...]``."""
    raw = path.read_bytes()
    records = []
    off = 0
    while off < len(raw):
        kind, length = RECORD.unpack_from(raw, off)
        off += RECORD.size
        records.append((kind, raw[off : off + length]))
        off += length
    return records


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
    try:
        capture(target)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            sys.exit("capture needs root (it creates network namespaces)")
        raise
    print(f"wrote {target / FIXTURE} and {target / TEXT}")
