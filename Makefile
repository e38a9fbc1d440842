# replicator — `make demo` and `make test` work on a fresh Debian machine as root.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: all deps venv test lint unit netns demo bench bench-sync fuzz soak clean

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
	$(VENV)/bin/ruff check replicator tests integration bench fuzz
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

# replicator vs conntrackd (FTFW/UDP) on one namespace pair: docs/performance.md.
bench-sync: deps venv
	$(PY) bench/sync.py

# Every decoder of untrusted bytes under atheris (fuzz/): FUZZ_RUNS inputs per target,
# seeded from valid messages; fails if any target crashed (inputs in build/fuzz/crashes/).
FUZZ_RUNS ?= 20000

fuzz: venv
	$(PY) -m pip install -q atheris
	@mkdir -p build; failed=""; \
	for target in framing wire sync_receive ctnetlink control config notify; do \
		echo "fuzz $$target: $(FUZZ_RUNS) runs"; \
		if $(PY) -m fuzz.fuzz_$$target -runs=$(FUZZ_RUNS) 2>build/fuzz-$$target.log; then \
			grep -h '^stat::number_of_executed_units' build/fuzz-$$target.log; \
		else \
			tail -n 40 build/fuzz-$$target.log; failed="$$failed $$target"; \
		fi; \
	done; \
	if [ -n "$$failed" ]; then echo "fuzz: crashes in:$$failed"; exit 1; fi

# Long runs, not part of `make test`: SOAK_SECONDS of steady churn on a running pair
# (bench/soak.py: flat memory, zero divergence), then the fault tests' long variants.
SOAK_SECONDS ?= 1800

soak: deps venv
	$(PY) bench/soak.py --duration $(SOAK_SECONDS)
	REPLICATOR_PARTITION_SECONDS=60 REPLICATOR_BULK_ENTRIES=250000 \
		$(PYTEST) -s integration/netns/test_faults.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .hypothesis
