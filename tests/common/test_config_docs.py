"""docs/config.md is what the schema generates: a new or changed config field must come with regenerated docs."""

import subprocess
import sys
from pathlib import Path

from pollinate.common.config_docs import REGENERATE, _cell, render

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def _generated() -> str:
    # A fresh interpreter: tests may register extra methods (and sections) in this one.
    return subprocess.run([sys.executable, "-m", "pollinate.common.config_docs"], check=True, capture_output=True,
                          text=True, cwd=DOC.parents[1]).stdout


def test_docs_config_md_is_current():
    assert DOC.is_file(), f"docs/config.md is missing; generate it with `{REGENERATE}`"
    assert DOC.read_text() == _generated(), f"docs/config.md is out of date with the config schema; run `{REGENERATE}`"


def test_reference_lists_every_key_of_every_section_once():
    from pollinate.common.config_io import describe_fields

    text = render()
    for key, _, _ in describe_fields():
        assert text.count(f"| `{key}` |") == 1, key
    assert "## `[fedpipe]` (method section)" in text and "## `[sfprompt]` (method section)" in text


def test_table_cells_escape_pipes_and_newlines():
    assert _cell("a | b\n  c") == "a \\| b c"
