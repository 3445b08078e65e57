"""The `pollinate` command itself: --version, a user-facing top-level help, "did you mean" for mistyped choices."""

from __future__ import annotations

import pytest

import pollinate.cli as cli
from pollinate.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"pollinate {cli._version()}"
    assert cli._version().count(".") >= 2


def test_top_level_help_describes_the_tool_for_users(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert cli.DESCRIPTION in text and "quick start:" in text and "after a run" in text
    assert cli.__doc__.splitlines()[0] not in text  # the module docstring is for developers
    for command in ("simulate", "export", "generate", "eval"):
        assert command in text


@pytest.mark.parametrize(("argv", "hint"), [
    (["simulat"], "did you mean 'simulate'?"),
    (["exprot", "RUN"], "did you mean 'export'?"),
    (["simulate", "--method", "fedpip"], "did you mean 'fedpipe'?"),
    (["simulate", "--scenario", "tier"], "did you mean 'tiers'?"),
])
def test_a_mistyped_choice_suggests_the_closest(argv, hint, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert hint in capsys.readouterr().err


def test_bench_suggests_a_mistyped_method(capsys):
    assert main(["bench", "--methods", "fedavg-lora,fedpip"]) == 2
    assert "did you mean 'fedpipe'?" in capsys.readouterr().err
