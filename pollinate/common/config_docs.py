"""The config reference (``docs/config.md``), generated from the schema so it cannot drift from the code.

Regenerate with ``python -m pollinate.common.config_docs > docs/config.md``; ``tests/common/test_config_docs.py``
fails when the file differs. The output depends only on the registered sections and their fields (in
registration and declaration order), never on the machine or the time.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing

from pollinate.common.config import METHOD_NAMES, METHOD_SECTIONS, RunConfig
from pollinate.common.config_io import describe_fields

REGENERATE = "python -m pollinate.common.config_docs > docs/config.md"

_INTRO = f"""# Configuration reference

<!-- Generated from the config schema by `{REGENERATE}`; do not edit by hand. -->

A run is configured by one `RunConfig`. Precedence: field defaults < `--config run.toml` < dedicated flags
(`--method`, `--model`, `--data`, `--clients`, `--rounds`, `--seed`, `--scenario`, `--out`) and
`--set section.key=value` (repeatable; the value is read as TOML, lists also as `a,b,c`). Unknown keys and
invalid values are refused with the key named. `pollinate config show [options]` prints the effective config
as TOML; `pollinate simulate --help` lists the same keys.

In TOML, `method` is a top-level key and every section below is a table (`[federation]`, `[fedpipe]`, ...).
A method's own section is read only when that method runs.
"""


def _section_classes() -> dict[str, type]:
    """Section name -> its dataclass: the core sections of RunConfig, then each registered method's."""
    hints = typing.get_type_hints(RunConfig)
    core = {f.name: hints[f.name] for f in dataclasses.fields(RunConfig)
            if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])}
    return {**core, **METHOD_SECTIONS}


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    lines += [f"| `{key}` | `{_cell(default)}` | {_cell(help_)} |" for key, default, help_ in rows]
    return lines


def render() -> str:
    """The whole of ``docs/config.md``."""
    rows = describe_fields(RunConfig)
    top = [row for row in rows if "." not in row[0]]
    methods = ", ".join(f"`{name}`" for name in sorted(METHOD_NAMES))
    out = [_INTRO, "## Top level", "", f"Registered methods: {methods}.", "", *_table(top)]
    for name, cls in _section_classes().items():
        summary = (inspect.getdoc(cls) or "").split("\n\n")[0]
        summary = "" if summary.startswith(f"{cls.__name__}(") else summary  # dataclass's generated signature
        owner = " (method section)" if name in METHOD_SECTIONS else ""
        out += ["", f"## `[{name}]`{owner}", ""]
        out += [_cell(summary), ""] if summary else []
        out += _table([row for row in rows if row[0].split(".", 1)[0] == name and "." in row[0]])
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
