"""A fake :class:`~replicator.control.ControlHandler` with canned answers, for the tests."""

from __future__ import annotations

from replicator.control import (
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
from replicator.errors import ControlError
from replicator.role import VrrpEvent

STATUS: StatusReport = {
    "node": "fw-a",
    "role": "BACKUP",
    "mode": "cache",
    "peer": "192.0.2.2:3790",
    "peer_up": True,
    "in_sync": False,
    "reason": "bulk transfer from the peer in progress",
    "entries": {"internal": 12, "external": 34, "kernel": 12},
    "replication_lag_seconds": 0.25,
    "uptime_seconds": 3600.4,
    "epoch": 0x1234ABCD,
    "last_resync": {"direction": "receive", "full": True, "seconds_ago": 12.5,
                    "duration_seconds": 0.25, "entries": 1000},
}
STATS: StatsReport = {"messages_sent": 10, "messages_received": 12, "replication_lag": 0.5}
ENTRIES = [
    "ipv4     2 tcp      6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2",
    "ipv4     2 udp      17 29 src=10.0.0.1 dst=10.0.0.3 sport=53 dport=53",
]


class FakeHandler:
    """Records every call in ``calls`` and answers with the canned values above."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.check_ok = True
        self.verify_problems: list[str] = []
        self.fail_with: str | None = None

    def _record(self, name: str, arg: object = None) -> None:
        self.calls.append((name, arg))
        if self.fail_with is not None:
            raise ControlError(self.fail_with)

    async def status(self) -> StatusReport:
        self._record("status")
        return STATUS

    async def stats(self) -> StatsReport:
        self._record("stats")
        return STATS

    async def dump(self, cache: CacheName) -> DumpReport:
        self._record("dump", cache)
        return {"cache": cache.value, "entries": ENTRIES}

    async def commit(self) -> CommitReport:
        self._record("commit")
        return {"applied": 34, "failed": 1, "seconds": 0.125}

    async def flush(self, cache: CacheName) -> CountReport:
        self._record("flush", cache)
        return {"count": 34, "detail": f"flushed the {cache.value} cache"}

    async def resync(self, source: ResyncSource) -> CountReport:
        self._record("resync", source)
        return {"count": 12, "detail": ""}

    async def bulk_send(self) -> CountReport:
        self._record("bulk_send")
        return {"count": 12, "detail": "sent 12 entries"}

    async def shorten_timers(self) -> CountReport:
        self._record("shorten_timers")
        return {"count": 5, "detail": ""}

    async def notify(self, event: VrrpEvent) -> NotifyReport:
        self._record("notify", event)
        return {"verdict": "accepted", "role": event.state.value}

    async def check(self) -> CheckReport:
        self._record("check")
        return {"ok": self.check_ok, "reason": "" if self.check_ok else "peer down"}

    async def verify(self) -> VerifyReport:
        self._record("verify")
        return {"ok": not self.verify_problems, "checked": 46, "problems": self.verify_problems}
