"""Pollinate: federated and split-learning fine-tuning of transformer models, built on Flower."""

__version__ = "0.1.0"

import logging  # noqa: E402

# Before anything imports peft (which imports bitsandbytes): its CPU backend logs an offline "Failed to load CPU
# gemm_4bit_forward from kernels-community" warning on import, with nothing for the user to act on.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

# The method registry and the built-in methods (each imports only its config section here; halves load lazily).
import pollinate.methods  # noqa: E402, F401
