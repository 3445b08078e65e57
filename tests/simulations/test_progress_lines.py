"""`simulate` says what it is doing before Ray starts (seconds of silence otherwise); --quiet says nothing."""

import pytest

import pollinate.simulations.run as run
import pollinate.simulations.stopping as stopping
from pollinate.common.config_io import build_config
from pollinate.simulations.run import simulate


class _RayNotStarted(Exception):
    pass


@pytest.mark.parametrize("quiet", [False, True])
def test_the_engine_line_comes_before_ray_starts_unless_quiet(quiet, tmp_path, monkeypatch, capsys):
    def refuse(init_args):
        raise _RayNotStarted(init_args)

    monkeypatch.setattr(stopping, "start_ray", refuse)
    monkeypatch.setattr(run, "_ray_initialized", lambda: False)  # whatever another test left running
    cfg = build_config(None, ['model.name="tiny-llama"', "federation.clients=2", "federation.client_cpus=1",
                              "data.builtin_examples=40", "data.eval_examples=8"])
    with pytest.raises(_RayNotStarted):
        simulate(cfg, tmp_path / "run", quiet=quiet)
    err = capsys.readouterr().err
    assert ("starting the simulation engine (Ray) with" in err) is not quiet
    assert ("data: skills:" in err) is not quiet
