"""atheris target: ctnetlink datagrams: decode_events, decode_dump, parse_acks, netlink walkers.

Run: ``python -m fuzz.fuzz_ctnetlink -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("ctnetlink", targets.ctnetlink_datagram, max_len=16384)
