"""docs/configuration.md documents exactly the keys the schema accepts, truthfully."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

from replicator.config import SchemaKey, parse_value, schema_keys

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
ROW = re.compile(
    r"^\| `(?P<key>[a-z_.]+)` \| (?P<type>[^|]+) \| (?P<default>[^|]+) \| (?P<reload>[^|]+) \|"
)


class DocRow(NamedTuple):
    key: str
    default: str
    reload: str


def doc_rows() -> list[DocRow]:
    rows = []
    for line in DOC.read_text().splitlines():
        match = ROW.match(line)
        if match:
            rows.append(DocRow(match["key"], match["default"].strip(), match["reload"].strip()))
    return rows


SCHEMA = {key.path: key for key in schema_keys()}
ROWS = {row.key: row for row in doc_rows()}


def test_the_docs_list_exactly_the_schema_keys() -> None:
    documented = [row.key for row in doc_rows()]
    assert len(documented) == len(set(documented)), "a key is documented twice"
    assert set(documented) == set(SCHEMA)


def test_keys_are_documented_under_their_own_table() -> None:
    table = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("## `["):
            table = line.removeprefix("## `[").removesuffix("]`")
        match = ROW.match(line)
        if match:
            assert match["key"].rsplit(".", 1)[0] == table, match["key"]


@pytest.mark.parametrize("path", sorted(SCHEMA))
def test_reload_column_matches_the_schema(path: str) -> None:
    assert ROWS[path].reload == ("live" if SCHEMA[path].reloadable else "restart")


@pytest.mark.parametrize("path", sorted(SCHEMA))
def test_default_column_matches_the_schema(path: str) -> None:
    key: SchemaKey = SCHEMA[path]
    cell = ROWS[path].default
    if key.required:
        assert cell == "*required*"
        return
    literal = re.match(r"^`([^`]*)`", cell)
    if literal is None:
        # Prose such as "none" or "current namespace": the default is "absent".
        assert key.default is None, f"{path}: document the default {key.default!r}"
        return
    # The documented literal, read as TOML and parsed as the key would parse it.
    raw = tomllib.loads(f"v = {literal.group(1)}")["v"]
    assert parse_value(path, raw) == key.default
