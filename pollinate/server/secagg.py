"""Secure aggregation on the server (SecAgg+, Bell et al. 2020, "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead"; docs/privacy.md): the server learns the sum of the clients' updates, not one of them.

A Message-API port of Flower's ``SecAggPlusWorkflow`` (which drives a legacy strategy) onto the strategy's hooks,
with Flower's cryptographic building blocks (key agreement, share encryption, Shamir, quantization), its client
stage functions (``client.secagg``) and a ChaCha20 mask generator (``common.secagg``). Per round:

1. **setup** (from ``configure_train``): the sampled nodes receive the protocol's parameters and answer with two
   public keys each;
2. **share keys**: each node receives its neighbours' keys (SecAgg+'s random ring of ``secagg_num_shares``) and
   answers with Shamir shares of its mask seed and private key, encrypted for each neighbour;
3. **collect masked vectors**: the round's train messages carry each node's encrypted shares; the client trains and
   answers with its update (state minus the global it received), clipped to ±clipping range, quantized and masked;
4. **unmask** (from ``aggregate_train``): the nodes whose vectors arrived send the shares of the survivors' mask
   seeds and of the dropped nodes' private keys; the server removes the masks from the sum of the vectors and
   dequantizes it into the equal-weight mean update (every client's weight is 1, agreed in the clear).

Stages 1, 2 and 4 are ``grid.send_and_receive`` exchanges bounded by ``federation.round_timeout_s``. A node that
fails a stage, does not answer, or whose reply fails its checks (``server.secagg_replies``) is dropped from the
protocol with a one-line reason; a node left with fewer than ``secagg_reconstruction_threshold`` live neighbours
is dropped before it trains (its secrets could not be rebuilt). When too few remain, or the unmask stage cannot
rebuild a secret, the round keeps the previous global and its record says why (``secagg.failed``).
"""

from __future__ import annotations

import secrets
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.serverapp import Grid
from rich.text import Text

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.privacy import DP_CLIPPED_METRIC, local_dp_entries
from pollinate.common.report import RunRecorder, peer_text
from pollinate.common.secagg import MAX_WEIGHT, MOD_RANGE, ROUND_KEY, SECAGG_RECORD, masked_layout
from pollinate.common.wire import wire_bytes
from pollinate.server.privacy import ServerPrivacy
from pollinate.server.replies import Reply
from pollinate.server.secagg_replies import (
    SEED_BYTES,
    StageReplyError,
    encrypted_shares,
    masked_update,
    private_key_share_length,
    public_keys,
    secret_shares,
    share_length,
    stage_record,
)
from pollinate.server.secagg_unmask import (
    SecureAggregationFailed,
    checked_private_key,
    dequantized_mean,
    masked_sum,
    rebuild_secret,
    remove_masks,
)

Arrays = dict[str, np.ndarray]
Dropped = dict[int, tuple[bytes, list[tuple[int, bytes]]]]  # node -> (its private key, its survivors' (node, pk1))


@dataclass
class SecAggRound:
    """One round's protocol state: the ring, what each node sent, who is still in, and what it cost."""

    server_round: int
    shares: int
    threshold: int
    clipping_range: float
    neighbours: dict[int, set[int]]
    keys: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)  # node -> (pk1, pk2)
    order: dict[int, list[int]] = field(default_factory=dict)  # node -> neighbours it got keys of (Shamir order)
    ciphertexts: dict[int, dict[int, bytes]] = field(default_factory=dict)  # source -> destination -> shares
    shared: set[int] = field(default_factory=set)  # the nodes that train this round
    counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0
    bytes_down: int = 0
    dropped: list[dict[str, Any]] = field(default_factory=list)
    failed: str | None = None


def ring_neighbours(nodes: list[int], shares: int) -> dict[int, set[int]]:
    """SecAgg+'s graph, as Flower's workflow builds it: the nodes in a random ring, each with the ``shares // 2``
    nodes on either side and itself. The ring is drawn from the OS's randomness: clients know the run seed."""
    ring = list(nodes)
    secrets.SystemRandom().shuffle(ring)
    half = shares // 2
    return {node: {ring[(i + offset) % len(ring)] for offset in range(-half, half + 1)} for i, node in enumerate(ring)}


def effective_shares(num_shares: int, sampled: int) -> int:
    """Shares per secret in a round of ``sampled`` nodes (Flower's rules: at most everyone, odd below that)."""
    shares = min(num_shares, sampled)
    return shares + 1 if shares < sampled and shares % 2 == 0 else shares


class SecureAggregation:
    """The run's SecAgg+ driver; see the module docstring.

    Parameters
    ----------
    cfg : RunConfig
        The run's config (``[privacy]`` secagg fields; ``[federation]`` timeout and bounds).
    recorder : RunRecorder
        Where drops and failures are recorded.
    name_of : callable
        Node id -> how the report names it (client id once bound).
    sampled : int
        Clients sampled per round.
    min_replies : int
        Replies a round needs (``federation.min_clients``, at least 1).
    privacy : ServerPrivacy or None
        The run's DP; central DP moves the clipping to the clients and sets the clipping range.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, name_of: Callable[[int], int | str], sampled: int,
                 min_replies: int, privacy: ServerPrivacy | None):
        check_combination(cfg, sampled)
        self.recorder, self.name_of, self.privacy = recorder, name_of, privacy
        self.num_shares = cfg.privacy.secagg_num_shares
        self.threshold = cfg.privacy.secagg_reconstruction_threshold
        self.quantization_range = cfg.privacy.secagg_quantization_range
        self.configured_range = cfg.privacy.secagg_clipping_range
        self.timeout = cfg.federation.round_timeout_s
        self.min_replies = max(1, min_replies)
        self.round: SecAggRound | None = None
        self.grid: Grid | None = None

    @classmethod
    def for_run(cls, cfg: RunConfig, recorder: RunRecorder, name_of: Callable[[int], int | str], sampled: int,
                min_replies: int, privacy: ServerPrivacy | None) -> SecureAggregation | None:
        """The driver when ``privacy.secure_aggregation`` is on; None otherwise."""
        if not cfg.privacy.secure_aggregation:
            return None
        return cls(cfg, recorder, name_of, sampled, min_replies, privacy)

    @property
    def central_dp(self) -> bool:
        return self.privacy is not None and self.privacy.mode == "central"

    def clipping_range(self) -> float:
        """Each coordinate of an update is clipped to ± this: central DP's clip norm (an update of L2 norm C has
        no coordinate beyond C), else ``privacy.secagg_clipping_range``."""
        return float(self.privacy.clip_norm) if self.central_dp else float(self.configured_range)

    def train_config_entries(self) -> dict[str, float]:
        """Central DP: the server cannot clip what it cannot see, so every client clips its own update to the
        clip norm and adds no noise (Flower's fixedclipping_mod pattern); the server noises the mean."""
        return local_dp_entries(self.privacy.clip_norm, 0.0) if self.central_dp else {}

    # --- stages 1-3: before the round trains ----------------------------------------------------------
    def open_round(self, grid: Grid, server_round: int, messages: list[Message]) -> list[Message]:
        """Run setup and share keys with the nodes ``messages`` go to; the train messages of the nodes that
        completed them, each carrying its collect-stage record (none when the protocol cannot go on)."""
        nodes = [message.metadata.dst_node_id for message in messages]
        shares = effective_shares(self.num_shares, len(nodes))
        self.grid = grid
        self.round = SecAggRound(server_round, shares, self.threshold, self.clipping_range(),
                                 ring_neighbours(nodes, shares), counts={"sampled": len(nodes)})
        try:
            if len(nodes) * self.quantization_range >= MOD_RANGE or len(nodes) < max(2, self.threshold):
                raise SecureAggregationFailed(f"{len(nodes)} clients this round: SecAgg+ needs at least "
                                              f"{max(2, self.threshold)} and at most "
                                              f"{(MOD_RANGE - 1) // self.quantization_range}")
            self._share_keys(self._setup(nodes))
        except SecureAggregationFailed as exc:
            self._fail(str(exc))
            return []
        kept = [message for message in messages if message.metadata.dst_node_id in self.round.shared]
        for message in kept:
            message.content[SECAGG_RECORD] = self._collect_record(message.metadata.dst_node_id)
        return kept

    def _setup(self, nodes: list[int]) -> set[int]:
        r = self.round
        config = {Key.STAGE: Stage.SETUP, ROUND_KEY: r.server_round, Key.SAMPLE_NUMBER: len(nodes),
                  Key.SHARE_NUMBER: r.shares, Key.THRESHOLD: r.threshold, Key.CLIPPING_RANGE: r.clipping_range,
                  Key.TARGET_RANGE: self.quantization_range, Key.MOD_RANGE: MOD_RANGE, Key.MAX_WEIGHT: MAX_WEIGHT}
        for node, record in self._exchange(Stage.SETUP, {node: ConfigRecord(dict(config)) for node in nodes}).items():
            try:
                r.keys[node] = public_keys(record)
            except StageReplyError as exc:
                self._drop(node, Stage.SETUP, str(exc))
        seen = Counter(key for pair in r.keys.values() for key in pair)
        for node in sorted(r.keys):
            if any(seen[key] > 1 for key in r.keys[node]):  # a copied key: who copied whom is unknown
                self._drop(node, Stage.SETUP, "sent a public key that another node also sent")
                del r.keys[node]
        return self._survivors(set(r.keys), Stage.SETUP)

    def _share_keys(self, active: set[int]) -> None:
        r = self.round
        contents = {}
        for node in sorted(active):
            r.order[node] = sorted(r.neighbours[node] & active)  # the client shares in node-id order too
            contents[node] = ConfigRecord({Key.STAGE: Stage.SHARE_KEYS, ROUND_KEY: r.server_round,
                                           **{str(peer): list(r.keys[peer]) for peer in r.order[node]}})
        for node, record in self._exchange(Stage.SHARE_KEYS, contents).items():
            try:
                r.ciphertexts[node] = encrypted_shares(record, set(r.order[node]) - {node})
            except StageReplyError as exc:
                self._drop(node, Stage.SHARE_KEYS, str(exc))
        r.shared = self._survivors(set(r.ciphertexts), Stage.SHARE_KEYS)

    def _collect_record(self, node: int) -> ConfigRecord:
        r = self.round
        sources = [peer for peer in r.order[node] if peer != node and peer in r.shared]
        return ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, ROUND_KEY: r.server_round,
                             Key.CIPHERTEXT_LIST: [r.ciphertexts[peer][node] for peer in sources],
                             Key.SOURCE_LIST: sources})

    def _survivors(self, active: set[int], stage: str) -> set[int]:
        """``active`` without, repeatedly, every node with fewer than threshold live neighbours (itself
        included): nobody could rebuild its secrets. Fails the round when fewer than it needs remain."""
        r = self.round
        r.counts[stage] = len(active)
        while short := {node for node in active if len(r.neighbours[node] & active) < r.threshold}:
            for node in sorted(short):
                self._drop(node, stage, f"fewer than privacy.secagg_reconstruction_threshold = {r.threshold} of its "
                                        f"neighbours completed {stage}")
            active = active - short
        if len(active) < self.min_replies or not active:
            raise SecureAggregationFailed(f"only {len(active)} clients completed the {stage} stage with enough "
                                          f"neighbours; the round needs {self.min_replies}")
        return active

    # --- stage 4: after the round trained -------------------------------------------------------------
    def decode(self, content: RecordDict, shapes: dict[str, tuple[int, ...]]) -> Arrays:
        """A training reply's masked vector, checked (``server.secagg_replies.masked_update``)."""
        return masked_update(content, shapes)

    def aggregate(self, server_round: int, replies: list[Reply], base: Arrays) -> Arrays:
        """The new global state from the accepted replies' masked vectors: the unmask stage, then the global plus
        the mean update (with central DP the noise is added to it; local DP's clipped flags are noted)."""
        started = time.perf_counter()
        try:
            seeds, dropped = self._unmask(replies)
            layout = masked_layout({name: value.shape for name, value in base.items()})
            total = remove_masks(masked_sum([reply.update for reply in replies], layout), layout, seeds, dropped)
            mean = dequantized_mean(total, layout, len(replies), self.round.clipping_range, self.quantization_range)
        except SecureAggregationFailed as exc:
            self._fail(str(exc))
            raise
        finally:
            self.round.seconds["unmask"] = round(time.perf_counter() - started, 3)
        state = {name: (base[name] + mean[name]).astype(base[name].dtype) for name in base}
        metrics = [reply.content["metrics"] for reply in replies]
        if self.privacy is None:
            return state
        if self.privacy.mode == "local":
            self.privacy.note_local(server_round, metrics)
            return state
        return self.privacy.noised_mean(server_round, state, [bool(m.get(DP_CLIPPED_METRIC, 0)) for m in metrics])

    def _unmask(self, replies: list[Reply]) -> tuple[dict[int, bytes], Dropped]:
        """Ask every node whose vector counts for its shares; the survivors' mask seeds and the dropped nodes'
        private keys (with their surviving neighbours' pk1), rebuilt."""
        r = self.round
        alive = {reply.node_id for reply in replies}
        dead = r.shared - alive
        r.counts["unmasked"] = len(alive)
        for owner in sorted(alive | dead):
            if len(r.neighbours[owner] & alive) < r.threshold:
                raise SecureAggregationFailed(f"node {owner}'s secrets need {r.threshold} shares but only "
                                              f"{len(r.neighbours[owner] & alive)} of its neighbours sent a vector")
        asked = {node: sorted(r.neighbours[node] & alive) + sorted(r.neighbours[node] & dead) for node in alive}
        contents = {node: ConfigRecord({Key.STAGE: Stage.UNMASK, ROUND_KEY: r.server_round,
                                        Key.ACTIVE_NODE_ID_LIST: sorted(r.neighbours[node] & alive),
                                        Key.DEAD_NODE_ID_LIST: sorted(r.neighbours[node] & dead)})
                    for node in sorted(alive)}
        lengths = {**dict.fromkeys(alive, share_length(SEED_BYTES)), **dict.fromkeys(dead, private_key_share_length())}
        collected: dict[int, list[bytes]] = defaultdict(list)
        for node, record in self._exchange(Stage.UNMASK, contents).items():
            index_of = {owner: r.order[owner].index(node) + 1 for owner in asked[node]}
            try:
                shares = secret_shares(record, asked[node], index_of, {o: lengths[o] for o in asked[node]})
            except StageReplyError as exc:
                self._drop(node, Stage.UNMASK, str(exc))
                continue
            for owner, share in shares.items():
                collected[owner].append(share)
        seeds = {owner: rebuild_secret(owner, collected[owner], r.threshold, "mask seed") for owner in sorted(alive)}
        dropped = {}
        for owner in sorted(dead):
            key = rebuild_secret(owner, collected[owner], r.threshold, "private key")
            dropped[owner] = (checked_private_key(owner, key, r.keys[owner][0]),
                              [(peer, r.keys[peer][0]) for peer in sorted(r.neighbours[owner] & alive)])
        return seeds, dropped

    # --- messages and records -------------------------------------------------------------------------
    def _exchange(self, stage: str, contents: dict[int, ConfigRecord]) -> dict[int, ConfigRecord]:
        """Send each node its stage record and wait (``federation.round_timeout_s``); each answering node's reply
        record. A node that fails, answers from elsewhere, sends no record or does not answer is dropped."""
        r = self.round
        started = time.perf_counter()
        messages = {node: Message(RecordDict({SECAGG_RECORD: record}), dst_node_id=node,
                                  message_type=MessageType.TRAIN) for node, record in contents.items()}
        r.bytes_down += sum(wire_bytes(message.content) for message in messages.values())
        replies = list(self.grid.send_and_receive(list(messages.values()), timeout=self.timeout))
        sent_to = {message.metadata.message_id: node for node, message in messages.items()}
        records: dict[int, ConfigRecord] = {}
        answered: set[int] = set()
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id)
            if node is None or node in answered:
                continue  # not an answer to this stage, or a second one: only the first counts
            answered.add(node)
            try:
                r.bytes_up += wire_bytes(reply.content) if reply.has_content() else 0
                records[node] = self._reply_record(node, reply)
            except StageReplyError as exc:
                self._drop(node, stage, str(exc))
        for node in sorted(set(contents) - answered):
            self._drop(node, stage, f"no reply within federation.round_timeout_s = {self.timeout:g} s")
        r.seconds[stage] = round(r.seconds.get(stage, 0.0) + time.perf_counter() - started, 3)
        return records

    @staticmethod
    def _reply_record(node: int, reply: Message) -> ConfigRecord:
        if reply.has_error():
            raise StageReplyError(f"client failed (node {node}): {reply.error.reason}")
        if reply.metadata.src_node_id != node:
            raise StageReplyError(f"a reply from node {reply.metadata.src_node_id} answers a message sent to node "
                                  f"{node}")
        return stage_record(reply.content)

    def _drop(self, node: int, stage: str, reason: str) -> None:
        """``node`` leaves the protocol this round; before it trained, that is its rejection."""
        r = self.round
        name = self.name_of(node)
        r.dropped.append({"client_id": name if isinstance(name, int) else peer_text(name), "stage": stage,
                          "reason": peer_text(reason)})
        if stage in (Stage.SETUP, Stage.SHARE_KEYS):
            self.recorder.reject(r.server_round, name, f"secure aggregation ({stage}): {reason}")
        else:
            self.recorder.event("secagg_dropped", round=r.server_round, client_id=r.dropped[-1]["client_id"],
                                stage=stage, reason=r.dropped[-1]["reason"])

    def _fail(self, reason: str) -> None:
        self.round.failed = reason
        self.recorder.event("secagg_failed", round=self.round.server_round, reason=reason)
        self.recorder.console.print(Text(f"round {self.round.server_round}: secure aggregation failed, the global "
                                         f"model is unchanged: {reason}", style="yellow"))

    def take_round_fields(self) -> dict[str, Any]:
        """The round record's ``bytes_secagg_up``/``bytes_secagg_down`` (the setup, share-keys and unmask
        exchanges; the collect stage is the train messages' bytes) and ``secagg`` (who completed each stage,
        stage seconds, drops, the quantization step, why the round failed); once per round."""
        r, self.round = self.round, None
        if r is None:
            return {}
        if r.failed is None and r.shared and "unmasked" not in r.counts:  # the strategy skipped aggregation
            r.failed = "fewer accepted replies than the round needs (federation.min_clients): nothing was unmasked"
        return {"bytes_secagg_up": r.bytes_up, "bytes_secagg_down": r.bytes_down, "secagg": {
            "clients": r.counts, "shares": r.shares, "threshold": r.threshold, "clipping_range": r.clipping_range,
            "quantization_step": 2 * r.clipping_range / self.quantization_range, "seconds": r.seconds,
            "dropped": r.dropped, "failed": r.failed}}


def check_combination(cfg: RunConfig, sampled: int) -> None:
    """Refuse, with one line naming the field, what cannot work when the server sees only the sum."""
    fed, privacy = cfg.federation, cfg.privacy
    if fed.aggregator != "fedavg":
        raise ConfigError(f"federation.aggregator = {fed.aggregator!r} cannot run with privacy.secure_aggregation = "
                          "true: the server sees only the sum of the updates; expected 'fedavg'")
    for name in ("update_norm_bound", "relative_norm_bound"):
        if value := getattr(fed, name):
            raise ConfigError(f"federation.{name} = {value:g} cannot be enforced with privacy.secure_aggregation = "
                              "true (the server never sees one client's update); set it to 0")
    if sampled < 2:
        raise ConfigError(f"privacy.secure_aggregation = true needs at least 2 clients per round (federation.clients "
                          f"x fraction_train gives {sampled})")
    if privacy.secagg_reconstruction_threshold > sampled:
        raise ConfigError(f"privacy.secagg_reconstruction_threshold = {privacy.secagg_reconstruction_threshold} "
                          f"exceeds the {sampled} clients per round")
    most = max(fed.clients, sampled)
    if privacy.secagg_quantization_range > (MOD_RANGE - 1) // most:
        raise ConfigError(f"privacy.secagg_quantization_range = {privacy.secagg_quantization_range} with up to {most} "
                          f"clients per round overflows the 2^32 modulus of the masked sum; expected at most "
                          f"{(MOD_RANGE - 1) // most}")
