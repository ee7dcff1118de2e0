"""Importers of public checkpoints into colt5-flax networks (transformers' T5 and LongT5)."""
