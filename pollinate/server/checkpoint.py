"""Atomic per-round checkpoints of the global state, and resuming from them.

Layout: ``checkpoints/round-NNNN/{global.safetensors, state.json}`` (and ``server_optimizer.safetensors`` when
``federation.server_optimizer`` keeps state, e.g. FedAdam's moments). Each round is written
into a temporary directory, fsynced, then renamed into place, so a crash at any moment leaves only complete
rounds; ``latest_round`` finds the newest one to resume from.

``state.json`` holds everything a resumed run needs to continue as if never stopped: the round index, the
report history so far (initial evaluation, rounds, rejected updates, elapsed seconds), the server's RNG states
(python ``random``, numpy, torch), and the run config and its hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from pollinate.common.config import ConfigError, RunConfig
from pollinate.server.server_optimizer import ServerOptimizer

GLOBAL_FILE = "global.safetensors"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "server_optimizer.safetensors"
STATE_VERSION = 1
# Output settings say where results go, not what they are: a resumed copy of a run may live elsewhere.
_NOT_HASHED = ("output",)
# Settings that change when results appear, never what they are (a run may resume with them changed).
_NOT_HASHED_KEYS = (("eval", "overlap"),)


class ResumeError(ConfigError):
    """A run directory cannot be resumed with this config; the message says why and what to do."""


def round_dir(run_dir: Path, server_round: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"round-{server_round:04d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def save_round(run_dir: Path, server_round: int, arrays: dict[str, np.ndarray], state: dict[str, Any],
               optimizer_state: dict[str, np.ndarray] | None = None) -> Path:
    """Write one round's checkpoint atomically (with the server optimizer's state when there is one)."""
    target = round_dir(run_dir, server_round)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / GLOBAL_FILE))
    _fsync_file(tmp / GLOBAL_FILE)
    if optimizer_state is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in optimizer_state.items()}, str(tmp / OPTIMIZER_FILE))
        _fsync_file(tmp / OPTIMIZER_FILE)
    with open(tmp / STATE_FILE, "w") as fh:
        json.dump(state, fh)
        fh.flush()
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


def load_optimizer_state(run_dir: Path, server_round: int) -> dict[str, np.ndarray] | None:
    """The server optimizer's state saved with a round; None when the run had none."""
    path = round_dir(run_dir, server_round) / OPTIMIZER_FILE
    return load_file(str(path)) if path.is_file() else None


# --- what state.json holds ---------------------------------------------------------------------------------
def hashed_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the config that determines the run's results (everything but ``[output]`` and
    ``eval.overlap``)."""
    hashed = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_HASHED}
    for section, key in _NOT_HASHED_KEYS:
        hashed[section] = {k: v for k, v in hashed[section].items() if k != key}
    return hashed


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(hashed_config(cfg), sort_keys=True).encode()).hexdigest()


def rng_state() -> dict[str, Any]:
    """The server process's RNG states (python, numpy global, torch CPU) as JSON-able values."""
    import torch

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return {
        "python": [version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    import torch

    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))


def round_state(server_round: int, cfg: RunConfig, history: dict[str, Any]) -> dict[str, Any]:
    """``state.json`` content for a finished round."""
    return {
        "version": STATE_VERSION, "round": server_round, "config_hash": config_hash(cfg),
        "config": hashed_config(cfg), "history": history, "rng": rng_state(),
    }


# --- resuming ------------------------------------------------------------------------------------------------
class ResumePoint:
    """The last complete round of a run directory, checked against the config it is resumed with.

    Parameters
    ----------
    server_round : int
        The last complete round; the resumed run continues with ``server_round + 1``.
    arrays : dict of str to ndarray
        The global state after that round.
    state : dict
        The round's ``state.json``.
    optimizer_state : dict of str to ndarray or None, default None
        The server optimizer's state after that round (None: the run has no server optimizer state).
    """

    def __init__(self, server_round: int, arrays: dict[str, np.ndarray], state: dict[str, Any],
                 optimizer_state: dict[str, np.ndarray] | None = None):
        self.server_round = server_round
        self.arrays = arrays
        self.state = state
        self.optimizer_state = optimizer_state

    def restore_optimizer(self, optimizer: ServerOptimizer | None) -> None:
        """Give the run's server optimizer (None: it has none) the state saved with this round."""
        if optimizer is None:
            return
        if self.optimizer_state is None:
            raise ResumeError(f"cannot resume: checkpoint round {self.server_round} has no {OPTIMIZER_FILE} for "
                              f"federation.server_optimizer = {optimizer.name!r}")
        optimizer.load_state(self.optimizer_state)

    @property
    def history(self) -> dict[str, Any]:
        return self.state["history"]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def config_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``"key: this run has X, the checkpoint has Y"`` for every config field that differs."""
    mine, theirs = _flatten(hashed_config(cfg)), _flatten(saved)
    return [f"'{key}': this run has {json.dumps(mine.get(key))}, the checkpoint has {json.dumps(theirs.get(key))}"
            for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]


def find_resume_point(run_dir: Path, cfg: RunConfig) -> ResumePoint:
    """The last complete round of ``run_dir``, after checking that ``cfg`` is the config it was run with.

    Reads only; raises ``ResumeError`` (naming the first differing config field) before anything is written.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ResumeError(f"cannot resume: run directory '{run_dir}' does not exist")
    last = latest_round(run_dir)
    if last is None:
        raise ResumeError(f"cannot resume '{run_dir}': it has no complete round under checkpoints/ "
                          "(the run stopped before round 1 finished); start a fresh run instead")
    arrays, state = load_round(run_dir, last)
    if state.get("version") != STATE_VERSION or "config_hash" not in state:
        raise ResumeError(f"cannot resume '{run_dir}': checkpoint round {last} has no resume state "
                          f"(state.json version {state.get('version')!r}, expected {STATE_VERSION})")
    if state["config_hash"] != config_hash(cfg):
        diffs = config_differences(state["config"], cfg)
        detail = diffs[0] if diffs else "the config hash differs"
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        raise ResumeError(f"cannot resume '{run_dir}': the config differs from the checkpoint's at {detail}{more}. "
                          "Resume with the run's own config (omit --config to use its config.toml).")
    return ResumePoint(last, arrays, state, load_optimizer_state(run_dir, last))


def saved_config(run_dir: Path) -> Path:
    """The config file a run directory was started with (``config.toml``), for ``--resume`` without ``--config``."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise ResumeError(f"cannot resume '{run_dir}': it has no config.toml (is it a Pollinate run directory?)")
    return path
