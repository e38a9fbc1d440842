"""The shipped keepalived example against the real keepalived, and its FIFO lines driving
the role machine (a single node: it must still take over although `replicator check`
fails, because the example uses a negative weight, not FAULT); the example's virtual
addresses, read from the kernel as a restarted daemon reads them
(``keepalived.virtual_addresses``), tell the state keepalived is in."""

from __future__ import annotations

import functools
import ipaddress
import signal
import sys
import time
from pathlib import Path

import trio

from integration.netns.lab import Lab, Netns
from replicator.notifyfifo import read_notify_fifo
from replicator.role import Action, Role, RoleMachine, Verdict, VrrpEvent
from replicator.roletask import RoleRunner
from replicator.viprole import held_addresses, role_from_addresses

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "keepalived" / "keepalived.conf.example"
REPLICATOR = Path(sys.executable).parent / "replicator"


def firewall(netlab: Lab) -> Netns:
    """A namespace with the example's eth0/eth1 and their addresses."""
    ns = netlab.netns("ka")
    ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
    for dev, addr in (("eth0", "198.51.100.2/24"), ("eth1", "10.0.0.2/24")):
        ns.run(["ip", "addr", "add", addr, "dev", dev])
        ns.run(["ip", "link", "set", dev, "up"])
    return ns


def example(fifo: Path | None = None) -> str:
    text = EXAMPLE.read_text().replace("/usr/local/bin/replicator", str(REPLICATOR))
    if fifo is not None:
        text = text.replace("/run/replicator/notify.fifo", str(fifo))
    return text


def test_the_example_passes_keepalived_config_test(netlab: Lab, tmp_path: Path) -> None:
    ns = firewall(netlab)
    config = tmp_path / "keepalived.conf"
    config.write_text(example())
    result = ns.run(["keepalived", "--config-test", "--use-file", str(config)], check=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_fifo_lines_drive_the_role_machine(netlab: Lab, tmp_path: Path) -> None:
    ns = firewall(netlab)
    fifo = tmp_path / "notify.fifo"
    config = tmp_path / "keepalived.conf"
    config.write_text(example(fifo))
    verdicts: list[tuple[VrrpEvent, Verdict]] = []
    performed: list[Action] = []

    # Set (and replaced) at every line and action: wait_for re-checks the machine then.
    # An action's completion is reported right after perform returns, before the
    # runner task yields, so a woken waiter sees the machine already updated.
    changed = [trio.Event()]

    def poke() -> None:
        changed[0].set()
        changed[0] = trio.Event()

    async def perform(action: Action) -> None:
        performed.append(action)
        poke()

    runner = RoleRunner(RoleMachine(hot=False, follow="VG_FW"), perform)

    def feed(event: VrrpEvent) -> None:
        verdicts.append((event, runner.feed(event).verdict))
        poke()

    async def wait_for(role: Role) -> None:
        with trio.fail_after(40):
            while runner.machine.role is not role or not runner.machine.settled:
                await changed[0].wait()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(read_notify_fifo, fifo, feed))
            await nursery.start(runner.run)
            keepalived = netlab.spawn(ns, keepalived_argv(config, tmp_path))
            # Alone on the link, the node takes over after the master-down interval.
            await wait_for(Role.MASTER)
            keepalived.send_signal(signal.SIGTERM)
            await wait_for(Role.STOPPED)
            nursery.cancel_scope.cancel()

    trio.run(main)
    group = [(e.state, v) for e, v in verdicts if e.kind == "GROUP"]
    instances = {v for e, v in verdicts if e.kind == "INSTANCE"}
    assert instances == {Verdict.NOT_FOLLOWED}
    assert [state for state, verdict in group if verdict is Verdict.ACCEPTED] == [
        "BACKUP",
        "MASTER",
        "STOP",
    ]
    assert performed == [
        Action.BECOME_RECEIVER,
        Action.SHORTEN_TIMERS,
        Action.REQUEST_RESYNC,
        Action.COMMIT,
        Action.BECOME_SENDER,
        Action.BULK_SEND,
        Action.BECOME_RECEIVER,
        Action.SHORTEN_TIMERS,
    ]


def keepalived_argv(config: Path, tmp_path: Path) -> list[str]:
    return ["keepalived", "--vrrp", "--dont-fork", "--log-console", "--no-syslog",
            "--use-file", str(config), "--pid", str(tmp_path / "k.pid"),
            "--vrrp_pid", str(tmp_path / "v.pid")]


def virtual_ipaddresses(text: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """The addresses of a keepalived configuration's ``virtual_ipaddress`` blocks."""
    found, inside = [], False
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["virtual_ipaddress", "{"]:
            inside = True
        elif inside and words[:1] == ["}"]:
            inside = False
        elif inside and words:
            found.append(ipaddress.ip_interface(words[0]).ip)
    return found


def test_the_example_virtual_addresses_tell_keepalived_state(
        netlab: Lab, tmp_path: Path) -> None:
    """What a restarted daemon reads (:mod:`replicator.viprole`): keepalived adds the
    example's VIPs when it becomes master and removes them when it stops."""
    ns = firewall(netlab)
    config = tmp_path / "keepalived.conf"
    # Without the FIFO: nothing reads it here.
    config.write_text("".join(line for line in example().splitlines(keepends=True)
                              if not line.strip().startswith("vrrp_notify_fifo")))
    # What an operator lists in keepalived.virtual_addresses for this example.
    virtual = virtual_ipaddresses(EXAMPLE.read_text())
    assert [str(a) for a in virtual] == ["198.51.100.1", "10.0.0.1"]

    def wait_for(state: str) -> None:
        deadline = time.monotonic() + 40
        while str(role_from_addresses(virtual, held_addresses(ns.name))) != state:
            assert time.monotonic() < deadline, f"the addresses never said {state}"
            time.sleep(0.1)

    wait_for("BACKUP")  # before keepalived: no VIP
    keepalived = netlab.spawn(ns, keepalived_argv(config, tmp_path))
    # Alone on the link, the node takes over after the master-down interval.
    wait_for("MASTER")
    keepalived.send_signal(signal.SIGTERM)
    keepalived.wait(timeout=30)
    wait_for("BACKUP")
