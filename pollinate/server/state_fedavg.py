"""The strategy of every method whose global state is a fixed set of named fp32 tensors, sent and returned in full
(fedavg-lora, fedavg-full, SFPrompt's prompts and tail)."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from pollinate.common.checks import check_arrays
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server.replies import Reply, reply_arrays
from pollinate.server.strategy import PollinateStrategy


class StateFedAvg(PollinateStrategy):
    """A method whose global state is a fixed set of named fp32 tensors that every client receives and returns in
    full: replies are checked against ``self.shapes``; an update is the change of the global state; the new
    global is the example-weighted mean (``fedavg``) or the global plus the robust aggregate of the changes,
    then moved by ``federation.server_optimizer`` when it is not ``fedavg``."""

    shapes: dict[str, tuple[int, ...]]

    def decode_reply(self, server_round: int, client_id: int, content: RecordDict) -> dict[str, np.ndarray]:
        state = reply_arrays(content, self.shapes)  # names and declared shapes checked before loading
        check_arrays(state, self.shapes)
        return state

    def update_norm(self, client_id: int, update: dict[str, np.ndarray]) -> float:
        base = record_to_arrays(self.global_arrays)
        squares = sum(float(np.square(value.astype(np.float64) - base[key]).sum()) for key, value in update.items())
        return float(np.sqrt(squares))

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        # Every aggregator is translation-equivariant (robust.py): combining states = global + combined changes.
        states = [reply.update for reply in replies]
        combined = self.combine(states, [float(reply.num_examples) for reply in replies])
        if self.server_optimizer is None:
            return arrays_to_record(combined)
        return arrays_to_record(self.server_optimizer.step(record_to_arrays(self.global_arrays), combined,
                                                           server_round))
