"""Run one target under atheris (libFuzzer) with its seed corpus.

Used by the ``fuzz_*.py`` scripts: ``python -m fuzz.fuzz_wire -runs=20000``. Any
libFuzzer flag can be given; without a corpus directory the target's seeds are written
to ``build/fuzz/corpus/NAME/`` (libFuzzer adds what it finds there), and crashing
inputs are written to ``build/fuzz/crashes/NAME-crash-*``. Reproduce one with
``python -m fuzz.fuzz_NAME build/fuzz/crashes/NAME-crash-...``.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable

import atheris  # type: ignore[import-not-found,import-untyped,unused-ignore]

from .seeds import ROOT, SEEDS

BUILD = ROOT / "build" / "fuzz"


def _has(argv: list[str], flag: str) -> bool:
    return any(arg.startswith(f"-{flag}=") for arg in argv)


def run(name: str, target: Callable[[bytes], None], *, max_len: int) -> None:
    """Fuzz ``target`` (an instrumented function of :mod:`fuzz.targets`) with its seeds."""
    argv = list(sys.argv)
    flags = [f"-{flag}={value}" for flag, value in
             (("max_len", max_len), ("timeout", 10), ("rss_limit_mb", 1024),
              ("artifact_prefix", f"{BUILD / 'crashes' / name}-"),
              ("print_final_stats", 1)) if not _has(argv, flag)]  # fmt: skip
    (BUILD / "crashes").mkdir(parents=True, exist_ok=True)
    if not any(not arg.startswith("-") for arg in argv[1:]):
        corpus = BUILD / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for seed in SEEDS[name]():
            (corpus / hashlib.sha1(seed, usedforsecurity=False).hexdigest()).write_bytes(seed)
        argv.append(str(corpus))
    atheris.Setup([argv[0], *flags, *argv[1:]], target)
    atheris.Fuzz()
