"""``replicator ct dump`` and ``replicator ct events``: the table, like ``conntrack -L`` / ``-E``.

Both read the kernel through the same port as the daemon (:mod:`replicator.kernel_linux`),
so they double as a check of what the daemon sees. Text output is one line per entry in
``conntrack -L -o extended`` style (:func:`replicator.ctformat.format_entry`); events are
prefixed ``[NEW]``/``[UPDATE]``/``[DESTROY]`` as ``conntrack -E`` does. ``--json`` prints
one JSON object per line (:func:`entry_to_json`; events add ``"event"`` and ``"portid"``).
An event overrun (lost events) is reported on stderr and the command carries on.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Callable
from typing import Any, Protocol, TextIO

import trio

from . import record as R
from .kernel import Overrun, Subscription
from .model import (
    AF_INET,
    AF_INET6,
    ICMP_PROTOCOLS,
    CtEvent,
    CtTuple,
    Entry,
    EventKind,
    NewRecord,
    SctpState,
    Status,
    TcpFlag,
    TcpState,
)


class TableReader(Protocol):
    """The part of a kernel port the commands need (any KernelPort has it)."""

    def subscribe(self) -> Subscription: ...

    async def dump(self) -> list[Entry]: ...

    async def aclose(self) -> None: ...


#: Makes the reader for ``--netns`` (replaced by tests with a fake kernel).
ReaderFactory = Callable[[str | None], TableReader]

_FAMILIES = {AF_INET: "ipv4", AF_INET6: "ipv6"}


def _address(family: int, raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if family == AF_INET6 else socket.AF_INET, raw)


def _flag_names(value: int, flags: type[Status] | type[TcpFlag]) -> list[str]:
    return [str(flag.name) for flag in flags if value & flag]


def _enum_name(kind: type[TcpState] | type[SctpState], value: int) -> str | int:
    try:
        return str(kind(value).name)
    except ValueError:
        return value


def _tuple_json(family: int, t: CtTuple) -> dict[str, Any]:
    out: dict[str, Any] = {"src": _address(family, t.src), "dst": _address(family, t.dst)}
    if t.proto in ICMP_PROTOCOLS:
        out.update(type=t.icmp_type, code=t.icmp_code, id=t.icmp_id)
    else:
        out.update(sport=t.sport, dport=t.dport)
    return out


def entry_to_json(entry: Entry) -> dict[str, Any]:
    """A JSON-ready view of an entry: addresses as text, flags by name, labels as bits.

    Fields an event did not carry are ``null``.
    """
    family = entry.family
    out: dict[str, Any] = {
        "family": _FAMILIES.get(family, str(family)),
        "proto": entry.orig.proto,
        "zone": entry.zone,
        "orig": _tuple_json(family, entry.orig),
        "reply": _tuple_json(family, entry.reply),
        "status": _flag_names(entry.status, Status),
        "timeout": entry.timeout,
        "mark": entry.mark,
        "labels": None if entry.labels is None else [
            bit for bit in range(len(entry.labels) * 8)
            if entry.labels[bit // 8] >> (bit % 8) & 1
        ],
        "id": entry.id,
    }
    if entry.tcp is not None:
        tcp = entry.tcp
        out["tcp"] = {
            "state": _enum_name(TcpState, tcp.state),
            "wscale_orig": tcp.wscale_orig, "wscale_reply": tcp.wscale_reply,
            "flags_orig": _flag_names(tcp.flags_orig, TcpFlag),
            "flags_reply": _flag_names(tcp.flags_reply, TcpFlag),
        }
    if entry.sctp is not None:
        sctp = entry.sctp
        out["sctp"] = {
            "state": _enum_name(SctpState, sctp.state),
            "vtag_orig": sctp.vtag_orig, "vtag_reply": sctp.vtag_reply,
        }
    if entry.helper is not None:
        out["helper"] = entry.helper
    if entry.master is not None:
        out["master"] = _tuple_json(family, entry.master)
    return out


def _event_json(event: CtEvent) -> dict[str, Any]:
    return {"event": event.kind.name.lower(), "portid": event.portid,
            **entry_to_json(event.entry)}


def _format(entry: Entry) -> str:
    from .ctformat import format_entry

    return format_entry(entry)


async def dump_command(reader: TableReader, *, as_json: bool, out: TextIO) -> int:
    """Print every entry of the table; the exit status."""
    for entry in await reader.dump():
        line = json.dumps(entry_to_json(entry)) if as_json else _format(entry)
        print(line, file=out)
    return 0


async def events_command(reader: TableReader, *, as_json: bool, out: TextIO,
                         err: TextIO, count: int | None = None) -> int:
    """Print events as they come (``count`` of them, or until cancelled)."""
    seen = 0
    subscription = reader.subscribe()
    try:
        async for batch in subscription:
            if isinstance(batch, Overrun):
                print("replicator: event overrun: events were lost", file=err, flush=True)
                continue
            for any_event in batch:
                event = (
                    CtEvent(EventKind.NEW, R.unpack(any_event.record), any_event.portid)
                    if isinstance(any_event, NewRecord) else any_event
                )  # fmt: skip
                if as_json:
                    print(json.dumps(_event_json(event)), file=out)
                else:
                    print(f"[{event.kind.name}] {_format(event.entry)}", file=out)
                seen += 1
                if count is not None and seen >= count:
                    out.flush()
                    return 0
            out.flush()
    finally:
        await subscription.aclose()
    return 0


def _linux_reader(netns: str | None) -> TableReader:
    from .kernel_linux import LinuxKernel

    return LinuxKernel(netns)


async def _with_reader(factory: ReaderFactory, netns: str | None,
                       body: Callable[[TableReader], Any]) -> int:
    reader = factory(netns)
    try:
        status: int = await body(reader)
        return status
    finally:
        await reader.aclose()


def _handle_dump(args: argparse.Namespace) -> int:
    factory: ReaderFactory = args.reader_factory
    return trio.run(_with_reader, factory, args.netns,
                    lambda r: dump_command(r, as_json=args.json, out=sys.stdout))


def _handle_events(args: argparse.Namespace) -> int:
    factory: ReaderFactory = args.reader_factory
    return trio.run(_with_reader, factory, args.netns,
                    lambda r: events_command(r, as_json=args.json, out=sys.stdout,
                                             err=sys.stderr, count=args.count))


def register(subparsers: Any, reader_factory: ReaderFactory = _linux_reader) -> None:
    """Add ``ct dump`` and ``ct events`` to the ``replicator`` parser."""
    ct = subparsers.add_parser("ct", help="read the kernel conntrack table")
    sub = ct.add_subparsers(dest="ct_command", required=True, metavar="CT_COMMAND")
    for name, handler, help_text in (
        ("dump", _handle_dump, "list every entry (like conntrack -L)"),
        ("events", _handle_events, "print events as they happen (like conntrack -E)"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--json", action="store_true", help="one JSON object per line")
        cmd.add_argument("--netns", metavar="NAME",
                         help="read the table of this named network namespace")
        if name == "events":
            cmd.add_argument("--count", type=int, metavar="N",
                             help="exit after N events")
        cmd.set_defaults(handler=handler, reader_factory=reader_factory)
