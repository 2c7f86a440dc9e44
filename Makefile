# tiality: `make demo` and `make test` each do their own set-up (system packages, .venv).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install sysdeps sysdeps-test demo test lint typecheck pytest proto bench clean install-service

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

# The Pi (or a headless receiver), as root from /opt/tiality: system packages, a non-editable .venv,
# the tiality user, the systemd units and /etc/default/tiality (an existing one is kept). docs/pi.md.
install-service:
	@[ "$$(id -u)" -eq 0 ] || { echo "install-service: run as root: sudo make install-service" >&2; exit 1; }
	@[ "$(CURDIR)" = /opt/tiality ] || echo "install-service: warning: the units run /opt/tiality/.venv/bin/tiality, not $(CURDIR)" >&2
	scripts/sysdeps.sh run
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q .
	id -u tiality >/dev/null 2>&1 || useradd --system --groups audio --home-dir /nonexistent --shell /usr/sbin/nologin tiality
	install -m 0644 deploy/systemd/tiality-send.service deploy/systemd/tiality-recv.service /etc/systemd/system/
	[ -e /etc/default/tiality ] || install -m 0600 -o root -g root deploy/default/tiality /etc/default/tiality
	systemctl daemon-reload
	@echo "Now: sudoedit /etc/default/tiality (TIALITY_TARGET, TIALITY_TOKEN), then sudo systemctl enable --now tiality-send"
