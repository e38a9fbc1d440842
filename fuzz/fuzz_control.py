"""atheris target: control socket request lines (and response lines).

Run: ``python -m fuzz.fuzz_control -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("control", targets.control_request, max_len=5000)
