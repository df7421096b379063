"""hpc: HPC batch jobs that train and score big models (data -> train -> registry -> infer)."""

__version__ = "0.1.0"
