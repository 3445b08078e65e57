"""The strategy of every method whose global state is a fixed set of named fp32 tensors, sent and returned in full
(fedavg-lora, fedavg-full, SFPrompt's prompts and tail). With ``privacy.secure_aggregation`` (fedavg-lora and
fedavg-full) the replies are masked updates and ``server.secagg`` runs the protocol around the round."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pollinate.common.checks import check_arrays
from pollinate.common.config import RunConfig
from pollinate.common.report import RunRecorder
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server.deployment import Deployment
from pollinate.server.privacy import ServerPrivacy
from pollinate.server.replies import Reply, reply_arrays
from pollinate.server.secagg import SecureAggregation
from pollinate.server.strategy import PollinateStrategy


class StateFedAvg(PollinateStrategy):
    """A method whose global state is a fixed set of named fp32 tensors that every client receives and returns in
    full: replies are checked against ``self.shapes``; an update is the change of the global state; the new
    global is the example-weighted mean (``fedavg``) or the global plus the robust aggregate of the changes,
    then moved by ``federation.server_optimizer`` when it is not ``fedavg``. With ``privacy.dp`` the changes are
    clipped and noised (``server.privacy``) before the server optimizer. With secure aggregation the server
    only gets the mean change (``server.secagg``; equal weights, DP clipping moves to the clients)."""

    shapes: dict[str, tuple[int, ...]]

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, run_dir: Path, deployment: Deployment | None = None):
        super().__init__(cfg, recorder, run_dir, deployment)
        self.privacy = ServerPrivacy.for_run(cfg, self.min_train_nodes)  # None without DP
        self.secure = SecureAggregation.for_run(cfg, recorder, self._name, self.min_train_nodes, self.min_replies,
                                                self.privacy)  # None without secure aggregation

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.privacy is not None:  # local DP: the clients read the clip norm and noise from the round config
            config = ConfigRecord({**dict(config), **self.privacy.train_config_entries()})
        if self.secure is not None:  # central DP: the clients clip
            config = ConfigRecord({**dict(config), **self.secure.train_config_entries()})
        return super().configure_train(server_round, arrays, config, grid)

    def before_train(self, grid: Grid, server_round: int, messages: list[Message]) -> list[Message]:
        """Secure aggregation: setup and share keys first; the train messages then carry the collect stage."""
        return messages if self.secure is None else self.secure.open_round(grid, server_round, messages)

    def decode_reply(self, server_round: int, client_id: int, content: RecordDict) -> dict[str, np.ndarray]:
        if self.secure is not None:
            return self.secure.decode(content, self.shapes)
        state = reply_arrays(content, self.shapes)  # names and declared shapes checked before loading
        check_arrays(state, self.shapes)
        return state

    def update_norm(self, client_id: int, update: dict[str, np.ndarray]) -> float | None:
        if self.secure is not None:
            return None  # a masked update says nothing about its norm
        base = record_to_arrays(self.global_arrays)
        squares = sum(float(np.square(value.astype(np.float64) - base[key]).sum()) for key, value in update.items())
        return float(np.sqrt(squares))

    def aggregate(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        # Every aggregator is translation-equivariant (robust.py): combining states = global + combined changes.
        states = [reply.update for reply in replies]
        weights = [float(reply.num_examples) for reply in replies]
        if self.secure is not None:
            combined = self.secure.aggregate(server_round, replies, record_to_arrays(self.global_arrays))
        elif self.privacy is None:
            combined = self.combine(states, weights)
        else:
            combined = self.privacy.aggregate(server_round, states, weights, record_to_arrays(self.global_arrays),
                                              self.combine, [reply.content["metrics"] for reply in replies])
        if self.server_optimizer is None:
            return arrays_to_record(combined)
        return arrays_to_record(self.server_optimizer.step(record_to_arrays(self.global_arrays), combined,
                                                           server_round))

    def round_fields(self) -> dict[str, Any]:
        """``privacy`` (ε, δ, σ, clip norm, clipped fraction) of a run with DP; the secure aggregation's bytes and
        stages (``server.secagg``) of a run with it; nothing otherwise."""
        fields = {} if self.privacy is None else {"privacy": self.privacy.take_round_record()}
        return fields if self.secure is None else {**fields, **self.secure.take_round_fields()}
