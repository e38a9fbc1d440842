"""replicator under the failover drill, wired to keepalived as its documentation says.

One real daemon per firewall (:mod:`integration.netns.nodes`), listening on the
firewall's ``sync0`` address and dialling the peer's, with the mutual-TLS keys made
by ``replicator keygen``. The firewalls' own addresses (legs, sync link, VIPs) are in
``filters.ignore_addresses``: only forwarded and translated connections replicate.

keepalived wiring, as ``etc/keepalived/keepalived.conf.example`` and
``docs/operations.md`` (section 4) recommend:

* ``vrrp_notify_fifo`` in ``global_defs``, read by the daemon
  (``keepalived.notify_fifo``, ``keepalived.vrrp_name`` = the sync group): the sync
  group's transitions reach the role machine in order, with no fork per event. No
  ``notify`` script as well (never both).
* ``replicator check`` as a ``track_script`` of both instances with a negative weight
  and ``sync_group_tracking_weight`` in the group: a node whose daemon is dead or not
  yet in sync loses 60 priority points, so it does not preempt a healthy master; and
  when the master's daemon dies, the master (150 - 60) falls below the backup (100),
  whose ``check`` keeps passing (it held a complete copy of the table), and the backup
  preempts: keepalived moves the VIPs by itself (the drill's ``daemon-kill`` event
  relies on nothing else, :attr:`ReplicatorReplication.tracked_by_keepalived`).
  The script's ``interval 1``, ``fall 2``, ``rise 2`` and weight are the example's: a
  dead daemon is noticed by the first or second run after the kill, so within 1-2 s
  plus the run time of ``check`` (a connection refused: no daemon to wait for). Its
  timeout is longer (``check --timeout 8``, script ``timeout 10``, where the example
  has 5 and 6): a daemon in the middle of a resync answers late on the shared lab host;
  keepalived counts a timed-out run as a failure, and a keepalived that has just
  started demotes on the first failure, so with the example's timeout the fail-back
  flapped (master, demoted, master again) and broke the flows it was moving.

Before each event the drill waits (:meth:`ReplicatorReplication.caught_up`) until the
standby holds the master's whole table: entries still in flight when the master dies
are lost by any replication, and this drill is about what happens to the ones that
were replicated. The wait is reported next to each phase; on the shared host it is
the replication lag of the phase's 2200 new connections.

After a restart (:meth:`ReplicatorReplication.revive`) keepalived does not repeat the
current state, so the last one it reported is told to the daemon with ``replicator
notify`` (``docs/operations.md``, "Manual transitions and stuck roles").
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

from integration.netns.halab.drill import DrillConfig
from integration.netns.halab.keepalived import SYNC_GROUP, KeepalivedHooks
from integration.netns.halab.replication import Replication
from integration.netns.halab.topology import Firewall, HaLab
from integration.netns.nodes import DaemonNode, NodeSpec, replicator_argv

#: Weight of the ``replicator check`` track script (as in the shipped example).
CHECK_WEIGHT = -60
#: ``replicator check --timeout`` (the example relies on the default 5 s, with the
#: script's ``timeout 6``): see the module docstring for why the lab waits longer.
CHECK_TIMEOUT = 8
#: How long a daemon may take to be ready and in sync with its peer.
SYNC_TIMEOUT = 30.0

#: ``hold``: in cache mode the VIPs move before the commit, and packets of established
#: TCP flows dropped meanwhile are retransmitted with exponential backoff; a longer hold
#: lets a flow that the commit did save show it.
DRILL_CONFIG = DrillConfig(hold=4.0)

#: The track script's seconds between runs, failures to demote, successes to recover
#: (as in the shipped example).
CHECK_INTERVAL = 1
CHECK_FALL = 2
CHECK_RISE = 2


def node_name(fw: Firewall) -> str:
    """The ``node.name`` of ``fw``'s daemon."""
    return f"fw{fw.name}"


class ReplicatorReplication(Replication):
    """Two replicator daemons in ``mode`` ``"cache"`` or ``"hot"``."""

    #: ``replicator check`` is a track script: a dead daemon demotes its node.
    tracked_by_keepalived = True

    def __init__(self, mode: str = "hot") -> None:
        if mode not in ("cache", "hot"):
            raise ValueError(f"mode must be 'cache' or 'hot', not {mode!r}")
        self.mode = mode
        self.name = f"replicator ({mode} mode)"
        self._ha: HaLab | None = None
        self.nodes: dict[str, DaemonNode] = {}

    def _fifo(self, fw: Firewall) -> Path:
        return fw.workdir / "notify.fifo"

    def start(self, ha: HaLab, fw_a: Firewall, fw_b: Firewall) -> None:
        """Start both daemons; return once each is in sync with the other."""
        self._ha = ha
        plan = ha.plan
        own = [plan.inside_vip, plan.outside_vip]
        for fw in (fw_a, fw_b):
            own += [fw.lan_addr, fw.wan_addr, fw.sync_addr]
        # Both nodes share one directory: each finds the peer's certificate there.
        workdir = ha.workdir / "replicator"
        workdir.mkdir(exist_ok=True)
        for fw in (fw_a, fw_b):
            spec = NodeSpec(
                name=node_name(fw), peer_name=node_name(ha.peer(fw)),
                listen_address=fw.sync_addr, peer_address=fw.peer_sync_addr,
                mode=self.mode, notify_fifo=self._fifo(fw), vrrp_name=SYNC_GROUP,
                ignore_addresses=("127.0.0.0/8", *own),
                # The kernel reports no event when packets refresh a timeout: the
                # master learns refreshed timeouts from its re-dumps, and until then
                # the standby's copy of a short-lived entry (UDP: 30/120 s) may
                # expire. Re-dump often enough for the drill's short UDP timeouts
                # and its caught-up wait (see docs/performance.md, known gaps).
                extra={"kernel": ["refresh_interval = 4"]})
            self.nodes[fw.name] = DaemonNode(ha.lab, fw.ns, spec, workdir)
        for node in self.nodes.values():
            node.start(wait=False)
        for node in self.nodes.values():
            node.wait_ready()
        for fw in (fw_a, fw_b):
            self._await_in_sync(fw)

    def _await_in_sync(self, fw: Firewall) -> None:
        node = self.nodes[fw.name]
        deadline = time.monotonic() + SYNC_TIMEOUT
        while True:
            status = node.try_cli("status")
            if status is not None and status["in_sync"] and status["peer_up"]:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"replicator on fw{fw.name} not in sync: {status}\n"
                                   + node.log_tail())
            time.sleep(0.05)

    def _check_log(self, fw: Firewall) -> Path:
        return fw.workdir / "check.log"

    def keepalived(self, fw: Firewall) -> KeepalivedHooks:
        """The FIFO in ``global_defs``, ``replicator check`` tracked by both instances."""
        node = self.nodes[fw.name]
        # The check command as documented, in a wrapper that logs each verdict.
        script = fw.workdir / "check.sh"
        check = " ".join(replicator_argv("check", "-c", str(node.config),
                                         "--timeout", str(CHECK_TIMEOUT)))
        script.write_text(check_script(check, self._check_log(fw)))
        # keepalived's script security refuses scripts writable by others.
        script.chmod(0o700)
        return KeepalivedHooks(
            global_defs=(f"vrrp_notify_fifo {self._fifo(fw)}",),
            blocks=(f"""\
vrrp_script replicator_check {{
    script "{script}"
    interval {CHECK_INTERVAL}
    timeout {CHECK_TIMEOUT + 2}
    fall {CHECK_FALL}
    rise {CHECK_RISE}
    weight {CHECK_WEIGHT}
}}""",),
            sync_group=("sync_group_tracking_weight",),
            instance=("track_script {", "    replicator_check", "}"),
        )

    def kill(self, fw: Firewall) -> bool:
        """SIGKILL ``fw``'s daemon."""
        node = self.nodes.get(fw.name)
        if node is None or node.proc is None or node.proc.poll() is not None:
            return False
        node.kill()
        return True

    def revive(self, fw: Firewall) -> None:
        """Restart ``fw``'s daemon, tell it keepalived's last state, wait until in sync."""
        node = self.nodes[fw.name]
        node.start()
        state = last_group_state(fw.workdir / "transitions.log")
        if state is not None:
            node.cli("notify", "GROUP", SYNC_GROUP, state, str(fw.priority))
        self._await_in_sync(fw)

    def caught_up(self, timeout: float) -> float:
        """Wait until the standby's ``check`` passes and its copy of the master's table
        has as many entries as the master's own (``replicator status`` on both). Nothing
        to wait for while a daemon is down (killed, before the fail-back revives it)."""
        start = time.monotonic()
        if any(node.proc is None or node.proc.poll() is not None
               for node in self.nodes.values()):
            return 0.0
        while True:
            status = {name: node.try_cli("status") for name, node in self.nodes.items()}
            masters = [s for s in status.values() if s is not None and s["role"] == "MASTER"]
            standbys = [s for s in status.values() if s is not None and s["role"] != "MASTER"]
            if len(masters) == 1 and len(standbys) == 1:
                master, standby = masters[0], standbys[0]
                if (standby["in_sync"] and standby["entries"]["external"]
                        == master["entries"]["internal"]):
                    return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"the standby did not catch up in {timeout} s: {status}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM both daemons."""
        for node in self.nodes.values():
            node.stop()

    def commits(self, fw: Firewall) -> list[tuple[float, float, int]]:
        """``fw``'s daemon's ``commit done`` log lines (the log line's time stamp has
        millisecond resolution)."""
        node = self.nodes.get(fw.name)
        if node is None or not node.log.exists():
            return []
        return commit_lines(node.log.read_text(errors="replace"))

    def diagnostics(self) -> dict[str, str]:
        """The end of both daemons' logs."""
        found = {}
        if self._ha is not None:
            for fw in self._ha.firewalls:
                node = self.nodes.get(fw.name)
                if node is not None:
                    found[f"fw{fw.name} replicator log"] = node.log_tail(60)
                log = self._check_log(fw)
                found[f"fw{fw.name} check.log"] = log.read_text() if log.exists() else ""
        return found


def commit_lines(log: str) -> list[tuple[float, float, int]]:
    """Every ``commit done`` line of a daemon's key=value log as (wall-clock time of the
    line, its ``seconds`` and ``applied`` fields)."""
    found = []
    for line in log.splitlines():
        if 'msg="commit done"' not in line:
            continue
        values = dict(part.split("=", 1) for part in line.split() if "=" in part)
        when = datetime.datetime.fromisoformat(values["ts"]).timestamp()
        found.append((when, float(values["seconds"]), int(values["applied"])))
    return found


def check_script(command: str, log: Path) -> str:
    """A track script running ``command`` and appending its exit status, how long it
    took (keepalived notices a dead daemon only as fast as this) and its output."""
    return f"""\
#!/bin/sh
start=$(date +%s%N)
out=$({command} 2>&1)
rc=$?
end=$(date +%s%N)
echo "$(date +%s.%N) rc=$rc ms=$(( (end - start) / 1000000 )) $out" >> {log}
exit $rc
"""


def last_group_state(transitions_log: Path) -> str | None:
    """The last sync-group state keepalived's notify script logged (None: none yet)."""
    if not transitions_log.exists():
        return None
    states = [fields[3] for fields in map(str.split, transitions_log.read_text().splitlines())
              if len(fields) >= 4 and fields[1] == "GROUP"]
    return states[-1] if states else None
