"""The synchronous control-socket client the ``replicator`` CLI uses.

Kept apart from the trio server (:mod:`replicator.control`) so that importing it costs
only the protocol (:mod:`replicator.controlproto`) and the standard library.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from .controlproto import (
    MAX_RESPONSE,
    CacheName,
    CheckReport,
    Command,
    CommitReport,
    CountReport,
    DumpReport,
    NotifyReport,
    Request,
    ResyncSource,
    StatsReport,
    StatusReport,
    VerifyReport,
    decode_response,
    encode_request,
)
from .errors import ControlDecodeError, ControlError


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
