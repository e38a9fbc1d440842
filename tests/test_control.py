"""The control socket: protocol codec (incl. fuzz), trio server + client, authorisation."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from controlfake import ENTRIES, STATS, STATUS, FakeHandler
from hypothesis import given
from hypothesis import strategies as st

from replicator import control
from replicator.control import (
    MAX_REQUEST,
    CacheName,
    Command,
    ControlClient,
    PeerCred,
    Request,
    Response,
    ResyncSource,
    authorised,
    check_result,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    peer_credentials,
    serve_control,
)
from replicator.errors import ControlDecodeError, ControlError
from replicator.role import VrrpEvent, VrrpKind, VrrpState

VALID_REQUESTS = [
    Request(Command.STATUS),
    Request(Command.STATS),
    Request(Command.DUMP, "internal"),
    Request(Command.DUMP, "external"),
    Request(Command.COMMIT),
    Request(Command.FLUSH, "external"),
    Request(Command.RESYNC, "kernel"),
    Request(Command.RESYNC, "peer"),
    Request(Command.BULK_SEND),
    Request(Command.SHORTEN_TIMERS),
    Request(Command.NOTIFY, "GROUP VG_FW MASTER 100"),
    Request(Command.CHECK),
    Request(Command.VERIFY),
]


# --- request codec --------------------------------------------------------------------


@pytest.mark.parametrize("request_", VALID_REQUESTS, ids=lambda r: f"{r.command}-{r.arg}")
def test_request_round_trip(request_: Request) -> None:
    data = encode_request(request_)
    assert data.endswith(b"\n")
    assert data.count(b"\n") == 1
    assert decode_request(data) == request_


def test_every_command_has_a_valid_request_here() -> None:
    assert {r.command for r in VALID_REQUESTS} == set(Command)


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a JSON line"),
        (b"status\n", "not a JSON line"),
        (b"\xff\n", "not a JSON line"),
        (b"[1]\n", "expected a JSON object"),
        (line({"v": 1, "cmd": "status"}), "exactly v, cmd and arg"),
        (line({"v": 1, "cmd": "status", "arg": "", "x": 1}), "exactly v, cmd and arg"),
        (line({"v": 2, "cmd": "status", "arg": ""}), "unsupported protocol version 2"),
        (line({"v": True, "cmd": "status", "arg": ""}), "unsupported protocol version True"),
        (line({"v": 1, "cmd": 5, "arg": ""}), "cmd and arg must be strings"),
        (line({"v": 1, "cmd": "status", "arg": None}), "cmd and arg must be strings"),
        (line({"v": 1, "cmd": "reboot", "arg": ""}), "unknown command 'reboot'"),
        (line({"v": 1, "cmd": "status", "arg": "x"}), "status takes no argument"),
        (line({"v": 1, "cmd": "dump", "arg": ""}), "dump needs one of internal, external"),
        (line({"v": 1, "cmd": "flush", "arg": "kernel"}), "flush needs one of internal, ext"),
        (line({"v": 1, "cmd": "resync", "arg": "internal"}), "resync needs one of kernel, peer"),
        (line({"v": 1, "cmd": "notify", "arg": "GROUP VG MASTER"}), "expected 'GROUP|INST"),
        (b'{"v": NaN, "cmd": "status", "arg": ""}\n', "NaN is not valid JSON"),
        (b"[" * 3000 + b"]" * 3000, "request longer than"),
        (b"[" * 2000 + b"]" * 2000, "not a JSON line"),
        (b" " * (MAX_REQUEST + 1), f"request longer than {MAX_REQUEST} bytes"),
    ],
)
def test_decode_request_rejects(data: bytes, message: str) -> None:
    with pytest.raises(ControlDecodeError, match=message.replace("|", r"\|")):
        decode_request(data)


def test_encode_request_refuses_invalid_requests() -> None:
    with pytest.raises(ControlDecodeError):
        encode_request(Request(Command.DUMP, "everything"))
    with pytest.raises(ControlDecodeError, match="longer than"):
        encode_request(Request(Command.NOTIFY, "GROUP " + "x" * 5000 + " MASTER 1"))


@given(st.binary(max_size=MAX_REQUEST + 10))
def test_decode_request_raises_only_its_error_on_bytes(data: bytes) -> None:
    with contextlib.suppress(ControlDecodeError):
        decode_request(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "v": json_values,
            "cmd": st.sampled_from([c.value for c in Command]) | json_values,
            "arg": st.sampled_from(["", "internal", "peer", "GROUP G BACKUP 1"]) | json_values,
        },
    )
)
def test_decode_request_raises_only_its_error_on_objects(message: dict[str, object]) -> None:
    with contextlib.suppress(ControlDecodeError):
        request = decode_request(json.dumps(message).encode())
        assert decode_request(encode_request(request)) == request


# --- response codec -------------------------------------------------------------------

GOOD_RESULTS: dict[Command, object] = {
    Command.STATUS: STATUS,
    Command.STATS: STATS,
    Command.DUMP: {"cache": "internal", "entries": ENTRIES},
    Command.COMMIT: {"applied": 1, "failed": 0, "seconds": 1},
    Command.FLUSH: {"count": 1, "detail": ""},
    Command.RESYNC: {"count": 1, "detail": ""},
    Command.BULK_SEND: {"count": 1, "detail": ""},
    Command.SHORTEN_TIMERS: {"count": 1, "detail": ""},
    Command.NOTIFY: {"verdict": "accepted", "role": "MASTER"},
    Command.CHECK: {"ok": True, "reason": ""},
    Command.VERIFY: {"ok": False, "checked": 3, "problems": ["x"]},
}


@pytest.mark.parametrize("command", list(Command))
def test_response_round_trip(command: Command) -> None:
    result = GOOD_RESULTS[command]
    data = encode_response(Response(True, result, ""))
    assert decode_response(data, command) == (True, result, "")


def test_error_response_round_trip() -> None:
    data = encode_response(Response(False, None, "commit failed"))
    assert decode_response(data, Command.COMMIT) == (False, None, "commit failed")


@pytest.mark.parametrize(
    ("command", "result", "where"),
    [
        (Command.STATUS, {**STATUS, "peer_up": 1}, "result.peer_up: expected bool"),
        (Command.STATUS, {**STATUS, "entries": {"internal": True}}, "result.entries.internal"),
        (Command.STATUS, {**STATUS, "replication_lag_seconds": "0"}, "unexpected str"),
        (Command.STATUS, {**STATUS, "extra": 1}, "expected keys"),
        (Command.STATUS, [], "result: expected an object"),
        (Command.STATS, {"x": "1"}, "result.x: expected float"),
        (Command.STATS, {"x": False}, "result.x: expected float"),
        (Command.STATS, [1], "result: expected an object"),
        (Command.DUMP, {"cache": "internal", "entries": "x"}, "result.entries: expected an array"),
        (Command.DUMP, {"cache": "internal", "entries": [1]}, r"result.entries\[0\]"),
        (Command.COMMIT, {"applied": 1.5, "failed": 0, "seconds": 1}, "result.applied: expected"),
    ],
)
def test_check_result_refuses_wrong_shapes(command: Command, result: object, where: str) -> None:
    with pytest.raises(ControlDecodeError, match=where):
        check_result(command, result)


def test_status_lag_may_be_null() -> None:
    check_result(Command.STATUS, {**STATUS, "replication_lag_seconds": None})


@pytest.mark.parametrize(
    "data",
    [
        b'{"ok": true}\n',
        b'{"ok": false}\n',
        b'{"ok": false, "error": 1}\n',
        b'{"ok": 1, "result": {}}\n',
        b'{"ok": true, "result": {}, "error": ""}\n',
    ],
)
def test_decode_response_rejects(data: bytes) -> None:
    with pytest.raises(ControlDecodeError):
        decode_response(data, Command.CHECK)


@given(st.binary(max_size=200), st.sampled_from(Command))
def test_decode_response_raises_only_its_error(data: bytes, command: Command) -> None:
    with contextlib.suppress(ControlDecodeError):
        decode_response(data, command)


def test_unencodable_or_oversized_results_become_errors() -> None:
    nan = decode_response(encode_response(Response(True, {"x": float("nan")}, "")), Command.STATS)
    assert nan.ok is False
    assert nan.error.startswith("internal error:")
    big = encode_response(Response(True, {"cache": "x", "entries": ["y" * 100]}, ""), limit=50)
    assert decode_response(big, Command.DUMP) == (False, None, "response exceeds 50 bytes")


# --- authorisation (pure) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("cred", "allowed_gid", "expected"),
    [
        (PeerCred(1, 0, 0, ()), None, True),
        (PeerCred(1, 998, 998, ()), None, True),  # the daemon's own user
        (PeerCred(1, 1000, 1000, (27,)), None, False),
        (PeerCred(1, 1000, 1000, (27,)), 27, True),  # supplementary group
        (PeerCred(1, 1000, 27, ()), 27, True),  # primary group
        (PeerCred(1, 1000, 1000, (26, 28)), 27, False),
    ],
)
def test_authorised(cred: PeerCred, allowed_gid: int | None, expected: bool) -> None:
    assert authorised(cred, own_uid=998, allowed_gid=allowed_gid) is expected


# --- server and client over a real socket ---------------------------------------------


@pytest.fixture
async def served(nursery: trio.Nursery, tmp_path: Path) -> tuple[FakeHandler, ControlClient, Path]:
    handler = FakeHandler()
    path = tmp_path / "control.sock"
    await nursery.start(functools.partial(serve_control, path, handler, mode=0o600))
    return handler, ControlClient(path, timeout=10), path


async def test_every_command_reaches_the_handler(
    served: tuple[FakeHandler, ControlClient, Path],
) -> None:
    handler, client, _ = served
    run = trio.to_thread.run_sync
    assert await run(client.status) == STATUS
    assert await run(client.stats) == STATS
    assert (await run(client.dump, CacheName.EXTERNAL))["entries"] == ENTRIES
    assert (await run(client.commit))["applied"] == 34
    assert (await run(client.flush, CacheName.INTERNAL))["detail"] == "flushed the internal cache"
    assert (await run(client.resync, ResyncSource.PEER))["count"] == 12
    assert (await run(client.bulk_send))["detail"] == "sent 12 entries"
    assert (await run(client.shorten_timers))["count"] == 5
    assert (await run(client.notify, 'INSTANCE "VI_1" FAULT 50'))["role"] == "FAULT"
    assert (await run(client.check))["ok"] is True
    assert (await run(client.verify))["checked"] == 46
    assert handler.calls == [
        ("status", None),
        ("stats", None),
        ("dump", CacheName.EXTERNAL),
        ("commit", None),
        ("flush", CacheName.INTERNAL),
        ("resync", ResyncSource.PEER),
        ("bulk_send", None),
        ("shorten_timers", None),
        ("notify", VrrpEvent(VrrpKind.INSTANCE, "VI_1", VrrpState.FAULT, 50)),
        ("check", None),
        ("verify", None),
    ]


async def test_handler_errors_reach_the_client(
    served: tuple[FakeHandler, ControlClient, Path],
) -> None:
    handler, client, _ = served
    handler.fail_with = "peer is down"
    with pytest.raises(ControlError, match=r"^peer is down$"):
        await trio.to_thread.run_sync(client.bulk_send)


async def test_socket_file_mode_and_removal(nursery: trio.Nursery, tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    async with trio.open_nursery() as inner:
        await inner.start(
            functools.partial(serve_control, path, FakeHandler(), group="nogroup", mode=0o660)
        )
        st_ = path.stat()
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o660
        assert st_.st_gid == 65534
        inner.cancel_scope.cancel()
    assert not path.exists()


async def test_a_stale_socket_is_replaced(served: tuple[FakeHandler, ControlClient, Path]) -> None:
    # `served` works; now simulate a crash leftover next to it and start over there.
    _, _, live = served
    stale = live.with_name("stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(stale))  # bound, never listening: what a dead daemon leaves
    async with trio.open_nursery() as inner:
        await inner.start(functools.partial(serve_control, stale, FakeHandler()))
        assert (await trio.to_thread.run_sync(ControlClient(stale).check))["ok"] is True
        inner.cancel_scope.cancel()


async def test_a_live_socket_is_not_stolen(served: tuple[FakeHandler, ControlClient, Path]) -> None:
    _, client, live = served
    with pytest.raises(ControlError, match="another daemon is listening"):
        await serve_control(live, FakeHandler())
    assert (await trio.to_thread.run_sync(client.check))["ok"] is True


async def test_a_non_socket_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        await serve_control(path, FakeHandler())


async def test_unknown_group_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="no group named 'no-such-grp'"):
        await serve_control(tmp_path / "s", FakeHandler(), group="no-such-grp")


async def raw_exchange(path: Path, data: bytes, *, half_close: bool = True) -> bytes:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        await sock.connect(str(path))
        await sock.send(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := await sock.recv(65536):
            answer += chunk
    return answer


async def test_garbage_gets_a_bad_request_answer(
    served: tuple[FakeHandler, ControlClient, Path],
) -> None:
    handler, _, path = served
    answer = json.loads(await raw_exchange(path, b"hello\n"))
    assert answer["ok"] is False
    assert answer["error"].startswith("bad request: not a JSON line")
    answer = json.loads(await raw_exchange(path, b"x" * (2 * MAX_REQUEST)))
    assert answer["error"] == f"bad request: request longer than {MAX_REQUEST} bytes"
    assert handler.calls == []


async def test_a_silent_client_is_dropped(
    served: tuple[FakeHandler, ControlClient, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, path = served
    monkeypatch.setattr(control, "REQUEST_TIMEOUT", 0.05)
    answer = json.loads(await raw_exchange(path, b'{"v":1,', half_close=False))
    assert answer["error"].startswith("bad request:")


async def test_a_client_that_leaves_early_does_not_hurt_the_server(
    served: tuple[FakeHandler, ControlClient, Path],
) -> None:
    handler, client, path = served
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.connect(str(path))
    await sock.send(encode_request(Request(Command.STATUS)))
    sock.close()
    await trio.to_thread.run_sync(client.check)
    assert ("check", None) in handler.calls


async def test_a_handler_bug_propagates(tmp_path: Path) -> None:
    class Buggy(FakeHandler):
        async def check(self) -> control.CheckReport:
            raise ZeroDivisionError

    path = tmp_path / "s"
    with pytest.RaisesGroup(pytest.RaisesGroup(ZeroDivisionError)):
        async with trio.open_nursery() as inner:
            await inner.start(functools.partial(serve_control, path, Buggy()))
            with pytest.raises(ControlError):
                await trio.to_thread.run_sync(ControlClient(path).check)


def test_client_reports_an_absent_daemon(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match=r"cannot reach the daemon at .*: No such file"):
        ControlClient(tmp_path / "nothing.sock").status()


async def test_client_timeout_and_truncated_answers(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    listener.listen(4)

    async def answer_with(data: bytes | None) -> None:
        conn, _ = await listener.accept()
        with conn:
            await conn.recv(MAX_REQUEST)
            if data is None:
                await trio.sleep_forever()
            await conn.send(data)

    with listener:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_with, None)
            with pytest.raises(ControlError, match=r"no answer from the daemon within 0\.2 s"):
                await trio.to_thread.run_sync(ControlClient(path, timeout=0.2).status)
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_with, b'{"ok": true')
            with pytest.raises(ControlError, match="without a complete answer"):
                await trio.to_thread.run_sync(ControlClient(path).status)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_with, b'{"ok": true, "result": 5}\n')
            with pytest.raises(ControlError, match="unexpected answer from the daemon"):
                await trio.to_thread.run_sync(ControlClient(path).status)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_with, b"x" * 5000)
            with pytest.raises(ControlError, match="answer larger than 4096 bytes"):
                await trio.to_thread.run_sync(ControlClient(path, limit=4096).status)


# --- peer credentials from the kernel -------------------------------------------------


def test_peer_credentials_of_this_process(tmp_path: Path) -> None:
    path = str(tmp_path / "cred.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                cred = peer_credentials(conn)
    assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert set(cred.groups) == set(os.getgroups())


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="replicator-ctl-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def exchange_as(path: Path, data: bytes, *, gid: int, groups: list[int]) -> bytes:
    """Send ``data`` from a forked child running as user nobody with the given groups.

    A fork rather than a new interpreter: the venv's Python lives under /root, which
    nobody cannot reach. The child only makes system calls and leaves with os._exit.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(str(path))
                sock.sendall(data)
                sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    os.write(write_fd, chunk)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer


async def check_as(path: Path, *, gid: int, extra_groups: list[int]) -> str:
    """``check`` as nobody: "True", or the daemon's error message."""
    data = await trio.to_thread.run_sync(
        functools.partial(
            exchange_as, path, encode_request(Request(Command.CHECK)), gid=gid, groups=extra_groups
        )
    )
    response = decode_response(data, Command.CHECK)
    return str(response.result["ok"]) if response.ok else response.error


@pytest.mark.parametrize(
    ("group", "gid", "extra_groups", "expected"),
    [
        ("", 65534, [], "permission denied for uid 65534"),
        ("nogroup", 65534, [], "True"),  # primary group
        ("nogroup", 4242, [65534], "True"),  # supplementary group, via SO_PEERGROUPS
        ("nogroup", 4242, [4243], "permission denied for uid 65534"),
        # More groups than the first SO_PEERGROUPS buffer holds: the ERANGE retry.
        ("nogroup", 4242, [*range(5000, 5200), 65534], "True"),
    ],
)
async def test_other_users_are_authorised_by_group(
    shared_dir: Path, group: str, gid: int, extra_groups: list[int], expected: str
) -> None:
    path = shared_dir / "control.sock"
    denied: list[PeerCred] = []
    async with trio.open_nursery() as nursery:
        # Mode 0666 so that only the credential check stands in the way.
        await nursery.start(
            functools.partial(
                serve_control,
                path,
                FakeHandler(),
                group=group,
                mode=0o666,
                on_denied=denied.append,
            )
        )
        assert await check_as(path, gid=gid, extra_groups=extra_groups) == expected
        nursery.cancel_scope.cancel()
    if expected == "True":
        assert denied == []
    else:
        assert [(c.uid, c.gid) for c in denied] == [(65534, gid)]


def test_a_group_the_daemon_is_not_in_is_refused_and_the_socket_removed(shared_dir: Path) -> None:
    """As a non-root daemon (a forked child running as nobody), control.group = root."""
    home = shared_dir / "run"
    home.mkdir()
    os.chown(home, 65534, 65534)
    path = home / "control.sock"
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                trio.run(functools.partial(serve_control, path, FakeHandler(), group="root"))
            except ControlError as exc:
                os.write(write_fd, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode()
    os.waitpid(pid, 0)
    assert message == (
        f"control.group: cannot give {path} to gid 0: "
        "the daemon's user must be a member of that group"
    )
    assert not path.exists()
