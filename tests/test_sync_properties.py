"""The proof: two sync peers over a hostile link always converge to exact copies.

A hypothesis state machine drives two nodes, each with a model kernel table that
survives restarts, through local changes, kernel expiry and refreshes, snapshots, and a
link that drops, duplicates, reorders and delays messages, breaks the connection (all
messages in flight are lost, as with TCP), and restarts either node (new epoch, empty
caches and queues). The rules use tiny windows, batches and pending bounds so that
coalescing, folding into buckets, go-back retransmission and bucket replacement in
parts are all exercised.

Whenever the link heals (a perfect link and enough time), each external cache must
equal the peer's kernel table exactly (every field but the timeout), each peer must
report InSync, and no copy may expire before half of the original's remaining life.
"""

from __future__ import annotations

import dataclasses
import math

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from synclink import Node, make_entry

from replicator.sync import ConnectionTerminated, ProtocolViolation, SyncParams

# Anti-entropy would repair what the stream itself got wrong (and hide it): the main
# machine runs without it, a second one with it.
PARAMS = SyncParams(
    buckets=8,
    batch=3,
    window=6,
    max_pending=5,
    ack_timeout=1.0,
    keepalive_interval=0.5,
    dead_interval=4.0,
    anti_entropy_interval=None,
)
KEYS = 14
TIMEOUTS = [None, 3, 40, 10**6]

nodes = st.sampled_from(["a", "b"])


class TwoPeers(RuleBasedStateMachine):
    params = PARAMS

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        p = self.params
        self.nodes = {"a": Node("a", p, epoch=1), "b": Node("b", p, epoch=1000)}
        #: Messages in flight per direction (src name -> list), in sending order.
        self.link: dict[str, list[bytes]] = {"a": [], "b": []}
        self._connect()

    # --- helpers ------------------------------------------------------------------

    def _other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def _connect(self) -> None:
        for node in self.nodes.values():
            node.session.connection_made(self.now)

    def _reset(self) -> None:
        """The connection breaks; everything in flight is lost; both reconnect."""
        self.link = {"a": [], "b": []}
        for node in self.nodes.values():
            node.session.connection_lost(self.now)
        self._drain()
        self._connect()

    def _drain(self) -> bool:
        """Collect events; True if a side asked for the connection to be closed."""
        terminated = False
        for node in self.nodes.values():
            for ev in node.drain():
                assert not isinstance(ev, ProtocolViolation), ev
                terminated |= isinstance(ev, ConnectionTerminated)
        return terminated

    def _settle(self) -> None:
        # As the daemon would: close a connection the session terminated, reconnect.
        if self._drain():
            self._reset()

    def _deliver(self, src: str, index: int) -> None:
        queue = self.link[src]
        if queue:
            payload = queue.pop(index % len(queue))
            self.nodes[self._other(src)].session.receive(payload, self.now)

    def _tick(self, dt: float) -> None:
        self.now += dt
        for node in self.nodes.values():
            node.kernel_expire(self.now)
            node.session.handle_timer(self.now)

    # --- local tables ---------------------------------------------------------------

    @rule(name=nodes, i=st.integers(0, KEYS - 1), variant=st.integers(0, 2),
          timeout=st.sampled_from(TIMEOUTS))  # fmt: skip
    def change(self, name: str, i: int, variant: int, timeout: int | None) -> None:
        self.nodes[name].put(make_entry(i, variant=variant, timeout=timeout), self.now)
        self._settle()

    @rule(name=nodes, i=st.integers(0, KEYS - 1))
    def refresh(self, name: str, i: int) -> None:
        """Traffic refreshed the entry's timeout (the kernel reports no event; the
        mirror learns it from a dump): same state, later deadline."""
        node = self.nodes[name]
        found = node.kernel.get(make_entry(i).key)
        if found is not None:
            node.put(found[0], self.now)
            self._settle()

    @rule(name=nodes, i=st.integers(0, KEYS - 1))
    def delete(self, name: str, i: int) -> None:
        self.nodes[name].remove(make_entry(i).key, self.now)
        self._settle()

    @rule(name=nodes)
    def snapshot(self, name: str) -> None:
        node = self.nodes[name]
        node.session.local_snapshot(node.kernel_entries(self.now), self.now)
        self._settle()

    # --- the link -------------------------------------------------------------------

    @rule(name=nodes)
    def send(self, name: str) -> None:
        self.link[name].extend(self.nodes[name].session.frames_to_send(self.now))
        self._settle()

    @rule(name=nodes, index=st.integers(0, 50))
    def deliver(self, name: str, index: int) -> None:
        self._deliver(name, index)
        self._settle()

    @rule(name=nodes, index=st.integers(0, 50))
    def drop(self, name: str, index: int) -> None:
        queue = self.link[name]
        if queue:
            queue.pop(index % len(queue))

    @rule(name=nodes, index=st.integers(0, 50), at=st.integers(0, 50))
    def duplicate(self, name: str, index: int, at: int) -> None:
        queue = self.link[name]
        if queue:
            queue.insert(at % (len(queue) + 1), queue[index % len(queue)])

    @rule(dt=st.sampled_from([0.1, 0.6, 1.5, 5.0, 20.0]))
    def tick(self, dt: float) -> None:
        self._tick(dt)
        self._settle()

    @rule()
    def reset(self) -> None:
        self._reset()

    @rule(name=nodes)
    def restart(self, name: str) -> None:
        self.nodes[name].restart(self.now)
        self._reset()

    @rule(name=nodes)
    def request_resync(self, name: str) -> None:
        self.nodes[name].session.request_resync(self.now)
        self._settle()

    @rule(name=nodes)
    def bulk_send(self, name: str) -> None:
        self.nodes[name].session.bulk_send(self.now)
        self._settle()

    # --- the property ---------------------------------------------------------------

    @invariant()
    def queues_stay_bounded(self) -> None:
        for node in self.nodes.values():
            s = node.session
            assert s.pending_count <= self.params.max_pending
            assert s.dirty_buckets <= self.params.buckets
            assert s.inflight <= self.params.window + self.params.batch

    @rule()
    def heal(self) -> None:
        a, b = self.nodes["a"], self.nodes["b"]
        for _ in range(3000):
            for src in ("a", "b"):
                while self.link[src]:
                    self._deliver(src, 0)
            if self._drain():
                self._reset()
                continue
            # Idle senders have had everything acknowledged: nothing is in flight but
            # keepalives.
            if all(n.session.send_idle and n.session.in_sync for n in (a, b)):
                break
            for src in ("a", "b"):
                self.link[src].extend(self.nodes[src].session.frames_to_send(self.now))
            if not self.link["a"] and not self.link["b"]:
                self._tick(0.25)
        else:
            raise AssertionError("the peers did not converge on a perfect link")
        for here, there in ((a, b), (b, a)):
            assert here.external() == there.table()
            for key, (_, deadline) in there.kernel.items():
                copy = here.session.external.deadline(key)
                assert copy is not None
                if deadline == math.inf:
                    assert copy == math.inf
                else:
                    assert copy - self.now >= (deadline - self.now) / 2


class TwoPeersWithAntiEntropy(TwoPeers):
    params = dataclasses.replace(PARAMS, anti_entropy_interval=3.0)


SETTINGS = settings(
    max_examples=400,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TwoPeers.TestCase.settings = SETTINGS
TwoPeersWithAntiEntropy.TestCase.settings = settings(SETTINGS, max_examples=100)
test_two_peers_converge = TwoPeers.TestCase
test_two_peers_converge_with_anti_entropy = TwoPeersWithAntiEntropy.TestCase
