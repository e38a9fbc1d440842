"""conntrackd (conntrack-tools, FTFW over the sync link) as the drill's positive control.

Wired the way conntrack-tools documents it: both daemons exchange state in FTFW mode
over unicast UDP on ``sync0``, and keepalived's sync group runs, on becoming

* MASTER: commit the external cache into the kernel (``-c``), flush the caches
  (``-f``), resync the internal cache from the kernel (``-R``), bulk-send it (``-B``);
* BACKUP: make sure the daemon runs (``-s``, else ``-d``), shorten the kernel timers
  (``-t``), request a full resync from the peer (``-n``);
* FAULT: shorten the kernel timers (``-t``).

If established flows survive the drill with this, the harness can show survival, so a
replicator failure is replicator's and not the harness's.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from integration.netns.halab.keepalived import KeepalivedHooks
from integration.netns.halab.replication import Replication
from integration.netns.halab.topology import SYNC_IF, Firewall, HaLab

PORT = 3780
BINARY = "/usr/sbin/conntrackd"


_TUPLE = re.compile(r"^(\w+)\s.*?src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")


def _orig_tuples(listing: str) -> set[tuple[str, ...]]:
    """(protocol, src, dst, sport, dport) of each TCP/UDP line of a conntrack listing."""
    found = set()
    for line in listing.splitlines():
        match = _TUPLE.match(line)
        if match:
            found.add(match.groups())
    return found


def config(fw: Firewall, ignore: list[str], *, external_cache: bool) -> str:
    """conntrackd.conf for ``fw`` (paths inside its workdir)."""
    wd = fw.workdir
    addresses = "".join(f"            IPv4_address {addr}\n" for addr in ignore)
    return f"""\
Sync {{
    Mode FTFW {{
        DisableExternalCache {"off" if external_cache else "on"}
    }}
    UDP {{
        IPv4_address {fw.sync_addr}
        IPv4_Destination_Address {fw.peer_sync_addr}
        Port {PORT}
        Interface {SYNC_IF}
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }}
}}
General {{
    HashSize 32768
    HashLimit 131072
    LogFile {wd / "conntrackd.log"}
    Syslog off
    LockFile {wd / "conntrackd.lock"}
    UNIX {{
        Path {wd / "conntrackd.ctl"}
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    NetlinkEventsReliable on
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
        }}
        Address Ignore {{
{addresses}        }}
    }}
}}
"""


def transition_script(conf: Path, lock: Path, log: Path) -> str:
    """The primary/backup/fault script keepalived runs (each step timed into ``log``)."""
    return f"""\
#!/bin/sh
C="{BINARY} -C {conf}"
step() {{ "$@" >/dev/null 2>&1; echo "$(date +%s.%N) $1 $2 $3 $4 -> $?" >> {log}; }}
echo "$(date +%s.%N) $1 begin" >> {log}
case "$1" in
primary)
    step $C -c
    step $C -f
    step $C -R
    step $C -B
    ;;
backup)
    if ! $C -s >/dev/null 2>&1; then
        rm -f {lock}
        step $C -d
    fi
    step $C -t
    step $C -n
    ;;
fault)
    step $C -t
    ;;
esac
echo "$(date +%s.%N) $1 end" >> {log}
"""


class ConntrackdReplication(Replication):
    """conntrackd FTFW between the two firewalls, driven by keepalived transitions.

    ``external_cache=True`` is conntrackd's default: the backup keeps the peer's states
    in user space until its MASTER transition commits them. ``False`` sets
    ``DisableExternalCache on``: states go straight into the backup's kernel table.
    """

    def __init__(self, *, external_cache: bool = True) -> None:
        self.external_cache = external_cache
        self.name = f"conntrackd ({'external cache' if external_cache else 'no external cache'})"
        self._ha: HaLab | None = None

    def _paths(self, fw: Firewall) -> tuple[Path, Path, Path]:
        wd = fw.workdir
        return wd / "conntrackd.conf", wd / "conntrackd.lock", wd / "transitions-ctd.log"

    def _ctl(self, fw: Firewall, *args: str) -> str:
        conf, _, _ = self._paths(fw)
        return fw.ns.run([BINARY, "-C", str(conf), *args]).stdout

    def _launch(self, fw: Firewall) -> None:
        assert self._ha is not None
        conf, lock, _ = self._paths(fw)
        lock.unlink(missing_ok=True)
        self._ha.lab.spawn(fw.ns, [BINARY, "-C", str(conf)], stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while fw.ns.run([BINARY, "-C", str(conf), "-s"], check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd on fw{fw.name} did not start\n"
                                   + self._log_tail(fw))
            time.sleep(0.05)

    def _log_tail(self, fw: Firewall) -> str:
        log = fw.workdir / "conntrackd.log"
        return log.read_text()[-3000:] if log.exists() else ""

    def start(self, ha: HaLab, fw_a: Firewall, fw_b: Firewall) -> None:
        """Write both configs and transition scripts, start both daemons."""
        self._ha = ha
        plan = ha.plan
        own = [plan.inside_vip, plan.outside_vip]
        for fw in (fw_a, fw_b):
            own += [fw.lan_addr, fw.wan_addr, fw.sync_addr]
        for fw in (fw_a, fw_b):
            conf, lock, log = self._paths(fw)
            conf.write_text(config(fw, ["127.0.0.1", *own],
                                   external_cache=self.external_cache))
            script = fw.workdir / "primary-backup.sh"
            script.write_text(transition_script(conf, lock, log))
            script.chmod(0o700)
        for fw in (fw_a, fw_b):
            self._launch(fw)

    def keepalived(self, fw: Firewall) -> KeepalivedHooks:
        """``notify_master/backup/fault`` run the transition script."""
        script = fw.workdir / "primary-backup.sh"
        return KeepalivedHooks(sync_group=(
            f'notify_master "{script} primary"',
            f'notify_backup "{script} backup"',
            f'notify_fault "{script} fault"',
        ))

    def _pids(self, fw: Firewall) -> list[int]:
        conf, _, _ = self._paths(fw)
        found = []
        for pid in fw.ns.run(["ip", "netns", "pids", fw.ns.name]).stdout.split():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            # The daemon, not a short-lived control command (those carry an option).
            if argv[:3] == [BINARY.encode(), b"-C", str(conf).encode()] and (
                    len(argv) == 4 or argv[3] in (b"", b"-d")):
                found.append(int(pid))
        return found

    def kill(self, fw: Firewall) -> bool:
        """SIGKILL ``fw``'s conntrackd."""
        pids = self._pids(fw)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return bool(pids)

    def _synced_tuples(self, fw: Firewall) -> set[tuple[str, ...]]:
        """Original tuples of the peer states ``fw`` holds (external cache or kernel)."""
        if self.external_cache:
            return _orig_tuples(self._ctl(fw, "-e"))
        return _orig_tuples(fw.ns.run(["conntrack", "-L"]).stdout)

    def revive(self, fw: Firewall) -> None:
        """Restart ``fw``'s conntrackd and pull the peer's states (``-n``) before returning."""
        assert self._ha is not None
        self._launch(fw)
        self._ctl(fw, "-n")
        peer = self._ha.peer(fw)
        deadline = time.monotonic() + 10
        # Re-read the peer each time: its flows may end while the resync runs.
        while not _orig_tuples(self._ctl(peer, "-i")) <= self._synced_tuples(fw):
            if time.monotonic() > deadline:
                raise RuntimeError(f"conntrackd on fw{fw.name} did not resync\n"
                                   + self._log_tail(fw))
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill both daemons (whoever started them)."""
        if self._ha is not None:
            for fw in self._ha.firewalls:
                self.kill(fw)

    def diagnostics(self) -> dict[str, str]:
        """conntrackd logs and transition-script timings of both firewalls."""
        found = {}
        if self._ha is not None:
            for fw in self._ha.firewalls:
                found[f"fw{fw.name} conntrackd.log"] = self._log_tail(fw)
                log = self._paths(fw)[2]
                found[f"fw{fw.name} primary-backup.sh"] = log.read_text() if log.exists() else ""
        return found
