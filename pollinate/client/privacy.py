"""Local differential privacy on the client (``privacy.dp = "local"``, docs/privacy.md): before a reply leaves,
its update (the returned state minus the global state the client received) is clipped to the round's clip norm
and Gaussian noise of standard deviation noise multiplier × clip norm is added, so the server only ever sees the
noised state. The server asks for it through the round's train config (``common.privacy.local_dp_entries``)."""

from __future__ import annotations

import numpy as np
from flwr.app import Message, RecordDict

from pollinate.common.privacy import DP_CLIPPED_METRIC, add_noise, clip_update, read_local_dp
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import arrays_to_record, record_to_arrays


def privatize_reply(msg: Message, content: RecordDict, run_seed: int) -> RecordDict:
    """``content`` (a training reply to ``msg``) with its ``arrays`` clipped and noised as the round's train
    config asks; unchanged when it asks for no local DP. The noise is seeded per (run seed, round, client)."""
    config = msg.content["config"]
    asked = read_local_dp(config)
    if asked is None:
        return content
    clip_norm, noise_multiplier = asked
    base = record_to_arrays(msg.content["arrays"])
    state = record_to_arrays(content["arrays"])
    if set(state) != set(base):
        raise ValueError(f"local DP: the reply's tensors {sorted(set(state) ^ set(base))} differ from the global "
                         "state's; local DP needs the update as a change of the state received")
    clipped, was_clipped = clip_update(state, base, clip_norm)
    metrics = content["metrics"]
    seed = derive_seed(run_seed, "client-dp-noise", int(config["server-round"]), int(metrics["client_id"]))
    noised = add_noise(clipped, noise_multiplier * clip_norm, np.random.default_rng(seed))
    content["arrays"] = arrays_to_record(noised)
    metrics[DP_CLIPPED_METRIC] = int(was_clipped)
    return content
