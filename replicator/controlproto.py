"""The control socket's protocol: requests, responses and their shapes (no I/O).

One request per connection on a unix stream socket. The client sends one JSON object
on one line, the daemon answers with one JSON object on one line and closes::

    → {"v": 1, "cmd": "dump", "arg": "external"}
    ← {"ok": true, "result": {"cache": "external", "entries": ["tcp 6 431999 ..."]}}
    ← {"ok": false, "error": "commit failed: ..."}

Requests are bounded (:data:`MAX_REQUEST`), so a client can never make the daemon buffer
much; responses are bounded by the client (:data:`MAX_RESPONSE`). Every decoder here
raises :class:`~replicator.errors.ControlDecodeError` and nothing else.

This module imports neither trio nor the daemon, so the CLI's control commands (which
keepalived runs every second as a ``track_script``) start fast: the server is in
:mod:`replicator.control`, the client in :mod:`replicator.controlclient`.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from typing import Any, NamedTuple, NoReturn, TypedDict

from .errors import ControlDecodeError, NotifyDecodeError
from .role import parse_notify

PROTOCOL_VERSION = 1
#: Longest request line, newline included.
MAX_REQUEST = 4096
#: Longest response line the client accepts (a dump of 250 k entries fits).
MAX_RESPONSE = 256 << 20


class Command(enum.StrEnum):
    """The commands the daemon answers."""

    STATUS = "status"
    STATS = "stats"
    DUMP = "dump"
    COMMIT = "commit"
    FLUSH = "flush"
    RESYNC = "resync"
    BULK_SEND = "bulk-send"
    SHORTEN_TIMERS = "shorten-timers"
    NOTIFY = "notify"
    CHECK = "check"
    VERIFY = "verify"


class CacheName(enum.StrEnum):
    """The two caches: this node's table, and the peer's."""

    INTERNAL = "internal"
    EXTERNAL = "external"


class ResyncSource(enum.StrEnum):
    """Where a resync takes its data from."""

    #: Dump the kernel and reconcile the internal cache (``conntrackd -R``).
    KERNEL = "kernel"
    #: Ask the peer to send its whole table (``conntrackd -n``).
    PEER = "peer"


# --- result shapes (what the handler returns, what the client gets back) --------------


class ResyncReport(TypedDict):
    """The last completed resync (in ``status``)."""

    #: ``send``: our table to the peer; ``receive``: the peer's table to us.
    direction: str
    full: bool
    seconds_ago: float
    duration_seconds: float
    #: Entries replaced during it.
    entries: int


class StatusReport(TypedDict):
    """``status``: the node at a glance."""

    node: str
    #: :class:`replicator.role.Role` value.
    role: str
    #: ``"cache"`` or ``"hot"``.
    mode: str
    #: The peer's endpoint, ``ADDRESS:PORT``.
    peer: str
    peer_up: bool
    #: True when this node could take over without losing state (same as ``check``).
    in_sync: bool
    #: Why ``in_sync`` is false; empty when it is true.
    reason: str
    #: Entry counts by cache: ``internal``, ``external``, ``kernel``.
    entries: dict[str, int]
    #: Age of the oldest change not yet acknowledged by the peer; None when unknown.
    replication_lag_seconds: float | None
    uptime_seconds: float
    #: Random at every start: a changed epoch means the daemon restarted.
    epoch: int
    last_resync: ResyncReport | None


class DumpReport(TypedDict):
    """``dump``: the entries of one cache, one ``conntrack -L -o extended`` line each."""

    cache: str
    entries: list[str]


class CommitReport(TypedDict):
    """``commit``: the external cache written to the kernel."""

    applied: int
    failed: int
    seconds: float


class CountReport(TypedDict):
    """``flush``, ``resync``, ``bulk-send``, ``shorten-timers``: how many entries."""

    count: int
    #: One line for the operator, e.g. "resync requested from 192.0.2.2:3790".
    detail: str


class NotifyReport(TypedDict):
    """``notify``: what the role machine made of the line."""

    #: :class:`replicator.role.Verdict` value.
    verdict: str
    #: :class:`replicator.role.Role` value after the line.
    role: str


class CheckReport(TypedDict):
    """``check`` (keepalived ``track_script``): may this node hold or take mastership?"""

    ok: bool
    reason: str


class VerifyReport(TypedDict):
    """``verify``: consistency checks (internal cache vs kernel, digests vs peer)."""

    ok: bool
    checked: int
    problems: list[str]


#: ``stats``: flat counter and gauge values by name.
StatsReport = dict[str, float]


# --- requests -----------------------------------------------------------------------

_ARG_CHOICES: dict[Command, type[enum.StrEnum]] = {
    Command.DUMP: CacheName,
    Command.FLUSH: CacheName,
    Command.RESYNC: ResyncSource,
}


@dataclasses.dataclass(frozen=True)
class Request:
    """One control request. ``arg``: the cache, the resync source or the notify line."""

    command: Command
    arg: str = ""


def _check_arg(command: Command, arg: str) -> None:
    choices = _ARG_CHOICES.get(command)
    if choices is not None:
        if arg not in choices.__members__.values():
            allowed = ", ".join(choices.__members__.values())
            raise ControlDecodeError(f"{command} needs one of {allowed}, not {arg!r}")
    elif command is Command.NOTIFY:
        try:
            parse_notify(arg)
        except NotifyDecodeError as exc:
            raise ControlDecodeError(str(exc)) from None
    elif arg:
        raise ControlDecodeError(f"{command} takes no argument")


def encode_request(request: Request) -> bytes:
    """The request line. Raises ControlDecodeError if the request is not valid."""
    _check_arg(request.command, request.arg)
    message = {"v": PROTOCOL_VERSION, "cmd": str(request.command), "arg": request.arg}
    data = _dumps(message)
    if len(data) > MAX_REQUEST:
        raise ControlDecodeError(f"request longer than {MAX_REQUEST} bytes")
    return data


def decode_request(data: bytes) -> Request:
    """Parse a request line (with or without its newline)."""
    if len(data) > MAX_REQUEST:
        raise ControlDecodeError(f"request longer than {MAX_REQUEST} bytes")
    message = _loads_object(data)
    if set(message) != {"v", "cmd", "arg"}:
        raise ControlDecodeError(f"request must have exactly v, cmd and arg: {sorted(message)}")
    if message["v"] != PROTOCOL_VERSION or isinstance(message["v"], bool):
        raise ControlDecodeError(f"unsupported protocol version {message['v']!r}")
    cmd, arg = message["cmd"], message["arg"]
    if not isinstance(cmd, str) or not isinstance(arg, str):
        raise ControlDecodeError("cmd and arg must be strings")
    try:
        command = Command(cmd)
    except ValueError:
        raise ControlDecodeError(f"unknown command {cmd!r}") from None
    _check_arg(command, arg)
    return Request(command, arg)


# --- responses ----------------------------------------------------------------------


class Response(NamedTuple):
    """A decoded response: ``result`` when ``ok``, else ``error``."""

    ok: bool
    result: Any
    error: str


def encode_response(response: Response, *, limit: int = MAX_RESPONSE) -> bytes:
    """The response line. A result that cannot be encoded becomes an error response."""
    if response.ok:
        try:
            data = _dumps({"ok": True, "result": response.result})
        except (TypeError, ValueError) as exc:
            return encode_response(Response(False, None, f"internal error: {exc}"))
        if len(data) > limit:
            return encode_response(Response(False, None, f"response exceeds {limit} bytes"))
        return data
    return _dumps({"ok": False, "error": response.error})


def decode_response(data: bytes, command: Command) -> Response:
    """Parse a response line and check its result has the shape ``command`` promises."""
    message = _loads_object(data)
    ok = message.get("ok")
    if ok is True and set(message) == {"ok", "result"}:
        return Response(True, check_result(command, message["result"]), "")
    if ok is False and set(message) == {"ok", "error"} and isinstance(message["error"], str):
        return Response(False, None, message["error"])
    raise ControlDecodeError(f"malformed response: keys {sorted(message)}")


_RESULT_TYPES: dict[Command, Any] = {
    Command.STATUS: StatusReport,
    Command.STATS: StatsReport,
    Command.DUMP: DumpReport,
    Command.COMMIT: CommitReport,
    Command.FLUSH: CountReport,
    Command.RESYNC: CountReport,
    Command.BULK_SEND: CountReport,
    Command.SHORTEN_TIMERS: CountReport,
    Command.NOTIFY: NotifyReport,
    Command.CHECK: CheckReport,
    Command.VERIFY: VerifyReport,
}


def check_result(command: Command, value: object) -> Any:
    """Return ``value`` if it has the shape of ``command``'s result type, else raise.

    The shapes are read from the TypedDicts above, so they cannot drift apart.
    """
    _check_shape(_RESULT_TYPES[command], value, "result")
    return value


def _check_shape(expected: Any, value: object, where: str) -> None:
    if typing.is_typeddict(expected):
        if not isinstance(value, dict):
            raise ControlDecodeError(f"{where}: expected an object")
        hints = typing.get_type_hints(expected)
        if set(value) != set(hints):
            raise ControlDecodeError(f"{where}: expected keys {sorted(hints)}, got {sorted(value)}")
        for key, hint in hints.items():
            _check_shape(hint, value[key], f"{where}.{key}")
        return
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin is types.UnionType:
        for option in args:
            try:
                _check_shape(option, value, where)
            except ControlDecodeError:
                continue
            return
        raise ControlDecodeError(f"{where}: unexpected {type(value).__name__}")
    if origin is list:
        if not isinstance(value, list):
            raise ControlDecodeError(f"{where}: expected an array")
        for index, item in enumerate(value):
            _check_shape(args[0], item, f"{where}[{index}]")
        return
    if origin is dict:
        if not isinstance(value, dict):
            raise ControlDecodeError(f"{where}: expected an object")
        for key, item in value.items():
            _check_shape(args[1], item, f"{where}.{key}")
        return
    if expected is type(None):
        ok = value is None
    elif expected is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ControlDecodeError(f"{where}: expected {expected.__name__}")


def _reject_constant(name: str) -> NoReturn:
    raise ControlDecodeError(f"{name} is not valid JSON")


def _loads_object(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ControlDecodeError(f"not a JSON line: {exc}") from None
    if not isinstance(message, dict):
        raise ControlDecodeError("expected a JSON object")
    return message


def _dumps(message: object) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
