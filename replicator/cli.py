"""The ``replicator`` command line.

Each command family lives in its own module and registers its sub-commands here, so
this module only assembles the parser. Exit status: 0 on success, 1 on error with a
one-line reason on stderr (2 for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import ReplicatorError

#: A command handler: takes the parsed arguments, returns the exit status.
Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every command module's sub-commands registered."""
    parser = argparse.ArgumentParser(
        prog="replicator",
        description="Replicate the conntrack table of an HA firewall pair.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Imported here so that `replicator --help` stays cheap and a broken optional
    # module cannot break the others.
    from . import ctcli, daemoncli, keycli, opscli

    ctcli.register(sub)
    keycli.register(sub)
    opscli.register(sub)
    daemoncli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``replicator`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ReplicatorError as exc:
        print(f"replicator: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
