"""The configuration schema: every error path, the example file, reload diffs."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replicator.config import (
    Config,
    Endpoint,
    check_files,
    diff_reloadable,
    load_config,
    parse_config,
    schema_keys,
)
from replicator.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "etc" / "replicator.toml"
FP = "sha256:" + "ab" * 32

MINIMAL = f"""\
[node]
name = "fw-a"

[sync]
listen_address = "192.0.2.1"
peer_address = "192.0.2.2"

[tls]
key = "/etc/replicator/tls/node.key"
cert = "/etc/replicator/tls/node.crt"
peer_certs = ["/etc/replicator/tls/peer.crt"]
peer_fingerprints = ["{FP}"]
"""


def with_lines(*extra: str, base: str = MINIMAL) -> str:
    return base + "\n" + "\n".join(extra) + "\n"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return str(info.value)


# --- the happy paths ------------------------------------------------------------------


def test_minimal_config_gets_the_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.node.name == "fw-a"
    assert config.sync.peer == Endpoint(ipaddress.ip_address("192.0.2.2"), 3790)
    assert config.sync.mode == "cache"
    assert config.sync.timers.keepalive_interval == 1.0
    assert config.sync.timers.anti_entropy_interval == 300.0
    assert config.sync.buckets == 4096
    assert config.sync.peer_name is None
    assert config.tls.peer_fingerprints == (FP,)
    assert config.tls.peer_certs == (Path("/etc/replicator/tls/peer.crt"),)
    assert config.kernel.netns is None
    assert config.kernel.conntrack_events == "enable"
    assert config.filters.ignore_addresses == ()
    assert config.control.socket == Path("/run/replicator/control.sock")
    assert config.control.mode == 0o660
    assert config.metrics.address is None
    assert config.log.level == "info"
    assert config.keepalived.notify_fifo is None
    assert config.keepalived.shorten_timeout == 15


def test_the_example_file_loads() -> None:
    config = load_config(EXAMPLE, check=False)
    assert config.node.name == "fw-a"
    assert config.keepalived.vrrp_name == "VG_FW"
    # Off unless the operator lists the addresses (a wrong list demotes a master).
    assert config.keepalived.virtual_addresses == ()
    assert config.metrics.address == Endpoint(ipaddress.ip_address("127.0.0.1"), 9478)
    assert ipaddress.ip_network("127.0.0.0/8") in config.filters.ignore_addresses


def test_the_example_sets_every_key_but_the_test_only_netns() -> None:
    text = EXAMPLE.read_text()
    missing = [k.path for k in schema_keys() if f"\n{k.path.rsplit('.', 1)[1]} =" not in text]
    assert missing == ["kernel.netns"]


def test_values_are_normalised() -> None:
    config = parse_config(
        with_lines(
            "[filters]",
            'ignore_protocols = ["TCP", "udp", 47]',
            'tcp_states = ["established", "TIME_WAIT"]',
            'ignore_addresses = ["10.0.0.0/8", "2001:db8::/32"]',
            "zones = [0, 65535]",
            "mark = 0x10",
            "mark_mask = 0xf0",
            "[control]",
            'mode = "600"',
            "[metrics]",
            'address = "[::1]:9478"',
            "[sync.timers]",
            "ack_timeout = 1",
            "anti_entropy_interval = 0",
            "[keepalived]",
            'virtual_addresses = ["198.51.100.1/24", "2001:db8::1/64", "10.0.0.1"]',
        ).replace(FP, "SHA256:" + "AB:" * 31 + "AB")
    )
    # keepalived's virtual_ipaddress form: the prefix length is dropped.
    assert config.keepalived.virtual_addresses == tuple(
        ipaddress.ip_address(a) for a in ("198.51.100.1", "2001:db8::1", "10.0.0.1"))
    assert config.filters.ignore_protocols == (6, 17, 47)
    assert config.filters.tcp_states == ("ESTABLISHED", "TIME_WAIT")
    assert config.filters.ignore_addresses[1] == ipaddress.ip_network("2001:db8::/32")
    assert config.control.mode == 0o600
    assert config.metrics.address is not None
    assert str(config.metrics.address) == "[::1]:9478"
    assert config.sync.timers.ack_timeout == 1.0
    assert isinstance(config.sync.timers.ack_timeout, float)
    assert config.sync.timers.anti_entropy_interval is None
    assert config.tls.peer_fingerprints == (FP,)


def test_config_is_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.node.name = "x"  # type: ignore[misc]


# --- unknown keys ---------------------------------------------------------------------


def test_unknown_key_is_named_with_its_line() -> None:
    text = MINIMAL.replace('peer_address = "192.0.2.2"', 'peer_adress = "192.0.2.2"')
    line = text.splitlines().index('peer_adress = "192.0.2.2"') + 1
    assert error_of(text) == f"sync.peer_adress: unknown key (line {line})"


def test_unknown_table() -> None:
    text = with_lines("[syncc]", "x = 1")
    line = text.splitlines().index("[syncc]") + 1
    assert error_of(text) == f"syncc: unknown key (line {line})"


def test_unknown_key_in_a_nested_table() -> None:
    text = with_lines("[sync.timers]", "ack_timout = 0.1")
    line = text.splitlines().index("ack_timout = 0.1") + 1
    assert error_of(text) == f"sync.timers.ack_timout: unknown key (line {line})"


def test_unknown_key_in_an_inline_table_points_at_the_table() -> None:
    text = MINIMAL.replace("[tls]", "[kernel]\nx = { y = 1 }\n[tls]")
    line = text.splitlines().index("x = { y = 1 }") + 1
    assert error_of(text) == f"kernel.x: unknown key (line {line})"


def test_unknown_key_in_a_dotted_assignment() -> None:
    text = MINIMAL.replace("[tls]", "timers.windoww = 3\n[tls]")
    line = text.splitlines().index("timers.windoww = 3") + 1
    assert error_of(text) == f"sync.timers.windoww: unknown key (line {line})"


# --- wrong types and values -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["[sync.timers]", 'ack_timeout = "4"'], "sync.timers.ack_timeout: must be a number of"),
        (["[sync.timers]", "keepalive_interval = -1"], "sync.timers.keepalive_interval: must be"),
        (["[sync.timers]", "keepalive_interval = nan"], "sync.timers.keepalive_interval: must be"),
        (["[sync.timers]", "dead_interval = false"], "must be a number of seconds, not boolean"),
        (["[sync.timers]", "anti_entropy_interval = 0.5"], "must be between 1.0 and 86400.0"),
        (["[sync.timers]", "ack_delay = 2"], "sync.timers.ack_delay: must be between 0.0 and 1.0"),
        (["[sync.timers]", "anti_entropy_interval = false"], "not boolean"),
        (["[kernel]", "rcvbuf_bytes = 1024"], "kernel.rcvbuf_bytes: must be between 65536"),
        (["[kernel]", 'netns = "bad name"'], "kernel.netns: 'bad name' is not a network namespace"),
        (["[kernel]", 'conntrack_events = "on"'], "kernel.conntrack_events: must be one of"),
        (["[filters]", 'ignore_protocols = "tcp"'], "filters.ignore_protocols: must be an array"),
        (["[filters]", 'ignore_protocols = ["quic"]'], "filters.ignore_protocols: [0] unknown"),
        (
            ["[filters]", "ignore_protocols = [6, 256]"],
            "filters.ignore_protocols: [1] must be betw",
        ),
        (["[filters]", 'ignore_addresses = ["10.0.0.1/8"]'], "has host bits set"),
        (["[filters]", 'ignore_addresses = ["10.0.0.0/33"]'], "[0] '10.0.0.0/33' is not an addr"),
        (["[filters]", "ignore_addresses = [10]"], "filters.ignore_addresses: [0] must be a str"),
        (["[filters]", 'tcp_states = ["OPEN"]'], "filters.tcp_states: [0] unknown TCP state"),
        (["[filters]", "zones = [65536]"], "filters.zones: [0] must be between 0 and 65535"),
        (["[filters]", "mark = -1"], "filters.mark: must be between 0 and 4294967295"),
        (["[filters]", "mark_mask = 0x100000000"], "filters.mark_mask: must be between"),
        (["[control]", 'socket = "run/ctl.sock"'], "control.socket: 'run/ctl.sock' must be an abs"),
        (["[control]", f'socket = "/{"x" * 120}"'], "control.socket: '/xxx"),
        (["[control]", 'mode = "0999"'], "control.mode: '0999' is not an octal permission mode"),
        (["[control]", "mode = 0o660"], "control.mode: must be a string, not integer"),
        (["[control]", 'group = "no spaces allowed"'], "control.group: 'no spaces allowed' is not"),
        (
            ["[metrics]", 'address = "127.0.0.1"'],
            "metrics.address: '127.0.0.1' is not ADDRESS:PORT",
        ),
        (["[metrics]", 'address = "::1:9478"'], "write an IPv6 address in brackets"),
        (["[metrics]", 'address = "host:9478"'], "metrics.address: 'host' is not an IPv4 or IPv6"),
        (["[metrics]", 'address = "127.0.0.1:0"'], "metrics.address: must be between 1 and 65535"),
        (["[log]", 'level = "trace"'], "log.level: must be one of debug, info, warning, error"),
        (["[keepalived]", 'notify_fifo = "fifo"'], "keepalived.notify_fifo: 'fifo' must be an abs"),
        (["[keepalived]", "shorten_timeout = 0"], "keepalived.shorten_timeout: must be between 1"),
        (["[keepalived]", 'vrrp_name = "a b"'], "keepalived.vrrp_name: 'a b' is not a group or"),
        (["[keepalived]", 'virtual_addresses = ["10.0.0.1", "vip"]'],
         "keepalived.virtual_addresses: [1] 'vip' is not an IPv4 or IPv6 address"),
        (["[keepalived]", 'virtual_addresses = "10.0.0.1"'],
         "keepalived.virtual_addresses: must be an array, not string"),
    ],
)
def test_bad_values_are_refused_naming_the_key(extra: list[str], message: str) -> None:
    text = with_lines(*extra)
    error = error_of(text)
    assert message in error
    bad_line = text.splitlines().index(extra[-1]) + 1
    assert error.endswith(f"(line {bad_line})")


SYNC_LINE = 'peer_address = "192.0.2.2"'


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ('window = "10"', "sync.window: must be an integer, not string"),
        ("window = 1.5", "sync.window: must be an integer, not float"),
        ("window = true", "sync.window: must be an integer, not boolean"),
        ("window = 0", "sync.window: must be between 1 and 16777216, not 0"),
        ("buckets = 1000", "sync.buckets: must be a power of two, not 1000"),
        ("buckets = 131072", "sync.buckets: must be between 1 and 65536"),
        ("batch = 1", "sync.batch: must be between 2 and 2048, not 1"),
        ("max_pending = 0", "sync.max_pending: must be between 1"),
        ('peer_name = "fw b"', "sync.peer_name: 'fw b' is not a node name"),
    ],
)
def test_bad_sync_sizes(setting: str, message: str) -> None:
    text = MINIMAL.replace(SYNC_LINE, f"{SYNC_LINE}\n{setting}")
    line = text.splitlines().index(setting) + 1
    error = error_of(text)
    assert error.startswith(message)
    assert error.endswith(f"(line {line})")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('name = "fw-a"', 'name = "-fw"', "node.name: '-fw' is not a node name"),
        ('name = "fw-a"', "name = 7", "node.name: must be a string, not integer"),
        ('"192.0.2.1"', '"192.0.2.300"', "sync.listen_address: '192.0.2.300' is not an IPv4"),
        ('"192.0.2.1"', '"fw-b.example"', "sync.listen_address: 'fw-b.example' is not an IPv4"),
        (
            'peer_address = "192.0.2.2"',
            'peer_address = "192.0.2.2"\npeer_port = 70000',
            "sync.peer_port: must be between 1 and 65535, not 70000",
        ),
        (
            'peer_address = "192.0.2.2"',
            'peer_address = "192.0.2.2"\nmode = "warm"',
            "sync.mode: must be one of cache, hot, not 'warm'",
        ),
        (
            'key = "/etc/replicator/tls/node.key"',
            'key = ["/k"]',
            "tls.key: must be a string, not a",
        ),
        (
            f'peer_fingerprints = ["{FP}"]',
            'peer_fingerprints = ["ab" ]',
            "tls.peer_fingerprints: [0] fingerprint 'ab' must start with 'sha256:'",
        ),
        (
            f'peer_fingerprints = ["{FP}"]',
            'peer_fingerprints = ["sha256:abc"]',
            "must have 64 hexadecimal digits",
        ),
        (
            'peer_certs = ["/etc/replicator/tls/peer.crt"]',
            'peer_certs = ["relative.crt"]',
            "tls.peer_certs: [0] 'relative.crt' must be an absolute path",
        ),
    ],
)
def test_bad_values_in_required_tables(old: str, new: str, message: str) -> None:
    assert old in MINIMAL
    assert message in error_of(MINIMAL.replace(old, new, 1))


def test_a_table_where_a_value_belongs_and_the_reverse() -> None:
    assert error_of(with_lines("[log.level]", "x = 1")).startswith(
        "log.level: must be a string, not table"
    )
    text = MINIMAL.replace('[node]\nname = "fw-a"\n', 'node = "fw-a"\n')
    assert error_of(text).startswith("node: must be a table, not string (line 1)")


def test_invalid_toml() -> None:
    assert error_of("[node\nname = 1").startswith("not valid TOML: ")


# --- missing keys ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ('name = "fw-a"\n', "node.name: missing required key (line 1)"),
        ('peer_address = "192.0.2.2"\n', "sync.peer_address: missing required key (line 4)"),
        ('key = "/etc/replicator/tls/node.key"\n', "tls.key: missing required key (line 8)"),
        ('[node]\nname = "fw-a"\n', "node: missing required table"),
    ],
)
def test_missing_required(drop: str, message: str) -> None:
    assert drop in MINIMAL
    assert error_of(MINIMAL.replace(drop, "")) == message


# --- contradictions -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('"192.0.2.2"', '"0.0.0.0"', "sync.peer_address: 0.0.0.0 is not a unicast peer address"),
        ('"192.0.2.2"', '"224.0.0.18"', "sync.peer_address: 224.0.0.18 is not a unicast"),
        ('"192.0.2.1"', '"239.1.1.1"', "sync.listen_address: 239.1.1.1 is a multicast address"),
        ('"192.0.2.2"', '"192.0.2.1"', "sync.peer_address: 192.0.2.1:3790 is this node's own"),
        (
            '"192.0.2.2"',
            '"192.0.2.1"\npeer_port = 4000',
            "sync.peer_address: 192.0.2.1 equals sync.listen_address: the peer must be another",
        ),
        ('"192.0.2.2"', '"2001:db8::2"', "sync.peer_address: 2001:db8::2 is IPv6 but sync.listen"),
        ('"192.0.2.1"', '"2001:db8::1"', "sync.peer_address: 192.0.2.2 is IPv4 but sync.listen_"),
        (
            'peer_certs = ["/etc/replicator/tls/peer.crt"]',
            "peer_certs = []",
            "tls.peer_certs: no way to authenticate the peer",
        ),
        (
            'cert = "/etc/replicator/tls/node.crt"',
            'cert = "/etc/replicator/tls/node.key"',
            "tls.cert: must be a different file than tls.key",
        ),
    ],
)
def test_contradictions_in_required_tables(old: str, new: str, message: str) -> None:
    assert old in MINIMAL
    assert message in error_of(MINIMAL.replace(old, new, 1))


def test_contradiction_messages_carry_the_line() -> None:
    text = MINIMAL.replace('peer_address = "192.0.2.2"', 'peer_address = "192.0.2.1"')
    assert error_of(text).endswith("(line 6)")


def test_loopback_pairs_may_share_the_address_on_different_ports() -> None:
    text = MINIMAL.replace('"192.0.2.1"', '"127.0.0.1"').replace('"192.0.2.2"', '"127.0.0.1"')
    assert "the node would sync with itself" in error_of(text)
    config = parse_config(text.replace("[tls]", "peer_port = 3791\n[tls]"))
    assert config.sync.peer != config.sync.listen


def test_dual_stack_wildcard_accepts_either_family() -> None:
    text = MINIMAL.replace('"192.0.2.1"', '"::"')
    assert parse_config(text).sync.listen_address == ipaddress.ip_address("::")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["[filters]", "mark = 0x11", "mark_mask = 0xf0"],
            "filters.mark: 0x11 has bits outside filters.mark_mask 0xf0",
        ),
        (
            ["[keepalived]", 'notify_fifo = "/run/replicator/notify.fifo"'],
            "keepalived.vrrp_name: required when keepalived.notify_fifo is set",
        ),
        (
            ["[keepalived]", 'notify_fifo = "/run/replicator/control.sock"', 'vrrp_name = "VG"'],
            "keepalived.notify_fifo: must be a different path than control.socket",
        ),
        (
            ["[metrics]", 'address = "192.0.2.1:3790"'],
            "metrics.address: 192.0.2.1:3790 collides with the sync listener",
        ),
        (
            ["[sync.timers]", "ack_timeout = 0.5", "ack_delay = 0.5"],
            "sync.timers.ack_delay: 0.5 s must be shorter than sync.timers.ack_timeout",
        ),
    ],
)
def test_contradictions_in_optional_tables(extra: list[str], message: str) -> None:
    assert message in error_of(with_lines(*extra))


def test_metrics_port_may_equal_sync_port_on_another_address() -> None:
    config = parse_config(with_lines("[metrics]", 'address = "127.0.0.1:3790"'))
    assert config.metrics.address is not None


def test_metrics_collide_with_a_wildcard_listener() -> None:
    text = with_lines("[metrics]", 'address = "127.0.0.1:3790"').replace(
        'listen_address = "192.0.2.1"', 'listen_address = "0.0.0.0"'
    )
    assert "collides with the sync listener" in error_of(text)


# --- files ----------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {name: tmp_path / name for name in ("node.key", "node.crt", "peer.crt")}
    for path in paths.values():
        path.write_text("-----BEGIN TEST-----\n")
    paths["node.key"].chmod(0o600)
    paths["dir"] = tmp_path
    return paths


def file_config(files: dict[str, Path], *extra: str) -> Config:
    text = (
        MINIMAL.replace("/etc/replicator/tls/node.key", str(files["node.key"]))
        .replace("/etc/replicator/tls/node.crt", str(files["node.crt"]))
        .replace("/etc/replicator/tls/peer.crt", str(files["peer.crt"]))
        .replace(f'peer_fingerprints = ["{FP}"]', "peer_fingerprints = []")
    )
    return parse_config(with_lines(*extra, base=text))


def test_check_files_accepts_a_private_key(files: dict[str, Path]) -> None:
    check_files(file_config(files))


def test_key_readable_by_others_is_refused(files: dict[str, Path]) -> None:
    files["node.key"].chmod(0o640)
    with pytest.raises(ConfigError, match=r"^tls\.key: key file .* is accessible by group"):
        check_files(file_config(files))


def test_missing_key_is_refused(files: dict[str, Path]) -> None:
    files["node.key"].unlink()
    with pytest.raises(ConfigError, match=r"^tls\.key: .*No such file"):
        check_files(file_config(files))


def test_key_that_is_a_directory_is_refused(files: dict[str, Path]) -> None:
    files["node.key"].unlink()
    files["node.key"].mkdir(mode=0o700)
    with pytest.raises(ConfigError, match=r"^tls\.key: key file .* is not a regular file"):
        check_files(file_config(files))


def test_unreadable_key_is_refused(files: dict[str, Path]) -> None:
    # Root reads any file, so "unreadable" is a key this user cannot open at all: a
    # FIFO with nobody writing would block, a dangling symlink fails the stat.
    files["node.key"].unlink()
    files["node.key"].symlink_to(files["dir"] / "gone")
    with pytest.raises(ConfigError, match=r"^tls\.key: "):
        check_files(file_config(files))


def test_missing_certificates_are_refused(files: dict[str, Path]) -> None:
    files["node.crt"].unlink()
    with pytest.raises(ConfigError, match=r"^tls\.cert: cannot read .*No such file"):
        check_files(file_config(files))


def test_missing_peer_certificate_is_refused(files: dict[str, Path]) -> None:
    files["peer.crt"].unlink()
    with pytest.raises(ConfigError, match=r"^tls\.peer_certs\[0\]: cannot read"):
        check_files(file_config(files))


def test_unknown_control_group_is_refused(files: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"^control\.group: no group named 'no-such-grp'"):
        check_files(file_config(files, "[control]", 'group = "no-such-grp"'))
    check_files(file_config(files, "[control]", 'group = "root"'))


def test_notify_fifo_path_must_be_a_fifo_if_it_exists(files: dict[str, Path]) -> None:
    fifo = files["dir"] / "notify.fifo"
    extra = ("[keepalived]", f'notify_fifo = "{fifo}"', 'vrrp_name = "VG"')
    check_files(file_config(files, *extra))  # absent: the daemon creates it
    os.mkfifo(fifo)
    check_files(file_config(files, *extra))
    fifo.unlink()
    fifo.write_text("")
    with pytest.raises(ConfigError, match=r"^keepalived\.notify_fifo: .* is not a FIFO"):
        check_files(file_config(files, *extra))


def test_load_config_checks_files_unless_told_not_to(files: dict[str, Path]) -> None:
    files["node.key"].chmod(0o644)
    path = files["dir"] / "replicator.toml"
    text = MINIMAL.replace("/etc/replicator/tls/node.key", str(files["node.key"]))
    path.write_text(text)
    assert load_config(path, check=False).tls.key == files["node.key"]
    with pytest.raises(ConfigError, match=r"^tls\.key: "):
        load_config(path)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read: No such file"):
        load_config(tmp_path / "missing.toml")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


# --- schema and reload ----------------------------------------------------------------


def test_schema_keys_cover_every_dataclass_leaf() -> None:
    keys = {key.path: key for key in schema_keys()}
    assert keys["sync.window"].required is False
    assert keys["node.name"].required is True
    assert keys["log.level"].reloadable is True
    assert keys["sync.peer_address"].reloadable is False
    assert len(keys) == len(schema_keys())


def test_diff_reloadable_splits_live_and_restart() -> None:
    old = parse_config(MINIMAL)
    new = parse_config(
        with_lines(
            "[log]",
            'level = "debug"',
            "[filters]",
            "zones = [1]",
            "[kernel]",
            "rcvbuf_bytes = 1048576",
            "[sync.timers]",
            "keepalive_interval = 2",
        )
    )
    assert diff_reloadable(old, new) == (
        ("filters.zones", "log.level"),
        ("sync.timers.keepalive_interval", "kernel.rcvbuf_bytes"),
    )
    assert diff_reloadable(old, old) == ((), ())


def test_every_key_is_either_live_or_restart() -> None:
    old = parse_config(MINIMAL)
    live, restart = diff_reloadable(old, load_config(EXAMPLE, check=False))
    assert not set(live) & set(restart)
    assert "sync.listen_port" not in live + restart  # same value in both


# --- fuzz -----------------------------------------------------------------------------


@given(st.text(max_size=300))
def test_parse_config_raises_only_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_config(text)


@given(st.data())
def test_mutated_example_raises_only_config_error(data: st.DataObject) -> None:
    lines = EXAMPLE.read_text().splitlines()
    index = data.draw(st.integers(0, len(lines) - 1))
    replacement = data.draw(
        st.sampled_from(["", "x = 1", "[x]", "name = 1", '= "', "[[sync]]", "window = -1e999"])
    )
    lines[index] = replacement
    with contextlib.suppress(ConfigError):
        parse_config("\n".join(lines))
