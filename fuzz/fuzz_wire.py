"""atheris target: sync message decoding (replicator.wire.decode) and what consumes its entries.

Run: ``python -m fuzz.fuzz_wire -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("wire", targets.wire_message, max_len=8192)
