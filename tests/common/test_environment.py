"""One source for the offline/loopback environment: the Makefile, the tests and `simulate` agree with it."""

import os
import re
import subprocess
import sys
from pathlib import Path

from pollinate.common.environment import LOOPBACK_ENV, OFFLINE_ENV, QUIET_ENV, SIMULATION_ENV

ROOT = Path(__file__).resolve().parents[2]


def test_makefile_exports_exactly_the_offline_and_loopback_defaults():
    exports = dict(re.findall(r"^export (\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M))
    assert exports == {**OFFLINE_ENV, **LOOPBACK_ENV}


def test_tests_run_with_the_defaults():
    for key in {**OFFLINE_ENV, **LOOPBACK_ENV}:
        assert key in os.environ, key


def test_simulation_keeps_ray_and_flower_on_loopback_and_quiet():
    assert SIMULATION_ENV == {**LOOPBACK_ENV, **QUIET_ENV}
    assert SIMULATION_ENV["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"


def test_no_other_module_restates_the_defaults():
    keys = {*OFFLINE_ENV, *LOOPBACK_ENV, *QUIET_ENV}
    sources = [*(ROOT / "pollinate").rglob("*.py"), ROOT / "tests" / "conftest.py"]
    restating = [f"{path.relative_to(ROOT)}: {key}" for path in sources if path.name != "environment.py"
                 for key in keys if f'"{key}"' in path.read_text()]
    assert restating == []


def test_reading_the_defaults_loads_no_library_they_configure():
    # conftest applies them on import: that must happen before huggingface_hub, flwr or ray read them.
    code = ("import sys, pollinate.common.environment; "
            "print(sorted(m for m in ('huggingface_hub', 'transformers', 'flwr', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
