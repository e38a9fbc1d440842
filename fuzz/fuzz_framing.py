"""atheris target: connection preamble and length-prefixed frames (replicator.framing), before TLS.

Run: ``python -m fuzz.fuzz_framing -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("framing", targets.framing, max_len=4096)
