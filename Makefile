# pyvirtio: `make demo` boots a guest with its root on a pyvirtio disk; `make test` runs everything.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all deps venv lint unit e2e test demo fuzz bench clean

all: test

deps:
	scripts/host-deps base guest xen qtest

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check src tests rigs fuzz bench
	$(VENV)/bin/ruff format --check src tests rigs fuzz bench
	$(VENV)/bin/mypy

unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

e2e: deps venv
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

test: deps venv lint
	$(PY) -m pytest tests $(PYTEST_ARGS)

# Long fuzzing runs: FUZZ_TIME seconds per target, corpora kept in out/fuzz/<target>.
FUZZ_TIME ?= 600
fuzz: venv
	for t in $(notdir $(wildcard fuzz/seeds/*)); do \
		mkdir -p out/fuzz/$$t && cp -n fuzz/seeds/$$t/* out/fuzz/$$t/; \
		$(PY) -m fuzz.run $$t -max_total_time=$(FUZZ_TIME) -max_len=4096 -timeout=10 \
			-artifact_prefix=out/fuzz/crash-$$t- out/fuzz/$$t || exit 1; \
	done

# Benchmarks against qemu-storage-daemon (and QEMU's own virtio-blk), and on the Xen rig against
# Xen's PV block driver; results in out/bench.
BENCH_ROUNDS ?= 3
BENCH_RUNTIME ?= 3
BENCH_GUEST_ROUNDS ?= 2
BENCH_XEN_ROUNDS ?= 3
# static is left out: a Linux guest's boot-time INVALIDATE turns it into dynamic mapping
# (docs/xen.md, "Guest memory"; docs/performance.md, section 7)
BENCH_XEN_VARIANTS ?= pv,dynamic,pv-g,grants,grants-ioreq
bench: deps venv
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench.loadgen_suite --rounds $(BENCH_ROUNDS) --runtime $(BENCH_RUNTIME) --out out/bench
	$(PY) -m bench.peers_suite --rounds $(BENCH_ROUNDS) --runtime $(BENCH_RUNTIME) --out out/bench
	$(PY) -m bench.profile_request --out out/bench
	$(PY) -m bench.nbd_suite --rounds $(BENCH_ROUNDS) --runtime $(BENCH_RUNTIME) --out out/bench
	$(PY) -m bench.guest_suite --rounds $(BENCH_GUEST_ROUNDS) --runtime $(BENCH_RUNTIME) --out out/bench
	$(PY) -m bench.inprocess_suite --out out/bench
	$(PY) -m bench.devices_suite --rounds $(BENCH_ROUNDS) --out out/bench
	$(PY) -m bench.xen_suite --rounds $(BENCH_XEN_ROUNDS) --variants $(BENCH_XEN_VARIANTS) --out out/bench

demo: deps venv
	$(PY) -m rigs.demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
