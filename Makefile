# The two commands of the README. Both run the idempotent set-up first.
VENV ?= .venv
CORES ?= 2

.PHONY: run transfer test install lint image

install:
	bash scripts/install.sh

run: install
	$(VENV)/bin/snakemake --cores $(CORES) --profile profiles/local

# The Whisper tiny.en transfer recipe next to the default (config/transfer.yaml; ~33 min more on 2 CPU cores)
transfer: install
	$(VENV)/bin/snakemake --cores $(CORES) --profile profiles/local --configfile config/transfer.yaml

test: install
	bash scripts/run_tests.sh

lint: install
	$(VENV)/bin/snakemake --lint

# The container image, built here with buildah from the Dockerfile (no registry): scripts/build_image.sh.
# BASE=..., IMAGE=..., HOROVOD_NCCL=1 pass through the environment.
image:
	bash scripts/build_image.sh
