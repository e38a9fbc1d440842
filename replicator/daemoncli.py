"""``replicator run`` (alias ``daemon``): start the daemon in the foreground.

systemd runs it as ``Type=notify``; the daemon says ``READY=1`` itself once the event
subscription, the first dump and the peer listener are up.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from .config import DEFAULT_CONFIG_PATH


async def _main(config: Path, netns: str | None) -> None:
    from .daemon import run_daemon

    await run_daemon(config, netns=netns)


def _run(args: argparse.Namespace) -> int:
    trio.run(_main, args.config, args.netns)
    return 0


def register(subparsers: Any) -> None:
    """Add ``run`` and its alias ``daemon``."""
    parser = subparsers.add_parser(
        "run", aliases=["daemon"], help="run the replication daemon in the foreground"
    )
    parser.add_argument(
        "-c", "--config", type=Path, default=DEFAULT_CONFIG_PATH, metavar="FILE",
        help=f"configuration file (default {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument(
        "--netns", metavar="NAME",
        help="replicate the table of this named network namespace (overrides kernel.netns)",
    )
    parser.set_defaults(handler=_run)
