"""Real-kernel tests in network namespaces created (and removed) by the tests."""
