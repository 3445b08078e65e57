"""docs/adding-a-method.md is true: its example method, written to a folder and imported once, registers itself
(its own config section, client half, server half) and trains in a 2-client tiny-llama simulation."""

import importlib
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from pollinate.client.half import checked_half
from pollinate.common.config import METHOD_NAMES, METHOD_SECTIONS, ConfigError
from pollinate.common.config_io import build_config
from pollinate.methods import METHODS, get_method

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding-a-method.md"
FILES = {"toynorm/__init__.py", "toynorm/config.py", "toynorm/client.py", "toynorm/server.py"}


def documented_files() -> dict[str, str]:
    """The page's Python blocks whose first line names a file of the example (``# toynorm/client.py``)."""
    files = {}
    for block in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        first = block.partition("\n")[0]
        if re.fullmatch(r"# toynorm/\w+\.py", first):
            files[first[2:]] = block
    return files


@pytest.fixture(scope="module")
def toynorm(tmp_path_factory):
    root = tmp_path_factory.mktemp("my-methods")
    for name, text in documented_files().items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module("toynorm")  # the one import
    finally:  # the registry is process-wide: leave it as the built-in methods made it
        sys.path.remove(str(root))
        METHODS.pop("toynorm", None)
        METHOD_SECTIONS.pop("toynorm", None)
        METHOD_NAMES.remove("toynorm")
        for module in [m for m in sys.modules if m == "toynorm" or m.startswith("toynorm.")]:
            del sys.modules[module]


def test_the_documented_method_is_one_folder_that_registers_on_import(toynorm):
    assert set(documented_files()) == FILES
    spec = get_method("toynorm")
    assert spec.section == "toynorm" and spec.client_sections[-1] == "toynorm"
    checked_half("toynorm", spec.client_half())
    assert callable(spec.server_half().make_strategy)
    assert build_config(None, ["method='toynorm'", "toynorm.suffix='final.weight'"]).toynorm.suffix == "final.weight"
    with pytest.raises(ConfigError, match="'toynorm.suffix' = '' is invalid"):
        build_config(None, ["method='toynorm'", "toynorm.suffix=''"])


@pytest.mark.slow
def test_the_documented_method_trains_in_a_two_client_tiny_llama_simulation(toynorm, tmp_path):
    from pollinate.simulations.run import simulate

    cfg = build_config(None, ["method='toynorm'", "model.name='tiny-llama'", "federation.clients=2",
                              "federation.rounds=2", "data.builtin_examples=40", "data.eval_examples=6",
                              "train.local_steps=2", "output.plots=false"])
    report = simulate(cfg, tmp_path / "run", quiet=True)
    assert report["method"] == "toynorm" and not report["rejected"]
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert all(sorted(c["client_id"] for c in r["clients"]) == [0, 1] for r in report["rounds"])
    final = load_file(str(tmp_path / "run" / "checkpoints" / "round-0002" / "global.safetensors"))
    assert final and all(name.endswith("norm.weight") for name in final)
    assert any(not np.allclose(value, 1.0) for value in final.values())  # RMSNorm weights start at 1: trained
