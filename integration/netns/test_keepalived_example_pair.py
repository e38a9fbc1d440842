"""The shipped keepalived example as a pair: a dead daemon on the master moves the VIPs.

Two namespaces joined on the example's two links run keepalived with
``etc/keepalived/keepalived.conf.example`` (fw-b's copy with its own addresses and
router id, as the example's header says), minus ``vrrp_notify_fifo`` (the FIFO is
covered by ``test_keepalived_wiring.py``; here nothing would read it). The track
script is the real ``replicator check --socket PATH``; each node's "daemon" is a
control socket answering ``check`` with ``ok`` through the real protocol encoder, so
the claim under test is keepalived's, given the exit status of ``check``:

* two healthy nodes with equal priorities do not preempt each other;
* when the master's daemon dies (its socket refuses connections, as after SIGKILL),
  the backup takes both VIPs without anything else being done;
* when that daemon comes back, the VIPs stay where they are (no fail-back).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from integration.netns.lab import Lab, Netns
from replicator.controlproto import Response, encode_response

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "keepalived" / "keepalived.conf.example"
REPLICATOR = Path(sys.executable).parent / "replicator"
VIPS = ("198.51.100.1", "10.0.0.1")
#: Waits for keepalived (master-down interval about 3.6 s with the example's adverts).
DEADLINE = 30.0


class FakeDaemon:
    """A control socket that answers every request with a passing ``check``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        """Listen (replacing the stale socket file a dead daemon leaves behind)."""
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(8)
        sock.settimeout(0.1)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
        self._thread.start()

    def _serve(self, sock: socket.socket) -> None:
        answer = encode_response(Response(True, {"ok": True, "reason": ""}, ""))
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                conn.recv(4096)
                conn.sendall(answer)

    def kill(self) -> None:
        """Stop answering; the socket file stays, so ``check`` gets ECONNREFUSED."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._sock is not None:
            self._sock.close()


def node_config(name: str, sock: Path) -> str:
    """The example for fw-a or fw-b, its check pointed at ``sock``, without the FIFO."""
    text = EXAMPLE.read_text().replace(
        '"/usr/local/bin/replicator check"', f'"{REPLICATOR} check --socket {sock}"')
    text = "\n".join(line for line in text.splitlines()
                     if not line.strip().startswith("vrrp_notify_fifo"))
    if name == "b":
        text = text.replace("router_id fw-a", "router_id fw-b")
        for net in ("198.51.100", "10.0.0"):
            text = (text.replace(f"{net}.2", "@OWN@").replace(f"{net}.3", f"{net}.2")
                    .replace("@OWN@", f"{net}.3"))
    return text


def vips_held(ns: Netns) -> int:
    """How many of the two VIPs ``ns`` holds."""
    out = ns.run(["ip", "-br", "-4", "addr", "show"]).stdout
    return sum(f" {vip}/" in f" {out}" for vip in VIPS)


def wait_for(what: str, predicate: Callable[[], bool]) -> float:
    """Poll ``predicate`` until true; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < DEADLINE, f"timed out waiting for {what}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_dead_daemon_on_the_master_moves_the_vips_and_they_stay(
        netlab: Lab, tmp_path: Path) -> None:
    nodes = {name: netlab.netns(f"ka{name}") for name in ("a", "b")}
    for dev in ("eth0", "eth1"):
        netlab.veth(nodes["a"], dev, nodes["b"], dev)
    for name, host in (("a", 2), ("b", 3)):
        nodes[name].run(["ip", "addr", "add", f"198.51.100.{host}/24", "dev", "eth0"])
        nodes[name].run(["ip", "addr", "add", f"10.0.0.{host}/24", "dev", "eth1"])
    daemons = {name: FakeDaemon(tmp_path / f"{name}.sock") for name in nodes}
    logs = {name: tmp_path / f"keepalived-{name}.log" for name in nodes}
    try:
        for daemon in daemons.values():
            daemon.start()

        def start_keepalived(name: str) -> None:
            config = tmp_path / f"keepalived-{name}.conf"
            config.write_text(node_config(name, daemons[name].path))
            with logs[name].open("ab") as log:
                netlab.spawn(nodes[name], [
                    "keepalived", "--vrrp", "--dont-fork", "--log-console", "--log-detail",
                    "--no-syslog", "--use-file", str(config),
                    "--pid", str(tmp_path / f"{name}.pid"),
                    "--vrrp_pid", str(tmp_path / f"{name}-vrrp.pid")],
                    stdout=log, stderr=log)

        start_keepalived("a")
        wait_for("fw-a to take both VIPs", lambda: vips_held(nodes["a"]) == 2)
        start_keepalived("b")
        # Equal priorities: the healthy backup leaves the healthy master alone, even
        # past its master-down interval.
        wait_for("fw-b to run its check", lambda: "replicator_check" in logs["b"].read_text())
        time.sleep(5)
        assert (vips_held(nodes["a"]), vips_held(nodes["b"])) == (2, 0)

        daemons["a"].kill()
        took = wait_for("fw-b to take both VIPs after fw-a's daemon died",
                        lambda: vips_held(nodes["b"]) == 2 and vips_held(nodes["a"]) == 0)
        print(f"\nVIPs moved {took:.1f} s after fw-a's daemon stopped answering")

        daemons["a"].start()
        back = "Changing effective priority from 90 to 150"
        wait_for("fw-a's priority to come back",
                 lambda: logs["a"].read_text().count(back) >= 2)
        # Back at 150 like fw-b: no fail-back, even past a master-down interval.
        time.sleep(5)
        assert (vips_held(nodes["a"]), vips_held(nodes["b"])) == (0, 2)
    finally:
        for daemon in daemons.values():
            daemon.kill()
