# The two commands of the README. Both run the idempotent set-up first.
VENV ?= .venv
CORES ?= 2

.PHONY: run test install lint

install:
	bash scripts/install.sh

run: install
	$(VENV)/bin/snakemake --cores $(CORES) --profile profiles/local

test: install
	bash scripts/run_tests.sh

lint: install
	$(VENV)/bin/snakemake --lint
