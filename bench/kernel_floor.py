"""The kernel's own time for a commit's creates, with and without another namespace's
entries in the host's table.

``.venv/bin/python bench/kernel_floor.py [--entries 100000] [--runs 3]`` (root; it
creates two namespaces of its own and removes them) prints ``name=value`` lines: the
seconds the kernel takes for ``--entries`` creates sent from one socket in 256 KiB
datagrams (what ``kernel_n<N>_create_s`` of ``bench/sync.py`` measures, with the same
code), into a fresh namespace

* ``empty_none_s`` / ``empty_destroy_s``: with no other entry on the host, and no
  event listener / one socket in the DESTROY group (a replicator commit's state);
* ``loaded_none_s`` / ``loaded_destroy_s``: the same while another namespace holds
  ``--entries`` entries, as the active's namespace does when ``bench/sync.py``
  measures its floor and both systems' commits (the conntrack hash table is one for
  all namespaces).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sync import create_batches, emit, flush, inject, kernel_count, timed_creates
from integration.netns.lab import lab
from integration.netns.pair import synthetic
from replicator.kernel_linux import NFNLGRP_CONNTRACK_DESTROY


def main() -> None:
    """Measure (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    batches = create_batches(args.entries)
    listeners: dict[str, tuple[int, ...]] = {"none": (), "destroy": (NFNLGRP_CONNTRACK_DESTROY,)}
    with lab("kf") as the_lab:
        other, target = the_lab.netns("a"), the_lab.netns("b")
        for _ in range(args.runs):
            for host in ("empty", "loaded"):
                flush(other)
                if host == "loaded":
                    inject(other, synthetic(0, args.entries, timeout=600))
                for name, groups in listeners.items():
                    emit(f"{host}_{name}_s", timed_creates(target, batches, groups))
                    if kernel_count(target) != args.entries:
                        raise RuntimeError("not every entry was created")
            flush(other)
        flush(target)


if __name__ == "__main__":
    main()
