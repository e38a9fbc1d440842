"""Test-side handles of the agents (``agent.py``) running in the lab namespaces."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from integration.netns.halab.topology import HaLab
from integration.netns.lab import Netns

AGENT = Path(__file__).with_name("agent.py")

E = TypeVar("E")


class AgentError(RuntimeError):
    """An agent died, timed out or reported a failure."""


class Agent:
    """One agent process; its JSON lines are read by a thread into a queue."""

    def __init__(self, ha: HaLab, ns: Netns, args: list[str], log: Path) -> None:
        self.ns = ns
        self.log = log
        with log.open("ab") as err:
            self.proc = ha.lab.spawn(ns, [sys.executable, str(AGENT), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=err)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert self.proc.stdout is not None
        self._pump_thread = threading.Thread(target=self._pump, args=(self.proc.stdout,),
                                             daemon=True)
        self._pump_thread.start()

    def _pump(self, stdout: IO[bytes]) -> None:
        for raw in stdout:
            self.lines.put(json.loads(raw))
        self.lines.put(None)

    def read(self, timeout: float) -> dict[str, Any]:
        """The next JSON line; :class:`AgentError` if none comes in ``timeout`` s."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AgentError(f"agent in {self.ns.name}: no answer in {timeout} s") from None
        if line is None:
            self.proc.wait()
            tail = self.log.read_text()[-2000:]
            raise AgentError(f"agent in {self.ns.name} exited {self.proc.returncode}: {tail}")
        return line

    def send(self, text: str) -> None:
        """Send one command line (read its answer with :meth:`read`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def command(self, text: str, timeout: float) -> dict[str, Any]:
        """Send one command line and return its answer."""
        self.send(text)
        return self.read(timeout)

    def stop(self, grace: float = 5) -> None:
        """Close stdin (a driver or server then ends), kill it after ``grace`` s, reap it."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # The pump ends at EOF; only then may its pipe be closed.
        self._pump_thread.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass(frozen=True)
class Retrans:
    """A TCP socket's retransmission count changed (seen by the agent's TCP_INFO poll)."""

    t: float
    #: tcpi_total_retrans, tcpi_backoff and tcpi_rto after the change.
    total: int
    backoff: int
    rto_ms: int

    @classmethod
    def from_json(cls, obj: Sequence[float]) -> Retrans:
        """From the agent's ``[t, total, backoff, rto_ms]``."""
        t, total, backoff, rto_ms = obj
        return cls(float(t), int(total), int(backoff), int(rto_ms))

    def shifted(self, origin: float) -> Retrans:
        """The same change with its time relative to ``origin``."""
        return Retrans(self.t - origin, self.total, self.backoff, self.rto_ms)


@dataclass(frozen=True)
class StreamRecord:
    """What a driver agent recorded for one streaming flow."""

    kind: str
    target: str
    local: str
    sent: int
    oks: int
    #: Every stream is proven by one round trip before the driver reports ready.
    last_ok: float
    max_gap: float
    mappings: tuple[tuple[float, str], ...]
    error: str | None
    #: The successful round trips before and after the longest gap (None: no gap yet).
    gap_start: float | None = None
    gap_end: float | None = None
    #: TCP only: each change of the requesting socket's retransmission count.
    retrans: tuple[Retrans, ...] = ()
    #: Every gap between round trips longer than the agent's ``GAP_RECORD`` (0.1 s).
    gaps: tuple[tuple[float, float], ...] = ()
    #: Longest time from a request to its reply.
    max_rtt: float = 0.0
    #: UDP only (see the agent's ``Stream``): replies counted although a newer request
    #: had been sent, replies to a request already answered, replies to none sent.
    late: int = 0
    duplicates: int = 0
    strays: int = 0

    @classmethod
    def from_json(cls, obj: dict[str, Any], direction: str) -> StreamRecord:
        """Build from the agent's report; ``direction`` qualifies ``kind`` (e.g. ``snat``)."""
        return cls(f"{obj['kind']}-{direction}", obj["target"], obj["local"], obj["sent"],
                   obj["oks"], float(obj["last_ok"]), obj["max_gap"],
                   tuple((float(t), str(m)) for t, m in obj["mappings"]), obj["error"],
                   obj["gap_start"], obj["gap_end"],
                   tuple(Retrans.from_json(r) for r in obj["retrans"]),
                   tuple((float(a), float(b)) for a, b in obj["gaps"]),
                   float(obj["max_rtt"]), obj["late"], obj["duplicates"], obj["strays"])


@dataclass(frozen=True)
class ProbeResult:
    """One request on every idle connection: how many answered, and how the rest failed."""

    total: int
    results: dict[str, int]

    @property
    def ok(self) -> int:
        """Connections that answered with the NAT mapping they had before."""
        return self.results.get("ok", 0)


class Driver:
    """A ``drive`` agent: streaming flows and idle connections from one namespace."""

    def __init__(self, ha: HaLab, ns: Netns, *, direction: str, streams: list[str],
                 idle: list[str], interval: float, log: Path) -> None:
        args = ["drive", "--interval", str(interval)]
        for spec in streams:
            args += ["--stream", spec]
        for spec in idle:
            args += ["--idle", spec]
        self.direction = direction
        self.agent = Agent(ha, ns, args, log)

    def ready(self, timeout: float) -> dict[str, int]:
        """Wait until every flow is open and proven."""
        answer = self.agent.read(timeout)
        if "ready" not in answer:
            raise AgentError(f"driver not ready: {answer}")
        return dict(answer["ready"])

    def report(self) -> tuple[float, list[StreamRecord]]:
        """The agent's clock and every stream's record."""
        answer = self.agent.command("report", timeout=10)
        return (float(answer["t"]),
                [StreamRecord.from_json(s, self.direction) for s in answer["streams"]])

    def start_probe(self, timeout: float) -> None:
        """Send one request on each idle connection (collect with :meth:`probe_result`).

        Split in two so the idle connections of several drivers are probed at once.
        """
        self.agent.send(f"probe {timeout}")

    def probe_result(self, timeout: float) -> ProbeResult:
        """How the idle connections answered the probe."""
        answer = self.agent.read(timeout + 30)
        return ProbeResult(int(answer["total"]), dict(answer["results"]))

    def stop(self) -> None:
        """End the agent (its connections close)."""
        self.agent.stop()


def start_servers(ha: HaLab) -> list[Agent]:
    """Echo servers: on the server (SNAT target) and on the client (DNAT target).

    Each reports its streaming connections' retransmissions as they happen: collect
    them with :func:`echo_retrans`.
    """
    plan = ha.plan
    agents = [
        Agent(ha, ha.server, ["serve", "--bind", plan.server,
                              "--tcp", str(plan.server_tcp_port),
                              "--udp", str(plan.server_udp_port)],
              ha.workdir / "server-agent.log"),
        Agent(ha, ha.client, ["serve", "--bind", plan.client,
                              "--tcp", str(plan.client_tcp_port)],
              ha.workdir / "client-agent.log"),
    ]
    for agent in agents:
        if "ready" not in agent.read(timeout=30):
            raise AgentError("echo server did not start")
    return agents


def echo_retrans(servers: Sequence[Agent]) -> dict[str, list[Retrans]]:
    """The retransmissions the echo servers reported since the last call, by the peer
    address each connection saw (a flow's NAT mapping)."""
    found: dict[str, list[Retrans]] = {}
    for agent in servers:
        while True:
            try:
                line = agent.lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                # The server died: put the end mark back for read() to report it.
                agent.lines.put(None)
                break
            if "retrans" in line:
                r = line["retrans"]
                found.setdefault(r["peer"], []).append(
                    Retrans(float(r["t"]), r["total"], r["backoff"], r["rto_ms"]))
    return found


@dataclass(frozen=True)
class AddressEvent:
    """An IPv4 address added to or removed from a firewall (monotonic time)."""

    t: float
    op: str
    addr: str


@dataclass(frozen=True)
class NeighbourEvent:
    """A neighbour (ARP) entry of an endpoint changed (monotonic time)."""

    t: float
    op: str
    dst: str
    lladdr: str | None


class _Watch(ABC, Generic[E]):
    """Collects the events an ``addrwatch``/``neighwatch`` agent prints."""

    def __init__(self, ha: HaLab, ns: Netns, mode: str, log: Path) -> None:
        self.agent = Agent(ha, ns, [mode], log)
        if "ready" not in self.agent.read(timeout=30):
            raise AgentError(f"{mode} did not start")
        self._events: list[E] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._collect, daemon=True).start()

    @abstractmethod
    def _parse(self, line: dict[str, Any]) -> E:
        """One event from one of the agent's lines."""

    def _collect(self) -> None:
        while (line := self.agent.lines.get()) is not None:
            with self._lock:
                self._events.append(self._parse(line))

    def events(self) -> list[E]:
        """Every change seen so far, oldest first."""
        with self._lock:
            return list(self._events)

    def stop(self) -> None:
        """End the watch."""
        self.agent.stop(grace=0)


class AddressWatch(_Watch[AddressEvent]):
    """Collects a namespace's IPv4 address changes (to time VIP moves precisely)."""

    def __init__(self, ha: HaLab, ns: Netns, log: Path) -> None:
        super().__init__(ha, ns, "addrwatch", log)

    def _parse(self, line: dict[str, Any]) -> AddressEvent:
        return AddressEvent(line["t"], line["op"], line["addr"])


class NeighbourWatch(_Watch[NeighbourEvent]):
    """Collects an endpoint's ARP entry changes (to time when it follows a moved VIP)."""

    def __init__(self, ha: HaLab, ns: Netns, log: Path) -> None:
        super().__init__(ha, ns, "neighwatch", log)

    def _parse(self, line: dict[str, Any]) -> NeighbourEvent:
        return NeighbourEvent(line["t"], line["op"], line["dst"], line["lladdr"])
