# tiality: `make demo` and `make test` each do their own set-up (system packages, .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sysdeps sysdeps-test demo test lint typecheck pytest proto bench clean

install: $(STAMP)

sysdeps:
	@scripts/sysdeps.sh run

sysdeps-test:
	@scripts/sysdeps.sh test

$(STAMP): pyproject.toml
	@scripts/sysdeps.sh run
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

demo: $(STAMP)
	$(BIN)/tiality demo

# ruff, mypy, then the tests (the virtual sound card needs PulseAudio: sysdeps-test installs it).
test: $(STAMP) sysdeps-test lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

# Regenerates tiality_cli/net/_proto from proto/*.proto (checked by tests/test_proto_current.py).
proto: $(STAMP)
	$(BIN)/python -m tiality_cli.net._proto.generate

bench: $(STAMP) sysdeps-test
	$(BIN)/python -m benchmarks.latency

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
