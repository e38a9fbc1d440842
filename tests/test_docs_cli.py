"""docs/operations.md (and README.md) show only commands that exist, and the runbook
documents every command, every ``status`` field and every metric there is."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from replicator.cli import build_parser
from replicator.control import ResyncReport, StatusReport
from replicator.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "docs" / "operations.md").read_text()
README = (ROOT / "README.md").read_text()
#: Shell syntax that ends the replicator part of a documented line.
SHELL_END = re.compile(r"\s(?:\||>|#|&&|;)")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def documented_command_lines(text: str) -> list[str]:
    """Every ``replicator ...`` line in a code span or a code block, shell parts cut off."""
    candidates = re.findall(r"`([^`\n]+)`", text)
    for block in re.findall(r"```(?:sh)?\n(.*?)```", text, flags=re.S):
        candidates += block.replace("\\\n", " ").splitlines()
    lines = []
    for candidate in candidates:
        line = candidate.strip()
        if " -- replicator " in line:  # runuser -u replicator -- replicator keygen ...
            line = line.split(" -- ", 1)[1]
        if line.startswith("replicator "):
            lines.append(SHELL_END.split(line, maxsplit=1)[0].strip())
    return sorted(set(lines))


LINES = documented_command_lines(TEXT)
README_LINES = documented_command_lines(README)


def command_path(argv: list[str]) -> tuple[str, ...]:
    """The (sub)command names at the start of ``argv``."""
    path: list[str] = []
    parser = build_parser()
    for word in argv:
        choices = _subcommands(parser)
        if word not in choices:
            break
        path.append(word)
        parser = choices[word]
    return tuple(path)


def all_command_paths() -> set[tuple[str, ...]]:
    """Every leaf command of the parser, aliases included (``("config", "check")``...)."""
    paths: set[tuple[str, ...]] = set()

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        choices = _subcommands(parser)
        if not choices:
            paths.add(prefix)
        for name, sub in choices.items():
            walk(sub, (*prefix, name))

    walk(build_parser(), ())
    return paths


def test_the_runbook_and_readme_show_commands() -> None:
    assert len(LINES) > 20
    assert len(README_LINES) > 5


@pytest.mark.parametrize("line", sorted(set(LINES + README_LINES)))
def test_every_documented_command_line_parses(line: str) -> None:
    argv = shlex.split(line)[1:]
    if any(word.startswith("<") for word in argv):
        # A template (`replicator notify GROUP VG_FW <state> <prio>`): the command
        # before the first placeholder must exist.
        words = argv[: next(i for i, w in enumerate(argv) if w.startswith("<"))]
        assert command_path(words) in all_command_paths(), line
        return
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{line!r} does not parse (exit {exc.code})")


def test_every_command_is_documented() -> None:
    documented = {command_path(shlex.split(line)[1:]) for line in LINES}
    missing = sorted(" ".join(p) for p in all_command_paths() - documented)
    assert missing == []


@pytest.mark.parametrize("option", ["--internal", "--external", "--kernel", "--peer"])
def test_every_cache_and_source_choice_is_documented(option: str) -> None:
    assert any(option in shlex.split(line) for line in LINES)


def test_every_status_field_is_explained() -> None:
    section = TEXT.split("### `replicator status`", 1)[1].split("### `replicator stats`", 1)[0]
    for key in [*StatusReport.__annotations__, *ResyncReport.__annotations__]:
        assert f"`{key}`" in section or f"`entries.{key}`" in section, key
    for cache in ("internal", "external", "kernel"):
        assert f"`entries.{cache}`" in section


def test_every_metric_is_explained_and_no_other() -> None:
    exported = set()
    for family in Metrics().registry.collect():
        exported.add(family.name + "_total" if family.type == "counter" else family.name)
    section = TEXT.split("### Prometheus", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(replicator_[a-z_]+)", section, flags=re.M))
    documented |= set(re.findall(r", `(replicator_[a-z_]+)", section))
    assert documented == exported
