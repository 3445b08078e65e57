"""The update fuzzer: ``cases`` replies over the ``codec``, ``fedpipe-round`` and ``dense-round`` targets."""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pollinate.simulations.fuzz.bundles import CodecTarget
from pollinate.simulations.fuzz.mutations import Mutator
from pollinate.simulations.fuzz.rounds import DenseRound, FedPipeRound, flower_task_identity
from pollinate.simulations.fuzz.tally import Tally


@contextlib.contextmanager
def seeded_python_random(seed: int) -> Iterator[None]:
    """Python's random seeded (Flower's node sampling draws from it, so cases repeat exactly), then restored."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


def fuzz_updates(cases: int, seed: int, timeout_s: float, run_dir: Path) -> list[Tally]:
    """``cases`` update replies over the three update targets (see the module docstring)."""
    tallies = []
    with flower_task_identity(), seeded_python_random(seed):
        fedpipe = FedPipeRound(run_dir / "fedpipe")
        fp = fedpipe.strategy.cfg.fedpipe
        targets = (("codec", CodecTarget(fedpipe.shapes, fp.max_update_bytes, fp.norm_bound)),
                   ("fedpipe-round", fedpipe), ("dense-round", DenseRound(run_dir / "dense")))
        for number, (name, target) in enumerate(targets):
            tally = Tally(name)
            for index in range(cases // 3 + (number < cases % 3)):
                mutator = Mutator(np.random.default_rng([seed, number, index]), max_bytes=1 << 20)
                tally.run(timeout_s, lambda t=target, m=mutator: t.case(m),
                          lambda t=target, m=mutator, i=index, n=number: {"seed": [seed, n, i], "edits": m.log[:16],
                                                                          **t.repro()})
            tally.notes = getattr(target, "notes", Counter())
            tallies.append(tally)
    return tallies
