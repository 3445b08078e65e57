"""Test environment: offline Hugging Face, quiet Flower/Ray on loopback, scratch dirs per session."""

import os
import tempfile

from pollinate.common.environment import LOOPBACK_ENV, OFFLINE_ENV, set_env_defaults

_SCRATCH = tempfile.mkdtemp(prefix="pollinate-tests-")
set_env_defaults(OFFLINE_ENV, LOOPBACK_ENV, {
    "OMP_NUM_THREADS": "1",  # tiny-model tests: threads only add contention on 2 cores
    "HF_HOME": os.path.join(_SCRATCH, "hf"),
    "FLWR_HOME": os.path.join(_SCRATCH, "flwr"),
    "TORCH_EXTENSIONS_DIR": os.path.join(_SCRATCH, "torch_ext"),
})
