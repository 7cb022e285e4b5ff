# netswap: `make run` and `make test` each do the whole set-up on Debian 12.
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
export VENV

.PHONY: setup run test lint typecheck pytest simulate bench-store bench-nbd bench-agent bench-budget bench-compiled bench-compress corpus fuzz soak lab-compose clean

setup:
	@bash deploy/setup-host.sh

run: setup
	$(VENV)/bin/netswap serve

test: setup lint typecheck pytest

lint:
	$(VENV)/bin/ruff check protocol server client lab tests deploy/compile.py
	$(VENV)/bin/ruff format --check protocol server client lab tests deploy/compile.py

# mypy resolves `netswap.*` through a tree of symlinks that mirrors the installed
# layout (setuptools' editable finder is an import hook mypy cannot follow).
typecheck:
	@mkdir -p .cache/typecheck/netswap
	@for p in protocol server client lab; do ln -sfn "$(CURDIR)/$$p" .cache/typecheck/netswap/$$p; done
	cd .cache/typecheck && MYPYPATH=. $(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		-p netswap.protocol -p netswap.server -p netswap.client -p netswap.lab

# Two workers: the QEMU labs (two groups, each on one worker in turn) are CPU-bound
# in one process while most other tests wait on sockets; --dist loadgroup keeps a
# group's tests on one worker, as they share a guest cache or a port.
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=12

pytest:
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

# Extra arguments for a benchmark, e.g. make bench-agent BENCH_ARGS="--cpus 1".
BENCH_ARGS ?=

bench-store: setup
	$(PY) -m tests.bench.bench_store $(BENCH_ARGS)

bench-agent: setup
	$(PY) -m tests.bench.bench_agent $(BENCH_ARGS)

# µs of CPU per request by stage, agent and store (py-spy --gil and /proc; see the README).
bench-budget: setup
	$(PY) -m tests.bench.budget $(BENCH_ARGS)

bench-nbd: setup
	$(PY) -m tests.bench.bench_nbd $(BENCH_ARGS)

# A corpus of real anonymous memory (as root: five programs at work, .cache/corpus/), then
# every codec and level on it in one report (issue 31; tests/corpus/RESULTS.md).
CORPUS_ARGS ?=

corpus: setup
	$(PY) -m tests.corpus $(CORPUS_ARGS)

bench-compress: setup
	$(PY) -m tests.bench.compress $(BENCH_ARGS)

# The store's protocol fuzzer, long run: a million frames (make test runs a minute of it).
FUZZ_ARGS ?= --frames 1000000

fuzz: setup
	$(PY) -m tests.fuzz.fuzz_store $(FUZZ_ARGS)

# The deterministic simulator (tests/sim): the real replica machine against simulated
# stores, network and clock under faults, every promise checked after every step.
# make test runs 1,000 seeds; this runs 100,000. SEED=N replays one seed with its trace.
SEEDS ?= 100000
SEED ?=

simulate: setup
	$(PY) -m tests.sim $(if $(SEED),--seed $(SEED),--seeds $(SEEDS))

# Ten minutes of agent and stores under a verified workload, stores killed on a
# schedule (make test runs ninety seconds of it); the RSS chart goes to artifacts/.
SOAK_ARGS ?= --seconds 600

soak: setup
	$(PY) -m tests.soak.soak $(SOAK_ARGS)

# The compose lab for real: podman (offline: the base image from debootstrap, Prometheus
# from Debian's package), a store killed and another restarted under a verified load.
COMPOSE_ARGS ?=

lab-compose: setup
	$(VENV)/bin/netswap lab compose $(COMPOSE_ARGS)

# Each compiled module against its pure Python, in one run (deploy/compile.py keeps
# the ones that pay).
bench-compiled: setup
	$(PY) -m tests.bench.bench_compiled

clean:
	-$(PY) deploy/compile.py --clean
	rm -rf .cache .mypy_cache .ruff_cache .pytest_cache
