"""colt5-flax: CoLT5 (Ainslie et al., EMNLP 2023) in JAX/Flax."""

__version__ = "0.1.0"
