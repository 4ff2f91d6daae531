# Two commands do everything on a fresh machine:
#   make up     set up, start the local stack on the default model, run a demo generation
#   make test   set up, run the test suite
.PHONY: up test setup protos bench

setup:
	@scripts/setup.sh

up: setup
	.venv/bin/shardline up --demo $(ARGS)

test: setup
	.venv/bin/python -m pytest -q $(ARGS) tests

protos: setup
	.venv/bin/python scripts/gen_protos.py

bench: setup
	.venv/bin/python benchmarks/e2e_cpu.py $(ARGS)
