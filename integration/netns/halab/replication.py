"""The hook a state-replication system plugs into the drill.

The drill calls, in this order:

1. :meth:`Replication.start` once the topology and both rulesets are up and before
   keepalived runs: start the daemons on both firewalls; return when they are ready.
2. :meth:`Replication.keepalived` for each firewall while writing its keepalived
   configuration: notify commands, a notify FIFO, track scripts...
3. During the drill: :meth:`Replication.caught_up` before each event (after the
   phase's traffic settled), :meth:`Replication.kill` (the "daemon killed with SIGKILL" event,
   always on the current master) and :meth:`Replication.revive` (when that node is
   restored for the fail-back, before its keepalived may preempt again); after each
   event :meth:`Replication.commits` (when the new master's commit finished, if any).
4. :meth:`Replication.stop` at the end (the lab kills whatever is left anyway).

:meth:`Replication.diagnostics` supplies log excerpts for a failing drill's report.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from integration.netns.halab.keepalived import KeepalivedHooks
from integration.netns.halab.topology import Firewall, HaLab


class Replication(ABC):
    """A state-replication system under test (one instance per drill lab)."""

    #: Short name for reports.
    name: str
    #: Whether keepalived notices a dead daemon by itself (a ``track_script`` on it), so
    #: that killing the master's daemon must move the VIPs with no other help.
    tracked_by_keepalived: bool = False

    @abstractmethod
    def start(self, ha: HaLab, fw_a: Firewall, fw_b: Firewall) -> None:
        """Start replication between ``fw_a`` and ``fw_b`` (ready on return)."""

    @abstractmethod
    def keepalived(self, fw: Firewall) -> KeepalivedHooks:
        """What ``fw``'s keepalived must run or tell this system on transitions."""

    @abstractmethod
    def kill(self, fw: Firewall) -> bool:
        """SIGKILL ``fw``'s replication daemon; ``False`` if there is none to kill."""

    @abstractmethod
    def revive(self, fw: Firewall) -> None:
        """Restart ``fw``'s daemon after :meth:`kill` (ready, and synced, on return)."""

    @abstractmethod
    def stop(self) -> None:
        """Stop every daemon this system started."""

    def caught_up(self, timeout: float) -> float:
        """Wait until the standby holds the active node's current table (at most
        ``timeout`` s); the seconds waited. By default nothing is waited for: the
        drill's fixed ``settle`` time is all the system gets."""
        return 0.0

    def diagnostics(self) -> dict[str, str]:
        """Named log excerpts worth showing when a drill fails."""
        return {}

    def commits(self, fw: Firewall) -> list[tuple[float, float, int]]:
        """The commits of the peer's entries into ``fw``'s kernel (a standby that keeps
        them outside the kernel writes them when it becomes master), as (wall-clock time
        it finished, seconds it took, entries applied). By default none are known."""
        return []


class NoReplication(Replication):
    """The negative control: nothing replicates, so established flows must break."""

    name = "none"

    def start(self, ha: HaLab, fw_a: Firewall, fw_b: Firewall) -> None:
        """Nothing to start."""

    def keepalived(self, fw: Firewall) -> KeepalivedHooks:
        """No hooks."""
        return KeepalivedHooks()

    def kill(self, fw: Firewall) -> bool:
        """There is no daemon."""
        return False

    def revive(self, fw: Firewall) -> None:
        """Nothing to restart."""

    def stop(self) -> None:
        """Nothing to stop."""
