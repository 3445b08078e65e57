"""Test environment: offline Hugging Face, quiet Flower/Ray on loopback, scratch dirs per session."""

import os
import tempfile

_SCRATCH = tempfile.mkdtemp(prefix="pollinate-tests-")
for key, value in {
    "OMP_NUM_THREADS": "1",  # tiny-model tests: threads only add contention on 2 cores
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HOME": os.path.join(_SCRATCH, "hf"),
    "FLWR_HOME": os.path.join(_SCRATCH, "flwr"),
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "TORCH_EXTENSIONS_DIR": os.path.join(_SCRATCH, "torch_ext"),
}.items():
    os.environ.setdefault(key, value)
