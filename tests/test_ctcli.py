"""``replicator ct dump|events`` against the in-memory kernel (the real one: integration/)."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from replicator import cli, ctcli
from replicator.ctformat import format_entry
from replicator.kernel_fake import FakeKernel, FakeSubscription
from replicator.model import (
    AF_INET,
    AF_INET6,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    CtTuple,
    Entry,
    Status,
    TcpFlag,
    TcpInfo,
    invert,
)

A = bytes([10, 0, 1, 2])
B = bytes([10, 0, 2, 2])
NAT = bytes([10, 0, 2, 1])
A6 = bytes.fromhex("fd000001000000000000000000000002")
B6 = bytes.fromhex("fd000002000000000000000000000002")

TCP = Entry(
    AF_INET, CtTuple(A, B, IPPROTO_TCP, 40000, 80), CtTuple(B, NAT, IPPROTO_TCP, 80, 40000),
    zone=3, status=Status.SEEN_REPLY | Status.ASSURED | Status.SRC_NAT, timeout=300,
    mark=42, labels=bytes([0x80]) + bytes(15),
    tcp=TcpInfo(3, 7, 7, TcpFlag.WINDOW_SCALE | TcpFlag.SACK_PERM, TcpFlag.SACK_PERM),
)
_PING = CtTuple(A6, B6, IPPROTO_ICMPV6, icmp_type=128, icmp_code=0, icmp_id=99)
PING6 = Entry(AF_INET6, _PING, invert(_PING), timeout=30)


class ScriptedKernel(FakeKernel):
    """A fake whose table changes right after the command subscribed."""

    def subscribe(self) -> FakeSubscription:
        sub = super().subscribe()
        stored = self.add(TCP)
        self.modify(stored.key, mark=7)
        self.overrun()
        self.add(PING6)
        self.remove(stored.key)
        return sub


def parser_with(kernel: FakeKernel, seen: list[str | None]) -> argparse.ArgumentParser:
    def factory(netns: str | None) -> FakeKernel:
        seen.append(netns)
        return kernel

    parser = argparse.ArgumentParser()
    ctcli.register(parser.add_subparsers(dest="command"), factory)
    return parser


def run(kernel: FakeKernel, argv: list[str]) -> tuple[int, list[str | None]]:
    seen: list[str | None] = []
    args = parser_with(kernel, seen).parse_args(argv)
    status: int = args.handler(args)
    return status, seen


def test_dump_json_lists_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    kernel = FakeKernel()
    kernel.add_many([TCP, PING6])
    status, seen = run(kernel, ["ct", "dump", "--json", "--netns", "fw1"])
    assert status == 0 and seen == ["fw1"]
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    tcp, ping = lines
    assert tcp == {
        "family": "ipv4", "proto": 6, "zone": 3,
        "orig": {"src": "10.0.1.2", "dst": "10.0.2.2", "sport": 40000, "dport": 80},
        "reply": {"src": "10.0.2.2", "dst": "10.0.2.1", "sport": 80, "dport": 40000},
        "status": ["SEEN_REPLY", "ASSURED", "CONFIRMED", "SRC_NAT"],
        "timeout": 300, "mark": 42, "labels": [7], "id": kernel.table[TCP.key].id,
        "tcp": {"state": "ESTABLISHED", "wscale_orig": 7, "wscale_reply": 7,
                "flags_orig": ["WINDOW_SCALE", "SACK_PERM"], "flags_reply": ["SACK_PERM"]},
    }
    assert ping["family"] == "ipv6"
    assert ping["orig"] == {"src": "fd00:1::2", "dst": "fd00:2::2", "type": 128, "code": 0,
                            "id": 99}
    assert ping["reply"]["type"] == 129
    assert ping["labels"] is None and "tcp" not in ping


def test_dump_text_uses_the_conntrack_format(capsys: pytest.CaptureFixture[str]) -> None:
    kernel = FakeKernel()
    kernel.add_many([TCP, PING6])
    status, seen = run(kernel, ["ct", "dump"])
    assert status == 0 and seen == [None]
    assert capsys.readouterr().out.splitlines() == [
        format_entry(e) for e in kernel.table.values()]


def test_events_json_until_count(capsys: pytest.CaptureFixture[str]) -> None:
    status, _ = run(ScriptedKernel(), ["ct", "events", "--json", "--count", "2"])
    assert status == 0
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines()]
    # The overrun made the first two events disappear; the rest arrive.
    assert [(e["event"], e["proto"]) for e in events] == [("new", 58), ("destroy", 6)]
    assert all(e["portid"] == 0 for e in events)
    assert events[1]["timeout"] is None  # DESTROY carries no timeout
    assert "overrun" in captured.err


async def test_events_text_prefixes_the_kind() -> None:
    kernel = ScriptedKernel()
    out, err = io.StringIO(), io.StringIO()
    status = await ctcli.events_command(kernel, as_json=False, out=out, err=err, count=2)
    assert status == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "[NEW] " + format_entry(kernel.table[PING6.key])
    assert lines[1].startswith("[DESTROY] ")
    assert err.getvalue() != ""


def test_the_real_parser_has_the_commands() -> None:
    args = cli.build_parser().parse_args(["ct", "events", "--json", "--netns", "x",
                                          "--count", "3"])
    assert (args.json, args.netns, args.count) == (True, "x", 3)
    assert args.handler is not None
