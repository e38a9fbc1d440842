"""The namespace tests' node configuration (integration/netns/nodes.py): extra lines
replace the test defaults they name, and the result is a valid configuration."""

from __future__ import annotations

from pathlib import Path

from integration.netns.nodes import NodeSpec, config_text
from replicator.config import parse_config


def test_extra_lines_replace_the_defaults_they_set_and_add_the_rest() -> None:
    spec = NodeSpec("fw-a", "fw-b", "10.0.0.1", "10.0.0.2", metrics_port=9100, extra={
        "sync.timers": ["ack_timeout = 4.0", "anti_entropy_interval = 0"],
        "kernel": ["refresh_interval = 4"],
    })
    text = config_text(spec, Path("/nonexistent"))
    assert text.count("ack_timeout") == 1
    config = parse_config(text)
    assert config.sync.timers.ack_timeout == 4.0
    assert config.sync.timers.keepalive_interval == 0.5  # a default left alone
    assert config.sync.timers.anti_entropy_interval is None
    assert config.kernel.refresh_interval == 4.0
    assert config.node.name == "fw-a" and config.sync.peer_name == "fw-b"
