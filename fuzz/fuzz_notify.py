"""atheris target: keepalived vrrp_notify_fifo bytes: line buffer, line decoder, role machine.

Run: ``python -m fuzz.fuzz_notify -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("notify", targets.notify_fifo, max_len=4096)
