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


def _help_entries(parser):
    """Every option's help text and every epilog line of ``parser`` and its subcommands, with where it is."""
    import argparse

    for line in (parser.epilog or "").splitlines():
        yield parser.prog, line
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _help_entries(sub)
        elif action.help:
            yield f"{parser.prog} {'/'.join(action.option_strings) or action.dest}", action.help


def test_no_help_entry_states_its_default_twice():
    import re

    said = re.compile(r"\(default\b|\bby default\b", re.IGNORECASE)
    entries = list(_help_entries(cli.build_parser()))
    assert any("output.dir" in text for _, text in entries)  # the config-key epilog is among them
    twice = [(where, text) for where, text in entries if len(said.findall(text)) > 1]
    assert not twice, twice
