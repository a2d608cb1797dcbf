# The two commands of the README: `make serve` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.neuroserve-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the integration tests run for real: Redis (state store, job queue),
# Prometheus (promtool rule tests, a live scrape test) and Chromium (renders /docs headless).
TEST_APT_PACKAGES ?= redis-server prometheus chromium

.PHONY: install serve test test-all lint bench system-deps clean

# constraints-cpu.txt pins the CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints-cpu.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/neuroserve serve

system-deps:
	@missing=""; for p in $(TEST_APT_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing with apt-get"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

# One torch thread per process: the tests run servers, workers and clients side by side, and a
# second torch thread each only fights them for the cores (several times slower on 2 cores).
test: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest

# Long statistical runs and benchmarks-as-tests, kept out of the default run.
test-all: $(STAMP) system-deps
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -m "slow or not slow"

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
