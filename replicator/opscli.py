"""Operator commands: talk to the running daemon over the control socket.

``status``, ``stats``, ``dump``, ``commit``, ``flush``, ``resync``, ``bulk-send``,
``shorten-timers``, ``notify``, ``check``, ``verify``, and ``config check`` (which
validates a file without contacting anything). Every command takes ``-c/--config`` to
find the control socket (or ``--socket`` to name it directly) and ``--json`` for a
machine-readable answer. Exit status: 0 on success, 1 on error with a one-line reason on
stderr; ``check`` and ``verify`` exit 1 when the daemon says "not ok".

keepalived runs ``check`` every second and ``notify`` on every transition, so this
module imports only the protocol, the client and the configuration parser: no trio,
no cryptography (``replicator.cli`` builds a parser of these commands alone when one of
them is asked for).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import DEFAULT_CONFIG_PATH, load_config
from .controlclient import ControlClient
from .controlproto import (
    CacheName,
    CheckReport,
    CommitReport,
    CountReport,
    DumpReport,
    NotifyReport,
    ResyncSource,
    StatsReport,
    StatusReport,
    VerifyReport,
)
from .role import VrrpKind, VrrpState, format_notify, parse_notify

#: Seconds to wait for an answer. ``check`` runs under keepalived's script timeout.
DEFAULT_TIMEOUT = 60.0
CHECK_TIMEOUT = 5.0


def _client(args: argparse.Namespace) -> ControlClient:
    socket_path: Path | None = args.socket
    if socket_path is None:
        socket_path = load_config(args.config, check=False).control.socket
    timeout: float = args.timeout
    return ControlClient(socket_path, timeout=timeout)


def _emit(args: argparse.Namespace, result: Any, text: str) -> None:
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif text:
        print(text)


def _format_status(s: StatusReport) -> str:
    lag = s["replication_lag_seconds"]
    entries = " ".join(f"{name}={count}" for name, count in sorted(s["entries"].items()))
    lines = [
        f"node: {s['node']}",
        f"role: {s['role']}",
        f"mode: {s['mode']}",
        f"peer: {s['peer']} ({'up' if s['peer_up'] else 'down'})",
        f"in sync: {'yes' if s['in_sync'] else 'no: ' + s['reason']}",
        f"entries: {entries}",
        f"replication lag: {'unknown' if lag is None else f'{lag:.3f} s'}",
        f"uptime: {s['uptime_seconds']:.0f} s",
        f"epoch: {s['epoch']:016x}",
    ]
    last = s["last_resync"]
    if last is None:
        lines.append("last resync: none")
    else:
        kind = "full" if last["full"] else "digest"
        lines.append(
            f"last resync: {kind} {last['direction']}, {last['entries']} entries in "
            f"{last['duration_seconds']:.3f} s, {last['seconds_ago']:.0f} s ago"
        )
    return "\n".join(lines)


def _format_stats(stats: StatsReport) -> str:
    return "\n".join(f"{name} {value:g}" for name, value in sorted(stats.items()))


def _format_count(report: CountReport) -> str:
    return report["detail"] or f"{report['count']} entries"


def _status(args: argparse.Namespace) -> int:
    report = _client(args).status()
    _emit(args, report, _format_status(report))
    return 0


def _stats(args: argparse.Namespace) -> int:
    report = _client(args).stats()
    _emit(args, report, _format_stats(report))
    return 0


def _dump(args: argparse.Namespace) -> int:
    report: DumpReport = _client(args).dump(args.cache)
    _emit(args, report, "\n".join(report["entries"]))
    return 0


def _commit(args: argparse.Namespace) -> int:
    report: CommitReport = _client(args).commit()
    text = (
        f"committed {report['applied']} entries in {report['seconds']:.3f} s"
        f" ({report['failed']} failed)"
    )
    _emit(args, report, text)
    return 0


def _counting(call: Callable[[ControlClient, argparse.Namespace], CountReport]) -> Any:
    def handler(args: argparse.Namespace) -> int:
        report = call(_client(args), args)
        _emit(args, report, _format_count(report))
        return 0

    return handler


def _notify(args: argparse.Namespace) -> int:
    # Parse locally first: a malformed line is the caller's mistake, reported without
    # bothering the daemon (and works the same whether the daemon runs or not).
    event = parse_notify(f"{args.kind} {args.name} {args.state} {args.priority}")
    report: NotifyReport = _client(args).notify(format_notify(event))
    _emit(args, report, f"{report['verdict']}: role {report['role']}")
    return 0


def _check(args: argparse.Namespace) -> int:
    report: CheckReport = _client(args).check()
    _emit(args, report, "ok" if report["ok"] else f"not ready: {report['reason']}")
    return 0 if report["ok"] else 1


def _verify(args: argparse.Namespace) -> int:
    report: VerifyReport = _client(args).verify()
    lines = [f"{'ok' if report['ok'] else 'FAILED'}: {report['checked']} entries checked"]
    lines += [f"  {problem}" for problem in report["problems"]]
    _emit(args, report, "\n".join(lines))
    return 0 if report["ok"] else 1


def _config_check(args: argparse.Namespace) -> int:
    config = load_config(args.config, check=True)
    _emit(
        args,
        {"ok": True, "path": str(args.config), "node": config.node.name},
        f"ok: {args.config}",
    )
    return 0


def _common(parser: argparse.ArgumentParser, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="control socket path (default: control.socket from the configuration)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=timeout,
        metavar="SECONDS",
        help=f"seconds to wait for the daemon (default {timeout:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def _choice_group(
    parser: argparse.ArgumentParser, dest: str, choices: type[CacheName] | type[ResyncSource]
) -> None:
    group = parser.add_mutually_exclusive_group(required=True)
    for choice in choices:
        group.add_argument(
            f"--{choice.value}", dest=dest, action="store_const", const=choice, help=choice.value
        )


def register(subparsers: Any) -> None:
    """Add the operator commands to the ``replicator`` parser."""

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str) -> Any:
        cmd = subparsers.add_parser(name, help=help_text, description=help_text)
        _common(cmd, timeout=CHECK_TIMEOUT if name == "check" else DEFAULT_TIMEOUT)
        cmd.set_defaults(handler=handler)
        return cmd

    add("status", _status, "show role, peer, sync state and entry counts")
    add("stats", _stats, "show the daemon's counters")
    dump = add("dump", _dump, "list the entries of the internal or external cache")
    _choice_group(dump, "cache", CacheName)
    add("commit", _commit, "write the external cache into the kernel (blocks until done)")
    flush = add("flush", _counting(lambda c, a: c.flush(a.cache)), "empty a cache")
    _choice_group(flush, "cache", CacheName)
    resync = add(
        "resync",
        _counting(lambda c, a: c.resync(a.source)),
        "re-dump the kernel into the internal cache, or ask the peer for its whole table",
    )
    _choice_group(resync, "source", ResyncSource)
    add("bulk-send", _counting(lambda c, a: c.bulk_send()), "send every entry to the peer")
    add(
        "shorten-timers",
        _counting(lambda c, a: c.shorten_timers()),
        "cap kernel timeouts at keepalived.shorten_timeout",
    )
    notify = add(
        "notify",
        _notify,
        "report a keepalived transition (use as keepalived's notify script)",
    )
    notify.add_argument("kind", choices=[k.value for k in VrrpKind], metavar="GROUP|INSTANCE")
    notify.add_argument("name", metavar="NAME")
    notify.add_argument("state", choices=[s.value for s in VrrpState], metavar="STATE")
    notify.add_argument("priority", metavar="PRIORITY")
    add(
        "check",
        _check,
        "exit 0 only if this node is in sync and could take over (keepalived track_script)",
    )
    add("verify", _verify, "compare the caches with the kernel and the peer")

    config = subparsers.add_parser("config", help="configuration file tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate a configuration file without starting anything",
        description="validate a configuration file (syntax, keys, contradictions, key files)",
    )
    check.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG_PATH})",
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(handler=_config_check)
