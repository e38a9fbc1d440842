"""The shipped systemd unit: `systemd-analyze verify` passes, hardening stays in place."""

from __future__ import annotations

import pwd
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "replicator.service"
SYSUSERS = REPO / "systemd" / "replicator.sysusers"
SHIPPED_BINARY = "/usr/local/bin/replicator"


def settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit (all sections), values in file order."""
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_analyze_verify_passes(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point a copy at this venv's script.
    binary = Path(sys.executable).parent / "replicator"
    assert binary.exists(), f"{binary} missing: install the package (make venv)"
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_BINARY} " in text
    copy = tmp_path / "replicator.service"
    copy.write_text(text.replace(f"ExecStart={SHIPPED_BINARY} ", f"ExecStart={binary} "))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_notify_reload_and_watchdog() -> None:
    unit = settings()
    assert unit["Type"] == ["notify"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["WatchdogSec"] == ["30s"]
    (exec_start,) = unit["ExecStart"]
    assert exec_start.split()[1:] == ["daemon", "--config", "/etc/replicator/replicator.toml"]


def test_only_cap_net_admin_and_no_private_network() -> None:
    unit = settings()
    assert unit["User"] == ["replicator"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_ADMIN"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN"]
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["RestrictAddressFamilies"] == ["AF_UNIX AF_NETLINK AF_INET AF_INET6"]
    assert "PrivateNetwork" not in unit
    assert "PrivateUsers" not in unit
    # /proc/sys must stay writable for kernel.conntrack_events = "enable".
    assert "ProtectKernelTunables" not in unit
    assert unit["RuntimeDirectory"] == ["replicator"]
    assert unit["RuntimeDirectoryPreserve"] == ["yes"]


def test_sysusers_file_creates_the_user() -> None:
    result = subprocess.run(
        ["systemd-sysusers", "--dry-run", str(SYSUSERS)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    output = result.stdout + result.stderr
    try:
        pwd.getpwnam("replicator")
    except KeyError:  # the usual case: the dry run would create it
        assert "Creating user 'replicator'" in output
    else:  # installed on this machine already: nothing to do, and nothing refused
        assert "Failed" not in output
