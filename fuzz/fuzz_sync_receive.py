"""atheris target: SyncSession.receive: a session fed any sequence of payloads never raises.

Run: ``python -m fuzz.fuzz_sync_receive -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("sync_receive", targets.sync_receive, max_len=16384)
