"""The ``replicator`` command line.

Each command family lives in its own module and registers its sub-commands here, so
this module only assembles the parser. Exit status: 0 on success, 1 on error with a
one-line reason on stderr (2 for usage errors, as argparse does).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ReplicatorError

#: A command handler: takes the parsed arguments, returns the exit status.
Handler = Callable[[argparse.Namespace], int]


def build_parser(*, operator_only: bool = False) -> argparse.ArgumentParser:
    """The full parser with every command module's sub-commands registered.

    ``operator_only``: only the commands that talk to the running daemon (and ``config
    check``), whose module imports neither trio nor the daemon nor cryptography.
    """
    return _assemble(operator_only=operator_only)[0]


def _assemble(*, operator_only: bool) -> tuple[argparse.ArgumentParser, Any]:
    """The parser and its sub-parsers action (whose ``choices`` name the commands)."""
    parser = argparse.ArgumentParser(
        prog="replicator",
        description="Replicate the conntrack table of an HA firewall pair.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Imported here so that `replicator --help` stays cheap and a broken optional
    # module cannot break the others.
    from . import opscli

    if operator_only:
        opscli.register(sub)
        return parser, sub
    from . import ctcli, daemoncli, keycli

    ctcli.register(sub)
    keycli.register(sub)
    opscli.register(sub)
    daemoncli.register(sub)
    return parser, sub


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``replicator`` script."""
    words = sys.argv[1:] if argv is None else list(argv)
    # keepalived runs `replicator check` every second (track_script) and `replicator
    # notify` on transitions: a dead daemon is noticed only as fast as these commands
    # start. Importing the daemon's stack (trio, pyroute2, cryptography) would multiply
    # their start-up time, so a command of the operator family gets a parser of that
    # family alone; anything else (including --help) gets the full one.
    parser, sub = _assemble(operator_only=True)
    if not words or words[0] not in sub.choices:
        parser = build_parser()
    args = parser.parse_args(words)
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
