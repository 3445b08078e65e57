"""Pollinate: federated and split-learning fine-tuning of transformer models, built on Flower."""

__version__ = "0.1.0"

# The method registry and the built-in methods (each imports only its config section here; halves load lazily).
import pollinate.methods  # noqa: E402, F401
