"""Namespace plumbing for the real-kernel tests and the demo lab.

Every namespace gets a unique name (prefix + run id) so concurrent runs never collide,
and :class:`Lab` removes everything it created even when the test fails. Nothing here
touches the root namespace's interfaces, routes or firewall: veths are created *inside*
a lab namespace and their peer end is moved to another lab namespace at once.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

_counter = itertools.count()


def run(cmd: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise with its stderr when it fails."""
    proc = subprocess.run(list(cmd), capture_output=True, text=True, input=input,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


@dataclass
class Netns:
    """One network namespace of a lab."""

    name: str

    def argv(self, cmd: Sequence[str]) -> list[str]:
        """The argv that runs ``cmd`` inside this namespace."""
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: Sequence[str], *, check: bool = True, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside the namespace and wait for it."""
        return run(self.argv(cmd), check=check, input=input, timeout=timeout)

    def sh(self, script: str, *, check: bool = True,
           timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a shell snippet inside the namespace."""
        return self.run(["sh", "-ec", script], check=check, timeout=timeout)

    def popen(self, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start ``cmd`` inside the namespace without waiting for it."""
        return subprocess.Popen(self.argv(cmd), **kwargs)  # type: ignore[call-overload,no-any-return]

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a sysctl inside the namespace (net.* sysctls are per namespace)."""
        self.run(["sysctl", "-qw", f"{key}={value}"])

    def nft(self, ruleset: str) -> None:
        """Load an nftables ruleset (``nft -f -``) inside the namespace."""
        self.run(["nft", "-f", "-"], input=ruleset)


@dataclass
class Lab:
    """A set of namespaces with guaranteed clean-up (use :func:`lab`)."""

    prefix: str
    namespaces: list[Netns] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def netns(self, role: str) -> Netns:
        """Create a namespace named ``<prefix>-<role>`` with loopback up."""
        ns = Netns(f"{self.prefix}-{role}")
        run(["ip", "netns", "add", ns.name])
        self.namespaces.append(ns)
        ns.run(["ip", "link", "set", "lo", "up"])
        return ns

    def veth(self, a: Netns, a_if: str, b: Netns, b_if: str) -> None:
        """Create a veth pair with one end in ``a`` and the other in ``b``, both up."""
        a.run(["ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if,
               "netns", b.name])
        a.run(["ip", "link", "set", a_if, "up"])
        b.run(["ip", "link", "set", b_if, "up"])

    def bridge(self, ns: Netns, name: str, ports: Sequence[str]) -> None:
        """Create a bridge inside ``ns`` enslaving ``ports`` (already in ``ns``)."""
        ns.run(["ip", "link", "add", name, "type", "bridge"])
        for port in ports:
            ns.run(["ip", "link", "set", port, "master", name])
        ns.run(["ip", "link", "set", name, "up"])

    def spawn(self, ns: Netns, cmd: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in ``ns`` that the lab kills on teardown."""
        proc = ns.popen(cmd, **kwargs)
        self.processes.append(proc)
        return proc

    def teardown(self) -> None:
        """Kill the lab's processes and delete its namespaces (errors ignored)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            # Close the pipes a caller asked for (unclosed ones warn, and warnings fail).
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with suppress(OSError):
                        stream.close()
        for ns in reversed(self.namespaces):
            # Kill anything still running inside (e.g. daemons started by keepalived).
            pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
            for pid in pids:
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            run(["ip", "netns", "del", ns.name], check=False)
        self.namespaces.clear()
        self.processes.clear()


def unique_prefix(tag: str) -> str:
    """A short unique namespace prefix: ``rp<tag><pid><random><n>``."""
    return f"rp{tag}{os.getpid() % 10000}{uuid.uuid4().hex[:4]}{next(_counter)}"


@contextmanager
def lab(tag: str = "") -> Iterator[Lab]:
    """A :class:`Lab` that is torn down whatever happens inside the block."""
    the_lab = Lab(unique_prefix(tag))
    try:
        yield the_lab
    finally:
        the_lab.teardown()
