"""The configuration file: TOML → frozen, validated dataclasses.

The schema *is* the dataclasses below: every leaf field carries a parser in its
metadata, every nested dataclass is a TOML table. :func:`parse_config` walks them, so an
unknown key, a wrong type, a missing required key or a contradiction is refused with a
message that names the dotted key and, when it can be found, the line::

    sync.peer_adress: unknown key (line 12)

:func:`parse_config` and :func:`load_config` check the *content*; :func:`check_files`
checks what the content points at (key file permissions, readable certificates, the
control group, the FIFO). :func:`diff_reloadable` tells the daemon which changes a
SIGHUP can apply live.
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from .errors import ConfigError
from .model import TcpState
from .wire import MAX_BUCKETS, MAX_ITEMS

DEFAULT_CONFIG_PATH = Path("/etc/replicator/replicator.toml")
DEFAULT_PORT = 3790

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class _Invalid(Exception):
    """A value did not fit its key; :func:`parse_config` adds the key and line."""


#: A leaf parser: takes the raw TOML value, returns the typed value or raises _Invalid.
Parser = Callable[[object], Any]


class _Leaf(NamedTuple):
    parse: Parser
    reload: bool


def _leaf(parse: Parser, *, reload: bool = False) -> dict[str, _Leaf]:
    """Field metadata of a leaf key. ``reload``: a SIGHUP applies a change live."""
    return {"leaf": _Leaf(parse, reload)}


def _table(cls: type[Any]) -> dict[str, type[Any]]:
    """Field metadata of a nested table."""
    return {"table": cls}


# --- leaf parsers -------------------------------------------------------------------


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array"}
    return names.get(type(value), "table" if isinstance(value, dict) else type(value).__name__)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, not {_type_name(value)}")
    return value


def _integer(lo: int, hi: int) -> Parser:
    def parse(value: object) -> int:
        # bool is an int subclass in Python, never in TOML: refuse `port = true`.
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"must be an integer, not {_type_name(value)}")
        if not lo <= value <= hi:
            raise _Invalid(f"must be between {lo} and {hi}, not {value}")
        return value

    return parse


def _seconds(lo: float, hi: float) -> Parser:
    def parse(value: object) -> float:
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise _Invalid(f"must be a number of seconds, not {_type_name(value)}")
        if not lo <= value <= hi:  # also refuses nan
            raise _Invalid(f"must be between {lo} and {hi} seconds, not {value}")
        return float(value)

    return parse


def _seconds_or_off(lo: float, hi: float) -> Parser:
    seconds = _seconds(lo, hi)

    def parse(value: object) -> float | None:
        if value == 0 and not isinstance(value, bool):
            return None
        parsed: float = seconds(value)
        return parsed

    return parse


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be a boolean, not {_type_name(value)}")
    return value


def _power_of_two(lo: int, hi: int) -> Parser:
    integer = _integer(lo, hi)

    def parse(value: object) -> int:
        number: int = integer(value)
        if number & (number - 1):
            raise _Invalid(f"must be a power of two, not {number}")
        return number

    return parse


def _choice(*choices: str) -> Parser:
    def parse(value: object) -> str:
        text = _string(value)
        if text not in choices:
            raise _Invalid(f"must be one of {', '.join(choices)}, not {text!r}")
        return text

    return parse


def _pattern(regex: str, what: str) -> Parser:
    compiled = re.compile(regex)

    def parse(value: object) -> str:
        text = _string(value)
        if not compiled.fullmatch(text):
            raise _Invalid(f"{text!r} is not {what}")
        return text

    return parse


def _ip_address(value: object) -> IPAddress:
    text = _string(value)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _Invalid(f"{text!r} is not an IPv4 or IPv6 address") from None


def _host_address(value: object) -> IPAddress:
    """An address, optionally with its prefix length as keepalived's
    ``virtual_ipaddress`` writes it (``192.0.2.1/24``): the prefix is not kept."""
    text = _string(value)
    try:
        return ipaddress.ip_interface(text).ip
    except ValueError:
        raise _Invalid(f"{text!r} is not an IPv4 or IPv6 address") from None


def _absolute_path(value: object) -> Path:
    text = _string(value)
    if not text.startswith("/"):
        raise _Invalid(f"{text!r} must be an absolute path")
    if "\0" in text:
        raise _Invalid("must not contain NUL")
    return Path(text)


def _socket_path(value: object) -> Path:
    path = _absolute_path(value)
    # sun_path holds 108 bytes including the terminating NUL.
    if len(os.fsencode(path)) > 107:
        raise _Invalid(f"{str(path)!r} is longer than the 107 bytes a unix socket path allows")
    return path


def _array(item: Parser) -> Parser:
    def parse(value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"must be an array, not {_type_name(value)}")
        out = []
        for index, element in enumerate(value):
            try:
                out.append(item(element))
            except _Invalid as exc:
                raise _Invalid(f"[{index}] {exc}") from None
        return tuple(out)

    return parse


def _prefix(value: object) -> IPNetwork:
    text = _string(value)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise _Invalid(f"{text!r} is not an address prefix ({exc})") from None


_PROTOCOLS = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "dccp": 33,
    "gre": 47,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
}


def _protocol(value: object) -> int:
    if isinstance(value, str):
        number = _PROTOCOLS.get(value.lower())
        if number is None:
            raise _Invalid(f"unknown protocol {value!r} (use {', '.join(_PROTOCOLS)} or 0..255)")
        return number
    parsed: int = _integer(0, 255)(value)
    return parsed


def _tcp_state(value: object) -> str:
    text = _string(value).upper()
    if text not in TcpState.__members__:
        raise _Invalid(f"unknown TCP state {value!r} (use {', '.join(TcpState.__members__)})")
    return text


def _fingerprint(value: object) -> str:
    # keys imports cryptography (tens of ms): only when the file names a fingerprint or a
    # key is checked, so that `replicator check` (keepalived runs it every second, and
    # it reads this file for control.socket) stays cheap.
    from . import keys

    try:
        return keys.normalize_fingerprint(_string(value))
    except ConfigError as exc:
        raise _Invalid(str(exc)) from None


def _octal_mode(value: object) -> int:
    text = _string(value)
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise _Invalid(f'{text!r} is not an octal permission mode such as "0660"')
    return int(text, 8)


class Endpoint(NamedTuple):
    """A host and TCP port."""

    host: IPAddress
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if self.host.version == 6 else str(self.host)
        return f"{host}:{self.port}"


def _endpoint_or_off(value: object) -> Endpoint | None:
    text = _string(value)
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or len(port) > 5:
        raise _Invalid(f'{text!r} is not ADDRESS:PORT (or "" for off)')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise _Invalid(f"{text!r}: write an IPv6 address in brackets, [::1]:9478")
    return Endpoint(_ip_address(host), _integer(1, 65535)(int(port)))


# --- the schema ---------------------------------------------------------------------

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}"
_NODE_NAME = _pattern(_NAME, "a node name (letters, digits, '.', '_', '-')")
_PORT = _integer(1, 65535)


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    """[node]: this node."""

    name: str = field(metadata=_leaf(_NODE_NAME))


@dataclasses.dataclass(frozen=True)
class TimersConfig:
    """[sync.timers]: the sync protocol's timers (:class:`replicator.sync.SyncParams`)."""

    ack_timeout: float = field(default=4.0, metadata=_leaf(_seconds(0.01, 600.0)))
    #: See SyncParams.ack_delay (0: every message acknowledged at once).
    ack_delay: float = field(default=0.01, metadata=_leaf(_seconds(0.0, 1.0)))
    keepalive_interval: float = field(default=1.0, metadata=_leaf(_seconds(0.01, 600.0)))
    dead_interval: float = field(default=10.0, metadata=_leaf(_seconds(0.02, 3600.0)))
    #: None: never (written as 0 in the file).
    anti_entropy_interval: float | None = field(
        default=300.0, metadata=_leaf(_seconds_or_off(1.0, 86400.0))
    )


@dataclasses.dataclass(frozen=True)
class SyncConfig:
    """[sync]: the link to the peer and the sync protocol's sizes."""

    listen_address: IPAddress = field(metadata=_leaf(_ip_address))
    peer_address: IPAddress = field(metadata=_leaf(_ip_address))
    listen_port: int = field(default=DEFAULT_PORT, metadata=_leaf(_PORT))
    peer_port: int = field(default=DEFAULT_PORT, metadata=_leaf(_PORT))
    #: The node name the peer must announce; None accepts any name but ours.
    peer_name: str | None = field(default=None, metadata=_leaf(_NODE_NAME))
    mode: Literal["cache", "hot"] = field(default="cache", metadata=_leaf(_choice("cache", "hot")))
    buckets: int = field(default=4096, metadata=_leaf(_power_of_two(1, MAX_BUCKETS)))
    batch: int = field(default=512, metadata=_leaf(_integer(2, MAX_ITEMS)))
    window: int = field(default=16384, metadata=_leaf(_integer(1, 1 << 24)))
    max_pending: int = field(default=262144, metadata=_leaf(_integer(1, 1 << 26)))
    timers: TimersConfig = field(default_factory=TimersConfig, metadata=_table(TimersConfig))

    @property
    def listen(self) -> Endpoint:
        """Where this node accepts the peer's connection."""
        return Endpoint(self.listen_address, self.listen_port)

    @property
    def peer(self) -> Endpoint:
        """Where the peer accepts this node's connection."""
        return Endpoint(self.peer_address, self.peer_port)


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """[tls]: this node's identity and the pinned peer."""

    key: Path = field(metadata=_leaf(_absolute_path))
    cert: Path = field(metadata=_leaf(_absolute_path))
    peer_certs: tuple[Path, ...] = field(
        default=(), metadata=_leaf(_array(_absolute_path), reload=True)
    )
    peer_fingerprints: tuple[str, ...] = field(
        default=(), metadata=_leaf(_array(_fingerprint), reload=True)
    )


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """[kernel]: the conntrack table this node reads and writes."""

    rcvbuf_bytes: int = field(default=64 << 20, metadata=_leaf(_integer(1 << 16, 1 << 30)))
    netns: str | None = field(
        default=None, metadata=_leaf(_pattern(_NAME, "a network namespace name"))
    )
    conntrack_events: Literal["enable", "require", "leave"] = field(
        default="enable", metadata=_leaf(_choice("enable", "require", "leave"))
    )
    #: False (conntrackd's TCPWindowTracking default): TCP entries written from the
    #: peer's table get the BE_LIBERAL flag, since sequence edges cannot be transferred.
    tcp_window_tracking: bool = field(default=False, metadata=_leaf(_boolean))
    #: Seconds between re-dumps that carry refreshed timeouts to the peer (None: never,
    #: written as 0 in the file).
    refresh_interval: float | None = field(
        default=30.0, metadata=_leaf(_seconds_or_off(1.0, 86400.0))
    )


@dataclasses.dataclass(frozen=True)
class FiltersConfig:
    """[filters]: which entries are replicated."""

    ignore_protocols: tuple[int, ...] = field(
        default=(), metadata=_leaf(_array(_protocol), reload=True)
    )
    ignore_addresses: tuple[IPNetwork, ...] = field(
        default=(), metadata=_leaf(_array(_prefix), reload=True)
    )
    tcp_states: tuple[str, ...] = field(default=(), metadata=_leaf(_array(_tcp_state), reload=True))
    zones: tuple[int, ...] = field(
        default=(), metadata=_leaf(_array(_integer(0, 65535)), reload=True)
    )
    mark: int = field(default=0, metadata=_leaf(_integer(0, 0xFFFFFFFF), reload=True))
    mark_mask: int = field(default=0, metadata=_leaf(_integer(0, 0xFFFFFFFF), reload=True))


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """[control]: the unix socket the ``replicator`` CLI talks to."""

    socket: Path = field(default=Path("/run/replicator/control.sock"), metadata=_leaf(_socket_path))
    group: str = field(
        default="", metadata=_leaf(_pattern(r"|[A-Za-z_][A-Za-z0-9_.-]{0,31}", "a group name"))
    )
    mode: int = field(default=0o660, metadata=_leaf(_octal_mode))


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """[metrics]: the Prometheus endpoint."""

    address: Endpoint | None = field(default=None, metadata=_leaf(_endpoint_or_off))


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """[log]: logging."""

    level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=_leaf(_choice("debug", "info", "warning", "error"), reload=True)
    )


@dataclasses.dataclass(frozen=True)
class KeepalivedConfig:
    """[keepalived]: how keepalived's transitions reach the daemon."""

    notify_fifo: Path | None = field(default=None, metadata=_leaf(_absolute_path))
    vrrp_name: str = field(
        default="", metadata=_leaf(_pattern(rf"|{_NAME}", "a group or instance name"))
    )
    shorten_timeout: int = field(default=15, metadata=_leaf(_integer(1, 3600), reload=True))
    virtual_addresses: tuple[IPAddress, ...] = field(
        default=(), metadata=_leaf(_array(_host_address))
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration file."""

    node: NodeConfig = field(metadata=_table(NodeConfig))
    sync: SyncConfig = field(metadata=_table(SyncConfig))
    tls: TlsConfig = field(metadata=_table(TlsConfig))
    kernel: KernelConfig = field(default_factory=KernelConfig, metadata=_table(KernelConfig))
    filters: FiltersConfig = field(default_factory=FiltersConfig, metadata=_table(FiltersConfig))
    control: ControlConfig = field(default_factory=ControlConfig, metadata=_table(ControlConfig))
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata=_table(MetricsConfig))
    log: LogConfig = field(default_factory=LogConfig, metadata=_table(LogConfig))
    keepalived: KeepalivedConfig = field(
        default_factory=KeepalivedConfig, metadata=_table(KeepalivedConfig)
    )


class SchemaKey(NamedTuple):
    """One key the schema accepts (for the documentation and its test)."""

    path: str
    required: bool
    reloadable: bool
    #: The default value (already parsed); None also for required keys.
    default: object


def _walk(cls: type[Any], prefix: str) -> Iterator[tuple[str, dataclasses.Field[Any]]]:
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        table = f.metadata.get("table")
        if table is not None:
            yield from _walk(table, f"{path}.")
        else:
            yield path, f


def schema_keys() -> list[SchemaKey]:
    """Every leaf key, as dotted paths, in schema order."""
    return [
        SchemaKey(
            path,
            f.default is dataclasses.MISSING,
            f.metadata["leaf"].reload,
            None if f.default is dataclasses.MISSING else f.default,
        )
        for path, f in _walk(Config, "")
    ]


def parse_value(path: str, value: object) -> Any:
    """Parse one raw TOML value as the key ``path`` would; raises ConfigError."""
    for key, f in _walk(Config, ""):
        if key == path:
            try:
                return f.metadata["leaf"].parse(value)
            except _Invalid as exc:
                raise ConfigError(f"{path}: {exc}") from None
    raise ConfigError(f"{path}: unknown key")


# --- parsing ------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_ASSIGN = re.compile(r"^\s*([A-Za-z0-9_\-.\"' ]+?)\s*=")


def _key_lines(text: str) -> dict[str, int]:
    """Best-effort map from dotted key path to its line number.

    tomllib reports no positions, so this scans lines for ``[table]`` headers and
    ``key =`` assignments. It is only used to decorate messages: a key it cannot place
    (inside a multi-line string or an inline table) just gets no line number.
    """
    lines: dict[str, int] = {}
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header:
            table = _dotted(header.group(1))
            lines.setdefault(table, number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            key = _dotted(assign.group(1))
            lines.setdefault(f"{table}.{key}" if table else key, number)
    return lines


def _dotted(raw: str) -> str:
    return ".".join(part.strip().strip("\"'") for part in raw.split("."))


def _line_of(path: str, lines: Mapping[str, int]) -> str:
    # Fall back to the enclosing table (an inline table's keys have no line of their own).
    parts = path.split(".")
    while parts:
        number = lines.get(".".join(parts))
        if number is not None:
            return f" (line {number})"
        parts.pop()
    return ""


def _build(
    cls: type[Any], table: Mapping[str, object], prefix: str, lines: Mapping[str, int]
) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in table:
        if name not in fields:
            path = f"{prefix}{name}"
            raise ConfigError(f"{path}: unknown key{_line_of(path, lines)}")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        path = f"{prefix}{name}"
        sub = f.metadata.get("table")
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                what = "table" if sub is not None else "key"
                where = _line_of(prefix.rstrip("."), lines) if prefix else ""
                raise ConfigError(f"{path}: missing required {what}{where}")
            continue
        value = table[name]
        if sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{path}: must be a table, not {_type_name(value)}{_line_of(path, lines)}"
                )
            kwargs[name] = _build(sub, value, f"{path}.", lines)
            continue
        try:
            kwargs[name] = f.metadata["leaf"].parse(value)
        except _Invalid as exc:
            raise ConfigError(f"{path}: {exc}{_line_of(path, lines)}") from None
    return cls(**kwargs)


def parse_config(text: str) -> Config:
    """Parse and validate configuration text. Raises :class:`ConfigError` only."""
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:  # nesting is parsed by recursion
        raise ConfigError(f"not valid TOML: {exc}") from None
    lines = _key_lines(text)
    config: Config = _build(Config, raw, "", lines)
    problem = _contradiction(config)
    if problem is not None:
        key, message = problem
        raise ConfigError(f"{key}: {message}{_line_of(key, lines)}")
    return config


def _contradiction(config: Config) -> tuple[str, str] | None:
    """The first pair of settings that cannot both hold, as (key, message)."""
    sync = config.sync
    if sync.peer_address.is_unspecified or sync.peer_address.is_multicast:
        return "sync.peer_address", f"{sync.peer_address} is not a unicast peer address"
    if sync.listen_address.is_multicast:
        return "sync.listen_address", f"{sync.listen_address} is a multicast address"
    if sync.peer == sync.listen:
        return "sync.peer_address", (
            f"{sync.peer} is this node's own listen address and port: "
            "the node would sync with itself"
        )
    if sync.peer_address == sync.listen_address and not sync.peer_address.is_loopback:
        return "sync.peer_address", (
            f"{sync.peer_address} equals sync.listen_address: the peer must be another node"
        )
    # An IPv4 wildcard cannot accept IPv6; `::` accepts both (dual stack).
    listen_v4 = sync.listen_address.version == 4
    if sync.peer_address.version == 6 and listen_v4:
        return "sync.peer_address", (
            f"{sync.peer_address} is IPv6 but sync.listen_address {sync.listen_address} is IPv4"
        )
    specific_v6 = sync.listen_address.version == 6 and not sync.listen_address.is_unspecified
    if sync.peer_address.version == 4 and specific_v6:
        return "sync.peer_address", (
            f"{sync.peer_address} is IPv4 but sync.listen_address {sync.listen_address} is IPv6"
        )
    timers = sync.timers
    if timers.keepalive_interval >= timers.dead_interval:
        return "sync.timers.dead_interval", (
            f"{timers.dead_interval} s must be longer than sync.timers.keepalive_interval "
            f"{timers.keepalive_interval} s, or a quiet link would be declared dead"
        )
    if timers.ack_delay >= timers.ack_timeout:
        return "sync.timers.ack_delay", (
            f"{timers.ack_delay} s must be shorter than sync.timers.ack_timeout "
            f"{timers.ack_timeout} s, or every put-off acknowledgement would be late"
        )
    if sync.peer_name is not None and sync.peer_name == config.node.name:
        return "sync.peer_name", f"{sync.peer_name!r} is this node's own name (node.name)"
    if not config.tls.peer_certs:
        # Stdlib ssl has no verify callback: the peer's certificate file is the only
        # trust anchor, so a fingerprint alone cannot authenticate anyone.
        return "tls.peer_certs", (
            "no way to authenticate the peer: list the peer's certificate file(s) "
            "(tls.peer_fingerprints only adds a second check)"
        )
    if config.tls.key == config.tls.cert:
        return "tls.cert", "must be a different file than tls.key"
    filters = config.filters
    if filters.mark & ~filters.mark_mask:
        return "filters.mark", (
            f"{filters.mark:#x} has bits outside filters.mark_mask {filters.mark_mask:#x}"
        )
    keepalived = config.keepalived
    if keepalived.notify_fifo is not None and not keepalived.vrrp_name:
        return "keepalived.vrrp_name", (
            "required when keepalived.notify_fifo is set (the FIFO carries the lines of "
            "every instance and group)"
        )
    if keepalived.notify_fifo is not None and keepalived.notify_fifo == config.control.socket:
        return "keepalived.notify_fifo", "must be a different path than control.socket"
    metrics = config.metrics.address
    if (
        metrics is not None
        and metrics.port == sync.listen_port
        and (metrics.host == sync.listen_address or sync.listen_address.is_unspecified)
    ):
        return "metrics.address", f"{metrics} collides with the sync listener"
    return None


def load_config(path: Path, *, check: bool = True) -> Config:
    """Read, parse and validate ``path``; with ``check``, also :func:`check_files`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    config = parse_config(text)
    if check:
        check_files(config)
    return config


def check_files(config: Config) -> None:
    """Check what the configuration points at; raise :class:`ConfigError` naming the key.

    The key file must be private (see :func:`replicator.keys.check_key_file_permissions`),
    the certificates readable, the control group known, and an existing notify FIFO path
    must be a FIFO.
    """
    from . import keys  # lazily: see _fingerprint

    try:
        keys.check_key_file_permissions(config.tls.key)
    except ConfigError as exc:
        raise ConfigError(f"tls.key: {exc}") from None
    _check_readable("tls.key", config.tls.key)
    _check_readable("tls.cert", config.tls.cert)
    for index, cert in enumerate(config.tls.peer_certs):
        _check_readable(f"tls.peer_certs[{index}]", cert)
    if config.control.group:
        try:
            grp.getgrnam(config.control.group)
        except KeyError:
            raise ConfigError(f"control.group: no group named {config.control.group!r}") from None
    fifo = config.keepalived.notify_fifo
    if fifo is not None:
        try:
            mode = fifo.stat().st_mode
        except FileNotFoundError:
            return  # created by the daemon (or keepalived) at start
        except OSError as exc:
            raise ConfigError(f"keepalived.notify_fifo: {fifo}: {exc.strerror}") from None
        if not stat.S_ISFIFO(mode):
            raise ConfigError(f"keepalived.notify_fifo: {fifo} exists and is not a FIFO")


def _check_readable(key: str, path: Path) -> None:
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None


# --- reload -------------------------------------------------------------------------


class ReloadDiff(NamedTuple):
    """What changed between two configurations, split by what a SIGHUP can do."""

    #: Changed keys the daemon applies live (take the values from the new config).
    live: tuple[str, ...]
    #: Changed keys that only take effect after a restart (keep running on the old ones).
    restart: tuple[str, ...]


def _value(config: Config, path: str) -> object:
    value: object = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def diff_reloadable(old: Config, new: Config) -> ReloadDiff:
    """Split the keys that differ between ``old`` and ``new`` into live and restart."""
    live: list[str] = []
    restart: list[str] = []
    for key in schema_keys():
        if _value(old, key.path) != _value(new, key.path):
            (live if key.reloadable else restart).append(key.path)
    return ReloadDiff(tuple(live), tuple(restart))
