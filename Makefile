# Entry points on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
# Every target runs the idempotent setup first, so nothing else needs doing by hand.
.PHONY: setup test test-fast demo clean
# Keep output clean when make runs inside make (tests run `make demo` under `make test`
# and parse its last line): no "Entering/Leaving directory" lines.
MAKEFLAGS += --no-print-directory

PYTEST ?= .venv/bin/pytest

setup:
	scripts/setup_env.sh

# The whole suite, slow end-to-end tests included (this is what .ci/run and the README run).
test: setup
	$(PYTEST) -q

# Quick feedback while developing: everything but the tests marked slow.
test-fast: setup
	$(PYTEST) -q -m "not slow"

# End to end on sample footage: own Mosquitto + Tansu, bridge, agent, counts from Kafka.
demo: setup
	.venv/bin/python scripts/demo.py

clean:
	rm -rf .pytest_cache build dist *.egg-info
