"""The commands keepalived runs start without importing the daemon's stack.

keepalived runs ``replicator check`` every second as a ``track_script`` and ``replicator
notify`` on transitions: a dead daemon is noticed only as fast as ``check`` starts, so
these commands must not pay for trio, pyroute2 or cryptography. Each case runs the CLI
in a fresh interpreter and lists the modules it ended up with.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from replicator.cli import build_parser

HEAVY = ("trio", "cryptography", "pyroute2", "prometheus_client")

_RUN = """\
import json, sys
from replicator import cli
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def run_cli(*argv: str) -> tuple[int, set[str], str]:
    """Exit status, top-level modules imported, stderr of ``replicator ARGV``."""
    done = subprocess.run([sys.executable, "-c", _RUN, *argv], capture_output=True,
                          text=True, check=True, timeout=60)
    result = json.loads(done.stdout.splitlines()[-1])
    return result["code"], set(result["modules"]), done.stderr


def config_file(tmp_path: Path, socket: Path) -> Path:
    path = tmp_path / "replicator.toml"
    path.write_text(f"""
[node]
name = "fw-b"
[sync]
listen_address = "192.0.2.2"
peer_address = "192.0.2.1"
[tls]
key = "{tmp_path / 'node.key'}"
cert = "{tmp_path / 'node.crt'}"
peer_certs = ["{tmp_path / 'peer.crt'}"]
[control]
socket = "{socket}"
""")
    return path


@pytest.mark.parametrize("command", [
    ["check"],
    ["notify", "GROUP", "VG_FW", "MASTER", "150"],
    ["status", "--json"],
])
def test_control_commands_import_none_of_the_daemon_stack(
        tmp_path: Path, command: list[str]) -> None:
    socket = tmp_path / "control.sock"  # nothing listens: the command fails cleanly
    code, modules, err = run_cli(*command, "-c", str(config_file(tmp_path, socket)))
    assert code == 1
    assert f"cannot reach the daemon at {socket}" in err
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def commands(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The help text of each sub-command of ``parser``, by name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {name: sub.format_help() for name, sub in action.choices.items()}
    return {}


def test_other_commands_get_the_full_parser() -> None:
    code, modules, _ = run_cli("ct", "--help")
    assert code == 0
    assert "trio" in modules
    assert {"ct", "keygen", "run", "check", "notify", "config"} <= set(commands(build_parser()))


def test_the_operator_parser_is_the_full_parser_cut_down() -> None:
    light, full = commands(build_parser(operator_only=True)), commands(build_parser())
    assert {"check", "notify", "status", "config"} <= set(light)
    assert "keygen" not in light
    assert {name: full[name] for name in light} == light
