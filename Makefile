# The two commands of the README. Both run the idempotent set-up first.
VENV ?= .venv
CORES ?= 2

.PHONY: run scratch transfer test install lint image

install:
	bash scripts/install.sh

run: install
	$(VENV)/bin/snakemake --cores $(CORES) --profile profiles/local

# The from-scratch conformer instead of the default's fine-tuned Whisper encoder (config/scratch.yaml)
scratch: install
	$(VENV)/bin/snakemake --cores $(CORES) --profile profiles/local --configfile config/scratch.yaml

# The longer two-stage Whisper tiny.en recipe next to the default (config/transfer.yaml; ~33 min more on 2 CPU cores)
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
