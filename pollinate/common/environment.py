"""Environment defaults, in one place: offline Hugging Face, and Flower/Ray on loopback that phone nowhere.

Used by ``pollinate simulate`` (``SIMULATION_ENV``), by the tests (``tests/conftest.py``) and mirrored by the
Makefile's exports (``OFFLINE_ENV`` and ``LOOPBACK_ENV``; a test keeps them equal). Each is applied with
``setdefault``: a value the user set wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# The built-in models ship inside packages: nothing needs the Hugging Face Hub.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# Ray binds every interface unless told otherwise; Pollinate's listeners stay on loopback, and neither Flower
# nor Ray reports usage or checks for updates.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
# Progress bars and tokenizer threads only add noise and contention beside Pollinate's own progress lines.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
SIMULATION_ENV = {**LOOPBACK_ENV, **QUIET_ENV}


def set_env_defaults(*defaults: Mapping[str, str]) -> None:
    """``os.environ.setdefault`` for every entry of ``defaults``."""
    for env in defaults:
        for key, value in env.items():
            os.environ.setdefault(key, value)
