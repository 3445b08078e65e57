"""Atomic per-round checkpoints of the global state: ``checkpoints/round-NNNN/{global.safetensors,state.json}``.

Each round is written into a temporary directory, fsynced, then renamed into place, so a crash at any
moment leaves only complete rounds; ``latest_round`` finds the newest one to resume from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

GLOBAL_FILE = "global.safetensors"
STATE_FILE = "state.json"


def round_dir(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{server_round:04d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_round(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
    target = round_dir(run_dir, server_round)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / GLOBAL_FILE))
    with open(tmp / STATE_FILE, "w") as fh:
        json.dump(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    with open(tmp / GLOBAL_FILE, "rb") as fh:
        os.fsync(fh.fileno())
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    return target


def latest_round(run_dir: Path) -> int | None:
    """The newest complete round in ``run_dir`` (temporary leftovers of a crash are ignored)."""
    root = Path(run_dir) / "checkpoints"
    rounds = [int(p.name.split("-")[1]) for p in root.glob("round-[0-9][0-9][0-9][0-9]")
              if (p / STATE_FILE).is_file() and (p / GLOBAL_FILE).is_file()] if root.is_dir() else []
    return max(rounds) if rounds else None


def load_round(run_dir: Path, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    directory = round_dir(run_dir, server_round)
    return load_file(str(directory / GLOBAL_FILE)), json.loads((directory / STATE_FILE).read_text())
