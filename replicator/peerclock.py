"""How late this node reads its peer's messages, from the peer's clock readings.

Pure. Every ACK, CHANGES and BUCKETS message carries ``sent``: the sender's monotonic
clock (ms) when it built the message (:mod:`replicator.wire`). The two nodes' clocks
have an unknown offset, so one reading says nothing; but ``local clock - sent`` is that
offset plus the message's delay (network, the sender's socket buffer, and above all the
time the message waited while this node was busy), and its smallest value over recent
messages is the offset plus the smallest delay, a few hundred microseconds on the sync
link. A message's *lag* is how much later than that it was read.

Why it matters: an entry travels with its remaining timeout, and the receiver dates it
from when it reads the message. A standby busy for four seconds (its own table filling,
a CPU-starved host) read messages four seconds late and kept copies four seconds past
the original's end. Dating them from ``now - lag`` does not.

The minimum is taken over a sliding window of :data:`WINDOW` to :data:`2 * WINDOW`
seconds (two alternating halves), so a drift between the clocks (tens of ppm, i.e.
well under a millisecond per window) or a step (a node's virtual machine paused) is
forgotten within two windows. Keepalive ACKs keep samples coming while the link idles.
An error of this estimate is bounded the same way: a lag is never more than
:data:`MAX_LAG`, so even a peer whose clock misbehaves cannot make copies expire much
earlier than the protocol otherwise would.
"""

from __future__ import annotations

import math

#: Seconds each half of the minimum's window covers.
WINDOW = 10.0
#: The largest lag ever reported (seconds).
MAX_LAG = 2 * WINDOW


class PeerClock:
    """The lag of each message read from one connection's peer (a new connection
    starts a new estimate: the peer may have restarted with another clock)."""

    __slots__ = ("_current", "_previous", "_rotate_at")

    def __init__(self) -> None:
        self._current = math.inf
        self._previous = math.inf
        self._rotate_at: float | None = None

    def lag(self, sent_ms: int, now: float) -> float:
        """Seconds by which a message built at the peer's ``sent_ms`` is read later
        than the fastest recent one (0 for the fastest); ``now``: this node's clock."""
        offset = now - sent_ms / 1000.0
        rotate_at = self._rotate_at
        if rotate_at is None or now >= rotate_at + WINDOW:
            # First sample, or nothing for two windows: start afresh.
            self._current = self._previous = math.inf
            self._rotate_at = now + WINDOW
        elif now >= rotate_at:
            self._previous, self._current = self._current, math.inf
            self._rotate_at = rotate_at + WINDOW
        self._current = min(self._current, offset)
        best = min(self._current, self._previous)
        return min(offset - best, MAX_LAG)
