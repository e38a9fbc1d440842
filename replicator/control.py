"""The control socket: how the ``replicator`` CLI (and keepalived) talk to the daemon.

Protocol: one request per connection on a unix stream socket. The client sends one JSON
object on one line, the daemon answers with one JSON object on one line and closes::

    → {"v": 1, "cmd": "dump", "arg": "external"}
    ← {"ok": true, "result": {"cache": "external", "entries": ["tcp 6 431999 ..."]}}
    ← {"ok": false, "error": "commit failed: ..."}

Requests are bounded (:data:`MAX_REQUEST`), so a client can never make the daemon buffer
much; responses are bounded by the client (:data:`MAX_RESPONSE`). Every decoder here
raises :class:`~replicator.errors.ControlDecodeError` and nothing else.

Authorisation: the peer's credentials come from the kernel (``SO_PEERCRED``,
``SO_PEERGROUPS``): root, the daemon's own user and members of the configured group
are served; anyone else gets a refusal. The socket file's mode and group are a first
barrier, the credential check a second one that does not depend on them.

The daemon implements :class:`ControlHandler`; the server below only decodes, checks
and dispatches. :class:`ControlClient` is the synchronous client the CLI uses.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import grp
import json
import logging
import os
import socket
import stat
import struct
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Protocol, TypedDict

import trio

from .errors import ControlDecodeError, ControlError, NotifyDecodeError, ReplicatorError
from .logs import fields
from .role import VrrpEvent, parse_notify

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
#: Longest request line, newline included.
MAX_REQUEST = 4096
#: Longest response line the client accepts (a dump of 250 k entries fits).
MAX_RESPONSE = 256 << 20
#: A client that does not finish its request within this time is dropped.
REQUEST_TIMEOUT = 10.0


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


class ControlHandler(Protocol):
    """What the daemon implements to answer the control socket.

    Raise :class:`~replicator.errors.ControlError` (or any ReplicatorError) with a
    one-line reason to answer with an error; any other exception is a bug and
    propagates out of :func:`serve_control`.
    """

    async def status(self) -> StatusReport:
        """``replicator status``."""
        ...

    async def stats(self) -> StatsReport:
        """``replicator stats``."""
        ...

    async def dump(self, cache: CacheName) -> DumpReport:
        """``replicator dump --internal|--external``."""
        ...

    async def commit(self) -> CommitReport:
        """``replicator commit``: write the external cache to the kernel; returns when done."""
        ...

    async def flush(self, cache: CacheName) -> CountReport:
        """``replicator flush --internal|--external``: empty a cache (not the kernel)."""
        ...

    async def resync(self, source: ResyncSource) -> CountReport:
        """``replicator resync --kernel|--peer``."""
        ...

    async def bulk_send(self) -> CountReport:
        """``replicator bulk-send``: send the whole internal cache to the peer."""
        ...

    async def shorten_timers(self) -> CountReport:
        """``replicator shorten-timers``: cap kernel timeouts at keepalived.shorten_timeout."""
        ...

    async def notify(self, event: VrrpEvent) -> NotifyReport:
        """``replicator notify``: feed a keepalived line to the role machine."""
        ...

    async def check(self) -> CheckReport:
        """``replicator check``."""
        ...

    async def verify(self) -> VerifyReport:
        """``replicator verify``."""
        ...


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


# --- dispatch -----------------------------------------------------------------------


async def dispatch(handler: ControlHandler, request: Request) -> Response:
    """Run ``request`` on ``handler``; a ReplicatorError becomes an error response."""
    try:
        result = await _call(handler, request)
    except ReplicatorError as exc:
        return Response(False, None, str(exc))
    return Response(True, result, "")


async def _call(handler: ControlHandler, request: Request) -> object:
    command, arg = request.command, request.arg
    if command is Command.STATUS:
        return await handler.status()
    if command is Command.STATS:
        return await handler.stats()
    if command is Command.DUMP:
        return await handler.dump(CacheName(arg))
    if command is Command.COMMIT:
        return await handler.commit()
    if command is Command.FLUSH:
        return await handler.flush(CacheName(arg))
    if command is Command.RESYNC:
        return await handler.resync(ResyncSource(arg))
    if command is Command.BULK_SEND:
        return await handler.bulk_send()
    if command is Command.SHORTEN_TIMERS:
        return await handler.shorten_timers()
    if command is Command.NOTIFY:
        return await handler.notify(parse_notify(arg))
    if command is Command.CHECK:
        return await handler.check()
    return await handler.verify()


# --- peer credentials ---------------------------------------------------------------

# Linux socket options; the socket module lacks SO_PEERGROUPS.
SO_PEERGROUPS = 59
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


class PeerCred(NamedTuple):
    """Who is on the other end of a unix socket, as the kernel says."""

    pid: int
    uid: int
    gid: int
    #: Supplementary groups (SO_PEERGROUPS), primary gid not necessarily included.
    groups: tuple[int, ...]


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> PeerCred:
    """Read the connected peer's pid, uid, gid and groups from the kernel."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            break
        except OSError as exc:
            # ERANGE: the peer is in more groups than fit; the kernel wants more room.
            if exc.errno != errno.ERANGE or size >= 65536 * 4:
                raise
            size *= 4
    groups = struct.unpack(f"={len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return PeerCred(pid, uid, gid, groups)


def authorised(cred: PeerCred, *, own_uid: int, allowed_gid: int | None) -> bool:
    """Root, the daemon's own user, and members of the allowed group may send commands."""
    if cred.uid in (0, own_uid):
        return True
    return allowed_gid is not None and (cred.gid == allowed_gid or allowed_gid in cred.groups)


# --- server -------------------------------------------------------------------------


def _resolve_group(group: str) -> int | None:
    if not group:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ControlError(f"control.group: no group named {group!r}") from None


def _existing_socket(path: Path) -> bool:
    """True if ``path`` is a socket file, False if absent; refuse anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket")
    return True


async def _claim_path(path: Path) -> None:
    """Remove a stale socket left by a crashed daemon; refuse a live one or a non-socket."""
    if not _existing_socket(path):
        return
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await probe.connect(str(path))
    except OSError:
        os.unlink(path)
    else:
        raise ControlError(f"another daemon is listening on {path}")
    finally:
        probe.close()


async def serve_control(
    path: Path,
    handler: ControlHandler,
    *,
    group: str = "",
    mode: int = 0o660,
    on_denied: Callable[[PeerCred], None] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the control socket at ``path`` until cancelled; remove it on the way out.

    ``group`` (a name, empty for none) becomes the socket file's group and is
    authorised; ``mode`` is the file mode. ``on_denied`` is called for every refused
    peer (to log and count it). ``task_status.started()`` fires once the socket accepts.
    """
    allowed_gid = _resolve_group(group)
    await _claim_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    identity: os.stat_result | None = None
    try:
        await sock.bind(str(path))
        identity = os.lstat(path)
        _set_owner(path, mode, allowed_gid)
        sock.listen(64)
        own_uid = os.geteuid()

        async def serve_one(stream: trio.SocketStream) -> None:
            async with stream:
                await _serve_connection(stream, handler, own_uid, allowed_gid, on_denied)

        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(serve_one, [listener])
    finally:
        sock.close()
        if identity is not None:
            _remove_if_same(path, identity)


def _set_owner(path: Path, mode: int, gid: int | None) -> None:
    """Give the fresh socket file its mode and group."""
    os.chmod(path, mode)
    if gid is not None:
        try:
            os.chown(path, -1, gid)
        except PermissionError:
            raise ControlError(
                f"control.group: cannot give {path} to gid {gid}: "
                "the daemon's user must be a member of that group"
            ) from None


def _remove_if_same(path: Path, identity: os.stat_result) -> None:
    """Remove the socket file only if it is still the one we bound (not a successor's)."""
    try:
        current = path.lstat()
    except FileNotFoundError:
        return
    if (current.st_dev, current.st_ino) == (identity.st_dev, identity.st_ino):
        path.unlink()


async def _serve_connection(
    stream: trio.SocketStream,
    handler: ControlHandler,
    own_uid: int,
    allowed_gid: int | None,
    on_denied: Callable[[PeerCred], None] | None,
) -> None:
    # Read the request even from a peer about to be refused: closing a unix socket with
    # unread data resets the connection, and the client would never see the reason.
    line = b""
    with trio.move_on_after(REQUEST_TIMEOUT):
        line = await _read_line(stream, MAX_REQUEST)
    cred = peer_credentials(stream.socket)
    if not authorised(cred, own_uid=own_uid, allowed_gid=allowed_gid):
        log.warning("control request refused", extra=fields(uid=cred.uid, pid=cred.pid))
        if on_denied is not None:
            on_denied(cred)
        await _reply(stream, Response(False, None, f"permission denied for uid {cred.uid}"))
        return
    try:
        request = decode_request(line)
    except ControlDecodeError as exc:
        await _reply(stream, Response(False, None, f"bad request: {exc}"))
        return
    response = await dispatch(handler, request)
    await _reply(stream, response)


async def _read_line(stream: trio.abc.ReceiveStream, limit: int) -> bytes:
    """Bytes up to and including the first newline; stops early at EOF or past ``limit``."""
    data = bytearray()
    while b"\n" not in data and len(data) <= limit:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


async def _reply(stream: trio.SocketStream, response: Response) -> None:
    try:
        await stream.send_all(encode_response(response))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        log.debug("control client went away before the response")


# --- client -------------------------------------------------------------------------


class ControlClient:
    """Synchronous client for the CLI: one connection per call.

    Every method raises :class:`~replicator.errors.ControlError` with a one-line reason
    when the daemon cannot be reached or answers with an error.
    """

    def __init__(self, path: Path, *, timeout: float = 60.0, limit: int = MAX_RESPONSE) -> None:
        self.path = path
        self.timeout = timeout
        self.limit = limit

    def call(self, request: Request) -> Any:
        """Send ``request``; return its result (shape-checked) or raise ControlError."""
        data = encode_request(request)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout)
            try:
                sock.connect(str(self.path))
            except OSError as exc:
                raise ControlError(
                    f"cannot reach the daemon at {self.path}: {exc.strerror or exc}"
                ) from None
            try:
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                line = self._read_line(sock)
            except TimeoutError:
                raise ControlError(f"no answer from the daemon within {self.timeout} s") from None
            except OSError as exc:
                raise ControlError(f"control socket error: {exc.strerror or exc}") from None
        if not line.endswith(b"\n"):
            raise ControlError("the daemon closed the connection without a complete answer")
        try:
            response = decode_response(line, request.command)
        except ControlDecodeError as exc:
            raise ControlError(f"unexpected answer from the daemon: {exc}") from None
        if not response.ok:
            raise ControlError(response.error)
        return response.result

    def _read_line(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > self.limit:
                raise ControlError(f"answer larger than {self.limit} bytes")
            if chunk.endswith(b"\n"):
                break
        return b"".join(chunks)

    def status(self) -> StatusReport:
        """See :meth:`ControlHandler.status`."""
        result: StatusReport = self.call(Request(Command.STATUS))
        return result

    def stats(self) -> StatsReport:
        """See :meth:`ControlHandler.stats`."""
        result: StatsReport = self.call(Request(Command.STATS))
        return result

    def dump(self, cache: CacheName) -> DumpReport:
        """See :meth:`ControlHandler.dump`."""
        result: DumpReport = self.call(Request(Command.DUMP, cache))
        return result

    def commit(self) -> CommitReport:
        """See :meth:`ControlHandler.commit`."""
        result: CommitReport = self.call(Request(Command.COMMIT))
        return result

    def flush(self, cache: CacheName) -> CountReport:
        """See :meth:`ControlHandler.flush`."""
        result: CountReport = self.call(Request(Command.FLUSH, cache))
        return result

    def resync(self, source: ResyncSource) -> CountReport:
        """See :meth:`ControlHandler.resync`."""
        result: CountReport = self.call(Request(Command.RESYNC, source))
        return result

    def bulk_send(self) -> CountReport:
        """See :meth:`ControlHandler.bulk_send`."""
        result: CountReport = self.call(Request(Command.BULK_SEND))
        return result

    def shorten_timers(self) -> CountReport:
        """See :meth:`ControlHandler.shorten_timers`."""
        result: CountReport = self.call(Request(Command.SHORTEN_TIMERS))
        return result

    def notify(self, line: str) -> NotifyReport:
        """See :meth:`ControlHandler.notify`; ``line`` is ``GROUP|INSTANCE NAME STATE PRIO``."""
        result: NotifyReport = self.call(Request(Command.NOTIFY, line))
        return result

    def check(self) -> CheckReport:
        """See :meth:`ControlHandler.check`."""
        result: CheckReport = self.call(Request(Command.CHECK))
        return result

    def verify(self) -> VerifyReport:
        """See :meth:`ControlHandler.verify`."""
        result: VerifyReport = self.call(Request(Command.VERIFY))
        return result
