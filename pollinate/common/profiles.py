"""Edge resource profiles: memory, compute and bandwidth of a client, declared in TOML or measured.

Units (fixed across Pollinate):

- ``memory_gib``: memory the client may use for the model and its training state, in GiB (2**30 bytes),
  on top of the Python/torch runtime itself.
- ``compute_tflops``: sustained dense fp32 matmul throughput in TFLOP/s (10**12 FLOP/s), as
  :func:`measure_compute` measures it. The planner turns it into training speed with its own
  ``utilization`` factor, so declared and measured profiles mean the same thing.
- ``uplink_mbps`` / ``downlink_mbps``: link bandwidth in Mbit/s (10**6 bit/s).

The built-in scenarios are calibrated on a 2-core CPU with SmolLM2-135M as the reference model; the figures
they rest on are in docs/environment.md ("Calibration figures").
"""

from __future__ import annotations

import math
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

GIB = 2**30

__all__ = [
    "GIB",
    "SCENARIOS",
    "TIER_PROFILES",
    "ResourceProfile",
    "assign_profiles",
    "comm_seconds",
    "load_profile",
    "measure_compute",
]


@dataclass(frozen=True)
class ResourceProfile:
    """What one edge client can spend on a round.

    Parameters
    ----------
    memory_gib : float
        Memory for the model and its training state, GiB (runtime excluded). Must be > 0.
    compute_tflops : float
        Sustained fp32 matmul throughput, TFLOP/s (see :func:`measure_compute`). Must be > 0.
    uplink_mbps : float
        Client-to-server bandwidth, Mbit/s. Must be > 0.
    downlink_mbps : float
        Server-to-client bandwidth, Mbit/s. Must be > 0.
    name : str, default ""
        A label for reports (e.g. the tier name).
    """

    memory_gib: float
    compute_tflops: float
    uplink_mbps: float
    downlink_mbps: float
    name: str = ""

    def __post_init__(self) -> None:
        for field_name in ("memory_gib", "compute_tflops", "uplink_mbps", "downlink_mbps"):
            value = getattr(self, field_name)
            # bool is an int subclass; True as "1 GiB" is a config mistake, not a number.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"profile field {field_name!r} must be a number, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"profile field {field_name!r} must be > 0, got {value!r}")
        if not isinstance(self.name, str):
            raise TypeError(f"profile field 'name' must be a string, got {self.name!r}")

    @property
    def memory_bytes(self) -> float:
        """Memory budget in bytes."""
        return self.memory_gib * GIB

    def to_dict(self) -> dict[str, float | str]:
        """Plain dict (JSON/TOML/ConfigRecord friendly)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_REQUIRED = ("memory_gib", "compute_tflops", "uplink_mbps", "downlink_mbps")
_ALLOWED = (*_REQUIRED, "name")


def load_profile(path: str | Path) -> ResourceProfile:
    """Read a profile from TOML.

    Keys sit at the top level or in a ``[profile]`` table. ``compute_tflops = "measure"`` runs
    :func:`measure_compute` instead of declaring a number. ``name`` defaults to the file's stem.

    Raises
    ------
    ValueError
        On a missing, unknown, or non-positive field (the message names the field and the file).
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"profile file {str(path)!r} is not valid TOML: {exc}") from exc
    if isinstance(data.get("profile"), dict):
        data = data["profile"]
    unknown = sorted(set(data) - set(_ALLOWED))
    if unknown:
        raise ValueError(
            f"profile file {str(path)!r} has unknown key(s) {unknown}; allowed keys: {list(_ALLOWED)}"
        )
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise ValueError(f"profile file {str(path)!r} is missing field(s) {missing}")
    values = dict(data)
    if values["compute_tflops"] == "measure":
        values["compute_tflops"] = measure_compute()
    values.setdefault("name", path.stem)
    try:
        return ResourceProfile(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"profile file {str(path)!r}: {exc}") from exc


def measure_compute(duration_s: float = 0.3, size: int = 512) -> float:
    """Measure this machine's sustained fp32 matmul throughput in TFLOP/s.

    Runs ``size x size`` matmuls with torch's default thread count for about ``duration_s`` seconds
    (plus a short warm-up), so the whole call stays well under a second.
    """
    import torch  # lazily: the coordinator plans from declared profiles without importing torch

    if duration_s <= 0 or size <= 0:
        raise ValueError(f"duration_s and size must be > 0, got {duration_s!r} and {size!r}")
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    with torch.inference_mode():
        for _ in range(2):  # warm-up: first calls pay for thread-pool start and page faults
            torch.mm(a, b)
        count = 0
        start = time.perf_counter()
        while (elapsed := time.perf_counter() - start) < duration_s:
            torch.mm(a, b)
            count += 1
    return 2.0 * size**3 * count / elapsed / 1e12


def comm_seconds(bytes_up: float, bytes_down: float, profile: ResourceProfile) -> float:
    """Seconds to send ``bytes_up`` to the server and receive ``bytes_down`` from it."""
    if bytes_up < 0 or bytes_down < 0:
        raise ValueError(f"byte counts must be >= 0, got up={bytes_up!r} down={bytes_down!r}")
    return 8.0 * bytes_up / (profile.uplink_mbps * 1e6) + 8.0 * bytes_down / (profile.downlink_mbps * 1e6)


# Three edge tiers around the reference CPU (docs/environment.md, "Calibration figures"): medium is that CPU
# with 2 GiB (an fp32 base fits); weak has a quarter of its compute and too little memory for an fp32 base with
# LoRA, so only an int8/NF4 base fits, and its uplink makes the deadline cut the ranks; strong is a faster box
# with 4 GiB and a fast link.
TIER_PROFILES: dict[str, ResourceProfile] = {
    "strong": ResourceProfile(memory_gib=4.0, compute_tflops=0.5, uplink_mbps=50.0, downlink_mbps=200.0,
                              name="strong"),
    "medium": ResourceProfile(memory_gib=2.0, compute_tflops=0.12, uplink_mbps=10.0, downlink_mbps=50.0,
                              name="medium"),
    "weak": ResourceProfile(memory_gib=0.75, compute_tflops=0.03, uplink_mbps=2.0, downlink_mbps=10.0,
                            name="weak"),
}
_UNIFORM = ResourceProfile(memory_gib=8.0, compute_tflops=0.5, uplink_mbps=100.0, downlink_mbps=100.0,
                           name="uniform")


def _uniform(num_clients: int, rng: np.random.Generator) -> list[ResourceProfile]:
    return [_UNIFORM] * num_clients


def _tiers(num_clients: int, rng: np.random.Generator) -> list[ResourceProfile]:
    # Round-robin over a seeded permutation: tier sizes differ by at most one and all three are
    # present once there are three clients, whatever the seed.
    order = ("strong", "medium", "weak")
    slots = rng.permutation(num_clients)
    tiers = [""] * num_clients
    for position, client in enumerate(slots):
        tiers[client] = order[position % len(order)]
    return [TIER_PROFILES[t] for t in tiers]


def _mixed(num_clients: int, rng: np.random.Generator) -> list[ResourceProfile]:
    # Every resource drawn independently, log-uniform between the weak and strong tiers: a continuum
    # of devices where no two clients share a profile.
    lo, hi = TIER_PROFILES["weak"], TIER_PROFILES["strong"]
    keys = ("memory_gib", "compute_tflops", "uplink_mbps", "downlink_mbps")
    low = np.log([getattr(lo, k) for k in keys])
    high = np.log([getattr(hi, k) for k in keys])
    draws = np.exp(rng.uniform(low, high, size=(num_clients, len(keys))))
    return [
        ResourceProfile(**{k: float(v) for k, v in zip(keys, row, strict=True)}, name=f"mixed-{i}")
        for i, row in enumerate(draws)
    ]


SCENARIOS: dict[str, Callable[[int, np.random.Generator], list[ResourceProfile]]] = {
    "uniform": _uniform,
    "tiers": _tiers,
    "mixed": _mixed,
}


def assign_profiles(scenario: str, num_clients: int, seed: int = 0) -> list[ResourceProfile]:
    """Profiles for ``num_clients`` simulated clients under a named scenario.

    ``"uniform"``: every client equal and generous. ``"tiers"``: strong / medium / weak edge devices
    (see :data:`TIER_PROFILES`), as equal in number as possible, shuffled by ``seed``. ``"mixed"``:
    each resource drawn log-uniformly between the weak and strong tiers. Deterministic in ``seed``.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown profile scenario {scenario!r}; expected one of {sorted(SCENARIOS)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return SCENARIOS[scenario](num_clients, np.random.default_rng(seed))
