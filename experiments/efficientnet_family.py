"""Experiment `efficientnet_family`: phi = 0..N beside single-dimension baselines."""
from experiments.efficientnet import run_family as run, validate_family as validate  # noqa: F401
