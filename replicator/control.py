"""The control socket's server: how the ``replicator`` CLI (and keepalived) reach the daemon.

The protocol (one JSON request line, one JSON answer line per connection) and the result
shapes are in :mod:`replicator.controlproto`, the CLI's client in
:mod:`replicator.controlclient`; both are re-exported here, so the daemon and the tests
import one module. They live apart so that the CLI's control commands do not import
trio (keepalived runs ``replicator check`` every second).

Authorisation: the peer's credentials come from the kernel (``SO_PEERCRED``,
``SO_PEERGROUPS``): root, the daemon's own user and members of the configured group
are served; anyone else gets a refusal. The socket file's mode and group are a first
barrier, the credential check a second one that does not depend on them.

The daemon implements :class:`ControlHandler`; the server below only decodes, checks
and dispatches.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, NoReturn, Protocol

import trio

from .controlclient import ControlClient
from .controlproto import (
    MAX_REQUEST,
    MAX_RESPONSE,
    PROTOCOL_VERSION,
    CacheName,
    CheckReport,
    Command,
    CommitReport,
    CountReport,
    DumpReport,
    NotifyReport,
    Request,
    Response,
    ResyncReport,
    ResyncSource,
    StatsReport,
    StatusReport,
    VerifyReport,
    check_result,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)
from .errors import ControlDecodeError, ControlError, ReplicatorError
from .logs import fields
from .role import VrrpEvent, parse_notify

__all__ = [
    "MAX_REQUEST",
    "MAX_RESPONSE",
    "PROTOCOL_VERSION",
    "REQUEST_TIMEOUT",
    "SO_PEERGROUPS",
    "CacheName",
    "CheckReport",
    "Command",
    "CommitReport",
    "ControlClient",
    "ControlHandler",
    "CountReport",
    "DumpReport",
    "NotifyReport",
    "PeerCred",
    "Request",
    "Response",
    "ResyncReport",
    "ResyncSource",
    "StatsReport",
    "StatusReport",
    "VerifyReport",
    "authorised",
    "check_result",
    "decode_request",
    "decode_response",
    "dispatch",
    "encode_request",
    "encode_response",
    "peer_credentials",
    "serve_control",
]

log = logging.getLogger(__name__)

#: A client that does not finish its request within this time is dropped.
REQUEST_TIMEOUT = 10.0


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
