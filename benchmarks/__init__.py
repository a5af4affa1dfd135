"""Benchmarks of tkfac_jax; ``python benchmarks/train.py`` compares optimizers on a classifier."""
