"""Entry points of satm-jax: ``python -m experiments.run`` and friends."""
