"""Real replicator daemons in lab namespaces: keys, config, start, control, stop.

Every namespace test that runs the daemon uses this module, so that starting a node
looks the same everywhere: ``replicator keygen`` makes the keys, a config file is
written from :class:`NodeSpec`, the daemon runs as ``ip netns exec NS python -m
replicator.cli run -c FILE`` (a real process, killed by the lab on teardown), and the
tests talk to it with the real CLI (``replicator status --json ...``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from integration.netns.lab import Lab, Netns

#: The interpreter of the venv the tests run in (so the daemon is the checkout's code).
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]


def replicator_argv(*args: str) -> list[str]:
    """argv that runs the ``replicator`` command of this checkout."""
    return [PYTHON, "-m", "replicator.cli", *args]


@dataclass
class NodeSpec:
    """What differs between nodes of a test (everything else has test defaults)."""

    name: str
    peer_name: str
    listen_address: str
    peer_address: str
    mode: str = "cache"
    port: int = 3790
    #: Extra TOML lines appended to the tables, e.g. {"sync.timers": ["ack_timeout = 1.0"]}.
    extra: dict[str, list[str]] = field(default_factory=dict)
    #: keepalived wiring: path of the notify FIFO, or None.
    notify_fifo: Path | None = None
    vrrp_name: str = ""
    metrics_port: int | None = None
    rcvbuf_bytes: int = 64 << 20
    ignore_addresses: tuple[str, ...] = ()


def keygen(workdir: Path, name: str) -> tuple[Path, Path]:
    """Create ``<name>.key``/``<name>.crt`` in ``workdir`` with ``replicator keygen``."""
    key, cert = workdir / f"{name}.key", workdir / f"{name}.crt"
    if not key.exists():
        subprocess.run(
            replicator_argv("keygen", "--key", str(key), "--cert", str(cert), "--name", name),
            check=True, capture_output=True, cwd=REPO,
        )
    return key, cert


def config_text(spec: NodeSpec, workdir: Path) -> str:
    """The TOML configuration of one node (keys in ``workdir``).

    ``spec.extra`` lines are added to their table; one that sets a key the test
    defaults below set replaces that line (e.g. ``{"sync.timers": ["ack_timeout = 4"]}``).
    """
    fifo = []
    if spec.notify_fifo is not None:
        fifo = [f'notify_fifo = "{spec.notify_fifo}"', f'vrrp_name = "{spec.vrrp_name}"']
    ignore = ", ".join(json.dumps(a) for a in spec.ignore_addresses)
    tables: list[tuple[str, list[str]]] = [
        ("node", [f'name = "{spec.name}"']),
        ("sync", [f'listen_address = "{spec.listen_address}"',
                  f'peer_address = "{spec.peer_address}"', f"listen_port = {spec.port}",
                  f"peer_port = {spec.port}", f'peer_name = "{spec.peer_name}"',
                  f'mode = "{spec.mode}"']),
        ("sync.timers", ["ack_timeout = 1.0", "keepalive_interval = 0.5",
                         "dead_interval = 3.0"]),
        ("tls", [f'key = "{workdir / (spec.name + ".key")}"',
                 f'cert = "{workdir / (spec.name + ".crt")}"',
                 f'peer_certs = ["{workdir / (spec.peer_name + ".crt")}"]']),
        ("kernel", [f"rcvbuf_bytes = {spec.rcvbuf_bytes}", 'conntrack_events = "enable"']),
        ("filters", [f"ignore_addresses = [{ignore}]"]),
        ("control", [f'socket = "{workdir / (spec.name + ".sock")}"']),
        ("metrics", [] if spec.metrics_port is None
         else [f'address = "127.0.0.1:{spec.metrics_port}"']),
        ("log", ['level = "info"']),
        ("keepalived", fifo),
    ]
    return "\n".join(f"[{name}]\n" + _table(lines, spec.extra.get(name, []))
                     for name, lines in tables)


def _key(line: str) -> str | None:
    """The key a TOML ``key = value`` line sets (None for anything else)."""
    return line.split("=", 1)[0].strip() if "=" in line else None


def _table(defaults: list[str], extra: list[str]) -> str:
    """A table's lines: ``defaults``, each replaced by the ``extra`` line setting the same
    key if there is one, then the other ``extra`` lines."""
    overrides = {k: line for line in extra if (k := _key(line)) is not None}
    lines = [overrides.get(_key(line) or "", line) for line in defaults]
    lines += [line for line in extra if line not in lines]
    return "".join(f"{line}\n" for line in lines)


class DaemonNode:
    """One running (or stopped) replicator daemon in a lab namespace."""

    def __init__(self, lab: Lab, ns: Netns, spec: NodeSpec, workdir: Path) -> None:
        self.lab, self.ns, self.spec, self.workdir = lab, ns, spec, workdir
        self.config = workdir / f"{spec.name}.toml"
        self.log = workdir / f"{spec.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        keygen(workdir, spec.name)
        self.write_config()

    def write_config(self) -> None:
        """(Re)write the config file from :attr:`spec`."""
        self.config.write_text(config_text(self.spec, self.workdir))

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Start the daemon; with ``wait``, return once its control socket answers."""
        out = self.log.open("ab")
        self.proc = self.lab.spawn(
            self.ns, replicator_argv("run", "-c", str(self.config)),
            stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO),
        )
        out.close()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until ``status`` answers (the daemon is past READY=1)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited ({self.proc.returncode}):\n"
                                   + self.log_tail())
            if self.try_cli("status") is not None:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name} not ready:\n{self.log_tail()}")
            time.sleep(0.1)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the daemon and wait for it to exit."""
        if self.proc is None or self.proc.poll() is not None:
            return
        # `ip netns exec` execs the command, so the pid is the daemon's own.
        os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM: a clean stop."""
        self.kill(signal.SIGTERM)

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> Any:
        """Run ``replicator ARGS -c CONFIG --json`` and return the parsed JSON answer."""
        proc = subprocess.run(
            replicator_argv(*args, "-c", str(self.config), "--json"),
            capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"replicator {' '.join(args)}: {proc.stderr.strip()}")
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def try_cli(self, *args: str) -> Any:
        """:meth:`cli` that returns None instead of raising."""
        try:
            return self.cli(*args, timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError):
            return None

    def status(self) -> dict[str, Any]:
        """``replicator status --json``."""
        result: dict[str, Any] = self.cli("status")
        return result

    def notify(self, state: str, priority: int = 100) -> None:
        """Feed a keepalived transition as the notify command would."""
        self.cli("notify", "INSTANCE", self.spec.vrrp_name or "VI_1", state, str(priority))

    def log_tail(self, lines: int = 40) -> str:
        """The end of the daemon's log (for failure messages)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> float:
    """Poll ``predicate()`` until true; return the seconds it took (raise on timeout)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start
