"""Operator commands against a fake handler, through a real control socket."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import trio
from controlfake import ENTRIES, STATS, STATUS, FakeHandler

from replicator import cli
from replicator.control import CacheName, ResyncSource, serve_control
from replicator.role import VrrpEvent, VrrpKind, VrrpState


def config_text(socket: Path, key: Path, cert: Path) -> str:
    return f"""
[node]
name = "fw-b"
[sync]
listen_address = "192.0.2.2"
peer_address = "192.0.2.1"
[tls]
key = "{key}"
cert = "{cert}"
peer_certs = ["{cert}"]
[control]
socket = "{socket}"
"""


class Cli:
    """Runs ``replicator`` commands in a worker thread while trio serves the socket."""

    def __init__(self, socket: Path, config: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.socket = socket
        self.config = config
        self.capsys = capsys

    async def __call__(self, *argv: str, via_config: bool = False) -> tuple[int, str, str]:
        where = ["-c", str(self.config)] if via_config else ["--socket", str(self.socket)]
        args = [*argv, *where] if argv[0] != "config" else list(argv)
        code = await trio.to_thread.run_sync(cli.main, args)
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "node.key", tmp_path / "node.crt"
    key.write_text("key")
    key.chmod(0o600)
    cert.write_text("cert")
    return key, cert


@pytest.fixture
async def served(
    nursery: trio.Nursery,
    tmp_path: Path,
    files: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> tuple[FakeHandler, Cli]:
    handler = FakeHandler()
    socket = tmp_path / "control.sock"
    config = tmp_path / "replicator.toml"
    config.write_text(config_text(socket, *files))
    await nursery.start(functools.partial(serve_control, socket, handler))
    return handler, Cli(socket, config, capsys)


def fields_of(text: str) -> dict[str, str]:
    """Parse ``key: value`` lines."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        result[key] = value
    return result


async def test_status_text_and_json(served: tuple[FakeHandler, Cli]) -> None:
    _, run = served
    code, out, err = await run("status")
    assert (code, err) == (0, "")
    assert fields_of(out) == {
        "node": "fw-a",
        "role": "BACKUP",
        "mode": "cache",
        "peer": "192.0.2.2:3790 (up)",
        "in sync": "no: bulk transfer from the peer in progress",
        "entries": "external=34 internal=12 kernel=12",
        "replication lag": "0.250 s",
        "uptime": "3600 s",
        "epoch": "000000001234abcd",
        "last resync": "full receive, 1000 entries in 0.250 s, 12 s ago",
    }
    code, out, _ = await run("status", "--json")
    assert code == 0
    assert json.loads(out) == STATUS


async def test_the_socket_is_found_through_the_config_file(
    served: tuple[FakeHandler, Cli],
) -> None:
    handler, run = served
    code, out, _ = await run("stats", via_config=True)
    assert code == 0
    assert handler.calls == [("stats", None)]
    assert dict(line.split(" ") for line in out.splitlines()) == {
        name: f"{value:g}" for name, value in STATS.items()
    }


async def test_dump(served: tuple[FakeHandler, Cli]) -> None:
    handler, run = served
    code, out, _ = await run("dump", "--internal")
    assert code == 0
    assert out.splitlines() == ENTRIES
    code, out, _ = await run("dump", "--external", "--json")
    assert json.loads(out) == {"cache": "external", "entries": ENTRIES}
    assert handler.calls == [("dump", CacheName.INTERNAL), ("dump", CacheName.EXTERNAL)]


async def test_dump_needs_a_cache(served: tuple[FakeHandler, Cli]) -> None:
    _, run = served
    with pytest.raises(SystemExit) as exit_:
        await run("dump")
    assert exit_.value.code == 2


async def test_actions(served: tuple[FakeHandler, Cli]) -> None:
    handler, run = served
    assert (await run("commit"))[:2] == (0, "committed 34 entries in 0.125 s (1 failed)\n")
    assert (await run("flush", "--external"))[:2] == (0, "flushed the external cache\n")
    assert (await run("resync", "--kernel"))[:2] == (0, "12 entries\n")
    assert (await run("resync", "--peer", "--json"))[0] == 0
    assert (await run("bulk-send"))[:2] == (0, "sent 12 entries\n")
    assert (await run("shorten-timers"))[:2] == (0, "5 entries\n")
    assert handler.calls == [
        ("commit", None),
        ("flush", CacheName.EXTERNAL),
        ("resync", ResyncSource.KERNEL),
        ("resync", ResyncSource.PEER),
        ("bulk_send", None),
        ("shorten_timers", None),
    ]


async def test_notify_as_keepalived_calls_it(served: tuple[FakeHandler, Cli]) -> None:
    handler, run = served
    code, out, _ = await run("notify", "INSTANCE", "VI_1", "MASTER", "100")
    assert (code, out) == (0, "accepted: role MASTER\n")
    assert handler.calls == [
        ("notify", VrrpEvent(VrrpKind.INSTANCE, "VI_1", VrrpState.MASTER, 100))
    ]


async def test_notify_refuses_a_bad_line_without_asking_the_daemon(
    served: tuple[FakeHandler, Cli],
) -> None:
    handler, run = served
    code, out, err = await run("notify", "GROUP", "VG", "BACKUP", "high")
    assert (code, out) == (1, "")
    assert err == "replicator: bad priority 'high'\n"
    with pytest.raises(SystemExit):
        await run("notify", "GROUP", "VG", "PRIMARY", "1")
    assert handler.calls == []


async def test_check_exit_status(served: tuple[FakeHandler, Cli]) -> None:
    handler, run = served
    assert (await run("check"))[:2] == (0, "ok\n")
    handler.check_ok = False
    assert (await run("check"))[:2] == (1, "not ready: peer down\n")
    code, out, _ = await run("check", "--json")
    assert code == 1
    assert json.loads(out) == {"ok": False, "reason": "peer down"}


async def test_verify_exit_status(served: tuple[FakeHandler, Cli]) -> None:
    handler, run = served
    assert (await run("verify"))[:2] == (0, "ok: 46 entries checked\n")
    handler.verify_problems = ["kernel has 2 entries the internal cache lacks"]
    code, out, _ = await run("verify")
    assert code == 1
    assert out.splitlines() == [
        "FAILED: 46 entries checked",
        "  kernel has 2 entries the internal cache lacks",
    ]


async def test_daemon_errors_are_one_line_and_exit_1(served: tuple[FakeHandler, Cli]) -> None:
    handler, run = served
    handler.fail_with = "commit already running"
    code, out, err = await run("commit")
    assert (code, out, err) == (1, "", "replicator: commit already running\n")


async def test_no_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = await trio.to_thread.run_sync(
        cli.main, ["status", "--socket", str(tmp_path / "none.sock")]
    )
    _, err = capsys.readouterr()
    assert code == 1
    assert err.startswith("replicator: cannot reach the daemon at ")
    assert err.count("\n") == 1


def test_a_broken_config_file_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[node]\nnmae = 1\n")
    assert cli.main(["status", "-c", str(path)]) == 1
    assert capsys.readouterr().err == "replicator: node.nmae: unknown key (line 2)\n"


def test_config_check(
    tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "replicator.toml"
    path.write_text(config_text(tmp_path / "c.sock", *files))
    assert cli.main(["config", "check", "-c", str(path)]) == 0
    assert capsys.readouterr().out == f"ok: {path}\n"
    assert cli.main(["config", "check", "-c", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ok": True, "path": str(path), "node": "fw-b"}


def test_config_check_reports_the_reason(
    tmp_path: Path, files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "replicator.toml"
    path.write_text(config_text(tmp_path / "c.sock", *files).replace("peer_address", "peer_adress"))
    assert cli.main(["config", "check", "-c", str(path)]) == 1
    assert capsys.readouterr().err == "replicator: sync.peer_adress: unknown key (line 6)\n"
    files[0].chmod(0o644)
    path.write_text(config_text(tmp_path / "c.sock", *files))
    assert cli.main(["config", "check", "-c", str(path)]) == 1
    assert "tls.key: key file" in capsys.readouterr().err
