# replicator — `make demo` and `make test` work on a fresh Debian machine as root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: all deps venv test lint unit netns demo bench fuzz soak clean

all: test

deps:
	@scripts/ensure-system-deps.sh

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check replicator tests integration bench
	$(VENV)/bin/mypy

unit: venv
	$(PYTEST) tests

netns: deps venv
	$(PYTEST) integration/netns

# Every suite: static checks, pure/trio unit tests, then real-kernel namespace tests.
# pytest exits 5 when it collected nothing: make treats that as the failure it is.
test: deps venv lint unit netns

demo: deps venv
	$(PY) -m integration.netns.demo

bench: deps venv
	$(PY) bench/kernel.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis
