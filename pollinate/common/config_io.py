"""Reading and writing a RunConfig: TOML files, ``section.key=value`` overrides, type coercion, help rows.

Precedence: field defaults < ``--config run.toml`` < ``--set section.key=value`` / dedicated flags. Unknown keys
are rejected with the list of allowed ones.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pollinate.common.config import METHOD_SECTIONS, RENAMED_KEYS, ConfigError, RunConfig, require
from pollinate.common.suggest import did_you_mean


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert a TOML or CLI value to the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):  # "--set lora.target_modules=q_proj,v_proj" or "=[q_proj,v_proj]" (not TOML)
            value = value.strip()
            value = value[1:-1] if value.startswith("[") and value.endswith("]") else value
            value = [v.strip() for v in value.split(",") if v.strip()]
        require(isinstance(value, list), name, value, "a list")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(f"{name}[]", v, item_tp) for v in value]
    if origin in (typing.Union, types.UnionType):
        return value
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        require(isinstance(value, bool), name, value, "true or false")
        return value
    if tp is int:
        require(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer")
        return value
    if tp is float:
        require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number")
        return float(value)
    if tp is str:
        require(isinstance(value, str), name, value, "a string")
        return value
    return value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    return cls(**_parse_fields(_field_types(cls), raw, prefix))


def _parse_fields(types_: dict[str, Any], raw: Any, prefix: str, allowed: typing.Iterable[str] = ()) -> dict[str, Any]:
    """Type-checked keyword arguments for a section whose fields have ``types_``; ``allowed`` names more keys
    that are valid here (the top level's method sections) for the unknown-key error."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a table, got {raw!r}")
    unknown = sorted(set(raw) - set(types_))
    if unknown:
        renamed = RENAMED_KEYS.get(f"{prefix}{unknown[0]}")
        if renamed:
            raise ConfigError(f"config key '{prefix}{unknown[0]}' no longer exists; use {renamed}")
        where = f"section [{prefix.rstrip('.')}]" if prefix else "the top level"
        valid = sorted({*types_, *allowed})
        hint = did_you_mean(unknown[0], valid, prefix)
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' in {where}{hint}; allowed: {valid}")
    kwargs = {}
    for key, value in raw.items():
        tp = types_[key]
        kwargs[key] = _build(tp, value, f"{prefix}{key}.") if _is_section(tp) else _coerce(f"{prefix}{key}", value, tp)
    return kwargs


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """A validated RunConfig from plain values (TOML layout: method sections are top-level tables)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a table, got {raw!r}")
    core_types = {k: v for k, v in _field_types(RunConfig).items() if k != "methods"}
    sections = dict(METHOD_SECTIONS)
    core_raw = {k: v for k, v in raw.items() if k not in sections}
    methods = {name: _build(cls, raw.get(name, {}), f"{name}.") for name, cls in sections.items()}
    core = _parse_fields(core_types, core_raw, "", allowed=sections)
    return RunConfig(**core, methods=methods)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value``; the value is read as TOML when it parses, else as a plain string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, text = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return path, value


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{'.'.join(path)}': '{part}' is a value, not a section")
    node[path[-1]] = value


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not valid TOML: {exc}") from exc


def build_config(toml_path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Defaults, then the TOML file, then ``section.key=value`` overrides; validated as a whole."""
    raw: dict[str, Any] = load_toml(toml_path) if toml_path else {}
    for item in overrides:
        path, value = parse_override(item)
        _set_path(raw, path, value)
    return config_from_dict(raw)


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every config field, method sections included, for ``--help`` and docs."""
    rows = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name == "methods":
            for name, section_cls in METHOD_SECTIONS.items():
                rows += describe_fields(section_cls, f"{name}.")
            continue
        tp = _field_types(cls)[f.name]
        if _is_section(tp):
            rows += describe_fields(tp, f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", json.dumps(getattr(defaults, f.name)), f.metadata.get("help", "")))
    return rows


def to_toml(cfg: RunConfig) -> str:
    """The effective config as TOML (what ``pollinate config show`` prints and runs save)."""
    lines: list[str] = []
    sections = []
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            sections.append((key, value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    for name, values in sections:
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"
