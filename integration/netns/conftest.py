"""Fixtures for the real-kernel tests: they need root and create their own namespaces."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from integration.netns.lab import Lab, lab


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test here as ``netns``; refuse (not skip) to run without root."""
    for item in items:
        item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the namespace tests need root (they create network namespaces)")


@pytest.fixture
def netlab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab whose namespaces are removed after the test, even on failure."""
    with lab(request.node.name[:2]) as the_lab:
        yield the_lab
