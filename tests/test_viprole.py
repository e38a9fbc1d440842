"""The role read from the virtual addresses (pure part; the daemon's use is in
test_daemon.py, the kernel's addresses in integration/netns/test_viprole.py)."""

from __future__ import annotations

import errno
import ipaddress
import subprocess
import sys

import pyroute2
import pytest
from pyroute2.netlink.exceptions import NetlinkError

from replicator import viprole
from replicator.errors import KernelError
from replicator.role import VrrpState
from replicator.viprole import role_from_addresses

V1, V2 = ipaddress.ip_address("198.51.100.1"), ipaddress.ip_address("2001:db8::1")
OTHER = ipaddress.ip_address("192.0.2.2")


@pytest.mark.parametrize(
    ("held", "state"),
    [
        ({V1, V2, OTHER}, VrrpState.MASTER),
        ({OTHER}, VrrpState.BACKUP),
        (set(), VrrpState.BACKUP),
        # Some but not all: a transition under way, or keepalived configured otherwise.
        ({V1, OTHER}, None),
        ({V2}, None),
    ],
)
def test_all_held_is_master_none_backup_some_undecided(
        held: set[ipaddress.IPv4Address | ipaddress.IPv6Address], state: VrrpState | None
) -> None:
    assert role_from_addresses((V1, V2), held) is state


def test_nothing_to_look_for_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="no virtual addresses"):
        role_from_addresses((), {V1})


def test_a_refused_address_dump_is_the_projects_kernel_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class Refusing:
        def __enter__(self) -> Refusing:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def get_addr(self) -> list[object]:
            raise NetlinkError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(pyroute2, "IPRoute", Refusing)
    with pytest.raises(KernelError, match="reading the addresses") as raised:
        viprole.held_addresses(None)
    assert raised.value.errno == errno.EPERM


def test_the_daemon_does_not_import_pyroute2_unless_it_reads_addresses() -> None:
    # ≈ 9 MB of RSS and 0.2 s of start-up for every daemon otherwise.
    code = ("import sys, replicator.daemon; "
            "sys.exit(1 if 'pyroute2' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
