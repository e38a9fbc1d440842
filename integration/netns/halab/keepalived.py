"""keepalived for the firewall pair: configuration, process control, transition log.

Both VRRP instances (inside and outside VIP) are in one ``vrrp_sync_group`` so the
VIPs always move together. Adverts are unicast to the peer's leg address (reliable in
namespaces, no multicast snooping questions), VRRPv3 with a sub-second ``advert_int``
keeps the drill fast. ``a`` has the higher priority and preempts, so bringing it back
is the fail-back.

Every sync-group transition is appended to ``transitions.log`` by a small notify
script (``<unix time> GROUP <name> <STATE> <prio>``); keepalived's own log goes to
``keepalived.log``. A replication system adds its own notify commands, scripts or
global settings through :class:`KeepalivedHooks`.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from integration.netns.halab.topology import LAN_IF, WAN_IF, AddressPlan, Firewall, HaLab

SYNC_GROUP = "FW"
VRID_INSIDE = 51
VRID_OUTSIDE = 52


@dataclass(frozen=True)
class KeepalivedHooks:
    """What a replication system adds to each firewall's keepalived configuration.

    ``global_defs``: lines inside ``global_defs`` (e.g. ``vrrp_notify_fifo /path``).
    ``sync_group``: lines inside the ``vrrp_sync_group`` (e.g. ``notify_master "..."``,
    ``track_script { name }``). ``blocks``: extra top-level blocks (e.g. a ``vrrp_script``).
    ``instance``: lines inside each ``vrrp_instance`` (e.g. ``track_script { name }``).
    """

    global_defs: tuple[str, ...] = ()
    sync_group: tuple[str, ...] = ()
    blocks: tuple[str, ...] = ()
    instance: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timing:
    """VRRP timing: adverts every ``advert_int`` seconds (VRRPv3 allows centiseconds)."""

    advert_int: float = 0.1
    #: Delay before the second round of gratuitous ARPs after becoming master.
    garp_master_delay: int = 1


@dataclass(frozen=True)
class Transition:
    """One sync-group transition reported by keepalived's notify script."""

    node: str
    wall_time: float
    state: str


def notify_script(log: Path) -> str:
    """A notify script that appends each transition with its wall-clock time."""
    return f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {log}\n'


def render(fw: Firewall, peer: Firewall, plan: AddressPlan, *, timing: Timing,
           notify: Path, hooks: KeepalivedHooks) -> str:
    """keepalived.conf for ``fw``."""
    def instance(name: str, iface: str, vrid: int, *, src: str, dst: str, vip: str,
                 prefix: int) -> str:
        return f"""\
vrrp_instance {name} {{
    state BACKUP
    interface {iface}
    virtual_router_id {vrid}
    priority {fw.priority}
    advert_int {timing.advert_int}
    garp_master_delay {timing.garp_master_delay}
    unicast_src_ip {src}
    unicast_peer {{
        {dst}
    }}
    virtual_ipaddress {{
        {vip}/{prefix} dev {iface}
    }}
{instance_extra}}}
"""
    instance_extra = "".join(f"    {line}\n" for line in hooks.instance)
    global_extra = "".join(f"    {line}\n" for line in hooks.global_defs)
    group_extra = "".join(f"    {line}\n" for line in hooks.sync_group)
    blocks = "".join(f"{block}\n" for block in hooks.blocks)
    return f"""\
global_defs {{
    router_id fw{fw.name}
    vrrp_version 3
    script_user root
    enable_script_security
{global_extra}}}

{blocks}vrrp_sync_group {SYNC_GROUP} {{
    group {{
        inside
        outside
    }}
    notify {notify}
{group_extra}}}

{instance("inside", LAN_IF, VRID_INSIDE, src=fw.lan_addr, dst=peer.lan_addr,
          vip=plan.inside_vip, prefix=plan.lan_prefix)}
{instance("outside", WAN_IF, VRID_OUTSIDE, src=fw.wan_addr, dst=peer.wan_addr,
          vip=plan.outside_vip, prefix=plan.wan_prefix)}"""


class Keepalived:
    """keepalived on one firewall (started and stopped by the drill)."""

    def __init__(self, ha: HaLab, fw: Firewall, timing: Timing, hooks: KeepalivedHooks) -> None:
        self.ha = ha
        self.fw = fw
        self.config = fw.workdir / "keepalived.conf"
        self.log = fw.workdir / "keepalived.log"
        self.transitions_log = fw.workdir / "transitions.log"
        script = fw.workdir / "notify.sh"
        script.write_text(notify_script(self.transitions_log))
        # keepalived's script security refuses scripts writable by others.
        script.chmod(0o700)
        self.config.write_text(render(fw, ha.peer(fw), ha.plan, timing=timing,
                                       notify=script, hooks=hooks))
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether this node's keepalived process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start keepalived (VRRP only, foreground, logging to ``keepalived.log``)."""
        wd = self.fw.workdir
        with self.log.open("ab") as log:
            self._proc = self.ha.lab.spawn(
                self.fw.ns,
                ["keepalived", "--vrrp", "--dont-fork", "--log-console", "--log-detail",
                 "--no-syslog", "--use-file", str(self.config),
                 "--pid", str(wd / "keepalived.pid"), "--vrrp_pid", str(wd / "vrrp.pid")],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def terminate(self, timeout: float = 10) -> None:
        """Stop keepalived gracefully (SIGTERM: it sends priority-0 adverts and drops VIPs)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGTERM)
        self._proc.wait(timeout=timeout)

    def transitions(self) -> list[Transition]:
        """The sync-group transitions logged so far, oldest first."""
        if not self.transitions_log.exists():
            return []
        found = []
        for line in self.transitions_log.read_text().splitlines():
            fields = line.split()
            # <time> GROUP <name> <STATE> [<prio>]
            if len(fields) >= 4 and fields[1] == "GROUP":
                found.append(Transition(self.fw.name, float(fields[0]), fields[3]))
        return found
