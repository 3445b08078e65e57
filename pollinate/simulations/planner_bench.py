"""Wall time of FedPipe's planner for many clients on SmolLM2-135M's shapes.

``python -m pollinate.simulations.planner_bench [--clients 1000] [--scenario tiers mixed] [--repeats 3]`` prints
one JSON line per scenario: the best-of-``repeats`` seconds of ``plan_clients`` (``"mixed"``: every profile
distinct, so no caching helps).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from pollinate.common.models import SMOLLM2_SHAPE
from pollinate.common.profiles import assign_profiles
from pollinate.methods.fedpipe.planner import PlanOptions, plan_clients
from pollinate.methods.fedpipe.planner.spec import model_spec_from_config


def benchmark_planner(num_clients: int = 1000, scenario: str = "mixed", seed: int = 0, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall seconds of ``plan_clients`` for SmolLM2-135M with ``num_clients`` clients
    drawn from ``scenario``, against random (gamma-distributed, seeded) importance scores."""
    spec = model_spec_from_config({"model_type": "llama", **SMOLLM2_SHAPE})
    rng = np.random.default_rng(seed)
    importance = dict(zip(spec.module_names(), rng.gamma(0.5, size=len(spec.modules)).tolist(), strict=True))
    profiles = assign_profiles(scenario, num_clients, seed)
    options = PlanOptions()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        plan_clients(profiles, importance, spec, options)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--scenario", nargs="+", default=["tiers", "mixed"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for scenario in args.scenario:
        seconds = benchmark_planner(args.clients, scenario, args.seed, args.repeats)
        print(json.dumps({"clients": args.clients, "scenario": scenario, "model": "smollm2-135m",
                          "plan_seconds": round(seconds, 4)}))


if __name__ == "__main__":
    main()
