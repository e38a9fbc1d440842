"""atheris target: configuration files (replicator.config.parse_config on UTF-8 text).

Run: ``python -m fuzz.fuzz_config -runs=20000`` (see :mod:`fuzz.runner`).
"""

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

with atheris.instrument_imports(include=["replicator", "fuzz.targets"]):
    from fuzz import targets

from fuzz.runner import run

if __name__ == "__main__":
    run("config", targets.config_file, max_len=8192)
