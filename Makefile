# Entry points on a fresh Debian/Ubuntu machine: `make demo` and `make test`.
# Every target runs the idempotent setup first, so nothing else needs doing by hand.
.PHONY: setup test test-fast lint demo clean
# Tests run with make's variables removed: a test that runs `make demo` and parses its last
# line must see a top-level make, not a sub-make that adds "Leaving directory" lines.
CLEAN_ENV = env -u MAKELEVEL -u MAKEFLAGS -u MFLAGS

PYTEST ?= .venv/bin/pytest

setup:
	scripts/setup_env.sh

# The whole suite, slow end-to-end tests included (this is what .ci/run and the README run).
test: setup
	$(CLEAN_ENV) $(PYTEST) -q

# Quick feedback while developing: everything but the tests marked slow.
test-fast: setup
	$(CLEAN_ENV) $(PYTEST) -q -m "not slow"

# The import rules of the layout (pyproject.toml [tool.importlinter], docs/architecture.md);
# tests/system/test_layout.py runs the same check inside `make test`.
lint: setup
	.venv/bin/lint-imports --no-cache

# End to end on sample footage: own Mosquitto + Tansu + PostgreSQL, bridge, consumer, agent, counts
# from Kafka and PostgreSQL. `make demo BROKER=rabbitmq`: a private RabbitMQ node instead of Tansu.
demo: setup
	.venv/bin/python scripts/demo.py $(if $(BROKER),--broker $(BROKER))

clean:
	rm -rf .pytest_cache build dist *.egg-info
