# pbx-bridge: the two commands a newcomer needs are `make run` and `make test`.
# Both set up everything on a fresh machine: a virtualenv, a private PostgreSQL cluster,
# the real-PBX sandbox (two Asterisk 22 instances in a Debian chroot; needs root), and the
# database migrations. State lives in .state/, except what the postgres user must reach:
# /var/lib/pbx-bridge-dev/<key of this checkout's .state path> (see scripts/devenv.py).

PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: run test env down lint unit bench load fuzz fixtures screenshots clean container

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python >= 3.11 required"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

## env: PostgreSQL + database + migrations + sandbox PBX
env: $(STAMP)
	$(BIN)/python scripts/devenv.py up

## down: stop the sandbox and PostgreSQL
down:
	-$(PYTHON) scripts/devenv.py down

## run: set everything up, start pbx-bridge in the foreground, place a demo call, show its record;
## Ctrl-C stops pbx-bridge, the sandbox and PostgreSQL (scripts/demo.py does the teardown)
run: env
	$(BIN)/python scripts/demo.py

## lint: ruff and mypy --strict
lint: $(STAMP)
	$(BIN)/ruff check pbx_bridge tests scripts docker
	$(BIN)/mypy

## test: lint, then unit, integration and end-to-end tests against the real sandbox
test: lint env
	$(BIN)/pytest; status=$$?; $(MAKE) --no-print-directory down; exit $$status

## container: the PBX image of docker/asterisk/ (podman, from a base imported from the sandbox's Debian
## root filesystem), run from compose.yaml beside the sandbox; one real call from the sandbox's world
## into it, recorded by pbx-bridge on the host (also part of `make test`; about 25 s cold, 15 s warm)
container: env
	$(BIN)/python scripts/container.py setup
	$(BIN)/pytest tests/e2e/test_container.py

## unit: only the tests that need neither PostgreSQL nor the PBX
unit: $(STAMP)
	$(BIN)/pytest tests/unit

## bench: throughput (3/210/2,100 live calls) against panoramisk's own parse, latency at 100 calls/s
## through the real daemon, memory over a million calls; writes docs/performance.md (about 15 min;
## PostgreSQL from `make env`, no PBX: a stand-in AMI server feeds the daemon)
bench: env
	$(BIN)/python tests/bench/bench_pipeline.py

## load: real calls through the sandbox PBX (200 at once, then 10/s for 2 min), every record checked;
## writes its table to docs/performance.md. Holds the sandbox: `flock /tmp/pbx-sandbox.lock make load`
load: env
	$(BIN)/python tests/bench/load.py

## fuzz: a million mutated AMI messages through framing + tracker, on both cores (`make unit` runs 50k);
## a new seed each run, printed; PBX_BRIDGE_FUZZ_SEED=<seed> replays one
fuzz: $(STAMP)
	PBX_BRIDGE_FUZZ_MESSAGES=1000000 PBX_BRIDGE_FUZZ_SEED=$${PBX_BRIDGE_FUZZ_SEED:-$$(date +%s)} \
		$(BIN)/pytest -q -s tests/unit/test_fuzz_ami.py

## fixtures: re-capture the AMI streams under tests/fixtures/ami, and the CEL rows of the same calls
## under tests/fixtures/cel, from the sandbox
fixtures: env
	$(BIN)/python tests/support/capture.py tests/fixtures/ami

## screenshots: refresh docs/images/wallboard-*.png and docs/images/report-daily.png from headless Chromium:
## a real call through the sandbox on the wallboard, and the HTML daily report
screenshots: env
	PBX_BRIDGE_SCREENSHOTS=docs/images $(BIN)/pytest -q tests/e2e/test_wallboard.py tests/integration/test_report_charts.py

## clean: stop everything and delete all state (.state/, the cluster under /var/lib/pbx-bridge-dev, the venv)
clean:
	-$(PYTHON) scripts/devenv.py clean
	rm -rf .state $(VENV)
