"""Pollinate: federated and split-learning fine-tuning of transformer models, built on Flower."""

__version__ = "0.1.0"
