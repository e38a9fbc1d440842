"""Test-side handles of the agents (``agent.py``) running in the lab namespaces."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from integration.netns.halab.topology import HaLab
from integration.netns.lab import Netns

AGENT = Path(__file__).with_name("agent.py")


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

    @classmethod
    def from_json(cls, obj: dict[str, Any], direction: str) -> StreamRecord:
        """Build from the agent's report; ``direction`` qualifies ``kind`` (e.g. ``snat``)."""
        return cls(f"{obj['kind']}-{direction}", obj["target"], obj["local"], obj["sent"],
                   obj["oks"], float(obj["last_ok"]), obj["max_gap"],
                   tuple((float(t), str(m)) for t, m in obj["mappings"]), obj["error"])


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
    """Echo servers: on the server (SNAT target) and on the client (DNAT target)."""
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


@dataclass(frozen=True)
class AddressEvent:
    """An IPv4 address added to or removed from a firewall (monotonic time)."""

    t: float
    op: str
    addr: str


class AddressWatch:
    """Collects a namespace's IPv4 address changes (to time VIP moves precisely)."""

    def __init__(self, ha: HaLab, ns: Netns, log: Path) -> None:
        self.agent = Agent(ha, ns, ["addrwatch"], log)
        if "ready" not in self.agent.read(timeout=30):
            raise AgentError("address watch did not start")
        self._events: list[AddressEvent] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while (line := self.agent.lines.get()) is not None:
            with self._lock:
                self._events.append(AddressEvent(line["t"], line["op"], line["addr"]))

    def events(self) -> list[AddressEvent]:
        """Every change seen so far, oldest first."""
        with self._lock:
            return list(self._events)

    def stop(self) -> None:
        """End the watch."""
        self.agent.stop(grace=0)
