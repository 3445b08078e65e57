"""The planner's options for a run: its search space and round shape from ``[fedpipe]``, ``[train]``, ``[model]``
and ``[federation]`` (the server plans with them; a client checks with them which bits its memory holds)."""

from __future__ import annotations

import math

from pollinate.common.config import RunConfig
from pollinate.methods.fedpipe.codec import WIRE_BYTES_PER_PARAM
from pollinate.methods.fedpipe.planner import PlanOptions


def plan_options(cfg: RunConfig) -> PlanOptions:
    """Ranks (0 = not adapted), bits, batch sizes, local steps, deadline, wire bytes and parameter budget."""
    fp = cfg.fedpipe
    return PlanOptions(
        ranks=tuple(sorted({0, *fp.ranks})), bits=tuple(fp.bits), batch_sizes=tuple(fp.batch_sizes),
        seq_len=cfg.model.max_seq_len, local_steps=cfg.train.local_steps,
        max_local_steps=fp.max_local_steps, deadline_s=cfg.federation.deadline_s,
        update_bytes_per_param=WIRE_BYTES_PER_PARAM.get(fp.uplink_encoding, 4.0),
        max_adapter_params=fp.param_budget or math.inf,
    )
