"""asrflow: reproducible CTC speech-recognition training as a Snakemake workflow."""

__version__ = "0.1.0"
