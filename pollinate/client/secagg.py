"""Secure aggregation on the client (SecAgg+, ``privacy.secure_aggregation``; docs/privacy.md): a Flower mod that
answers the server's four stage messages (``common.secagg``).

- setup, share keys and unmask are answered here with Flower's own stage functions (``_setup``, ``_share_keys``,
  ``_unmask`` of ``flwr.client.mod.secure_aggregation.secaggplus_mod``), without running the train handler; the
  protocol state lives in the node's ``Context.state`` (on a ``pollinate join`` node the mod runs in the node's
  worker, after ``forward_to_worker``, on the node state the worker hands back);
- collect masked vectors is the round's train message: the handler trains (and applies local DP or, with central
  DP, the clipping the round asks for), then this mod decrypts its neighbours' shares, turns the reply's state
  into the update (state minus the global received), clips each coordinate to ±clipping range and quantizes it
  with Flower's quantizer (stochastic rounding, seeded per round and client), and adds its private mask and the
  pairwise masks (``common.secagg.mask_stream``); the reply carries the masked vector instead of the state.

Unlike Flower's ``secaggplus_mod`` (which reads a legacy ``FitRes``), every client's weight is 1, the vector is an
update, not a state, and the masks come from a cryptographic generator. The client also refuses what an honest
server never sends: a stage of another round, repeated sources, unmask lists that overlap, name nodes it holds no
shares of, or count it as dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

# flwr is pinned to 1.42.x: the SecAgg+ mod's private stage functions are used as they are, and
# tests/client/test_secagg_client.py pins what this module relies on (their inputs, outputs and state).
from flwr.client.mod.secure_aggregation.secaggplus_mod import (
    SecAggPlusState,
    _setup,
    _share_keys,
    _unmask,
    check_configs,
    check_stage,
)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from pollinate.common.secagg import MASKED_RECORD, ROUND_KEY, SECAGG_RECORD, add_masks, mask_stream, masked_layout
from pollinate.common.seeds import derive_seed
from pollinate.common.wire import arrays_to_record, record_to_arrays

# Where the protocol state of the current round lives in the node's Context.state.
STATE_RECORD = "pollinate-secagg"


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: answer a SecAgg+ stage message; pass every other message on unchanged."""
    if msg.metadata.message_type != MessageType.TRAIN or SECAGG_RECORD not in msg.content.config_records:
        return call_next(msg, ctxt)
    configs = ConfigRecord(dict(msg.content.config_records[SECAGG_RECORD]))
    server_round = configs.pop(ROUND_KEY, None)
    if isinstance(server_round, bool) or not isinstance(server_round, int):
        raise ValueError(f"secure aggregation: stage message has '{ROUND_KEY}' = {server_round!r}, expected an int")
    state = _load_state(ctxt)
    check_stage(state.current_stage, configs)  # Flower's: the stages come in order, setup may restart
    stage = str(configs.pop(Key.STAGE))
    if stage != Stage.SETUP and server_round != getattr(state, "server_round", None):
        raise ValueError(f"secure aggregation: a {stage} message of round {server_round} follows the setup of round "
                         f"{getattr(state, 'server_round', None)}")
    check_configs(stage, configs)
    content = RecordDict()
    if stage == Stage.SETUP:
        state = SecAggPlusState()
        state.nid, state.server_round = msg.metadata.dst_node_id, server_round
        result = _setup(state, configs)
    elif stage == Stage.SHARE_KEYS:
        result = _share_keys(state, _by_node_id(configs))
    elif stage == Stage.COLLECT_MASKED_VECTORS:
        content = call_next(msg, ctxt).content  # the train handler (or the node's worker) trains
        result = _mask_reply(msg, content, state, configs)
    else:
        result = _unmask(state, _checked_unmask(state, configs))
    state.current_stage = stage
    ctxt.state.config_records[STATE_RECORD] = ConfigRecord(state.to_dict())  # after call_next, which may swap it
    content.config_records[SECAGG_RECORD] = ConfigRecord(result)
    return Message(content, reply_to=msg)


def _load_state(ctxt: Context) -> SecAggPlusState:
    record = ctxt.state.config_records.get(STATE_RECORD)
    return SecAggPlusState(**dict(record)) if record is not None else SecAggPlusState()


def _by_node_id(configs: ConfigRecord) -> ConfigRecord:
    """The neighbours' keys ordered by node id: a neighbour's Shamir index is then its position (plus one), which
    the server can check in the unmask stage."""
    try:
        return ConfigRecord(dict(sorted(configs.items(), key=lambda item: int(item[0]))))
    except ValueError:
        raise ValueError("secure aggregation: share-keys message names a node that is not an integer id") from None


def _checked_unmask(state: SecAggPlusState, configs: ConfigRecord) -> ConfigRecord:
    """The unmask request, if an honest server could have sent it: disjoint lists, this node among the active
    ones, and only nodes whose shares it holds (a share of both secrets of one node would unmask it)."""
    active, dead = list(configs[Key.ACTIVE_NODE_ID_LIST]), list(configs[Key.DEAD_NODE_ID_LIST])
    if len(set(active) | set(dead)) != len(active) + len(dead):
        raise ValueError("secure aggregation: unmask names a node twice or as both active and dropped")
    if state.nid not in active:
        raise ValueError("secure aggregation: unmask counts this node as dropped")
    unknown = (set(active) - set(state.rd_seed_share_dict)) | (set(dead) - set(state.sk1_share_dict))
    if unknown:
        raise ValueError(f"secure aggregation: unmask asks for shares of nodes {sorted(unknown)[:3]} it holds none of")
    return configs


def _mask_reply(msg: Message, content: RecordDict, state: SecAggPlusState, configs: ConfigRecord) -> dict[str, Any]:
    """Replace the training reply's state with its masked update (in place); the stage's reply entries (none)."""
    base = record_to_arrays(msg.content["arrays"])
    trained = record_to_arrays(content["arrays"])
    shapes = {name: value.shape for name, value in base.items()}
    if {name: value.shape for name, value in trained.items()} != shapes:
        raise ValueError("secure aggregation: the trained state's tensors differ from the global state's")
    layout = masked_layout(shapes)
    sources = _store_shares(state, configs)
    update = [trained[name].astype(np.float64) - base[name] for name, _ in layout[1:]]  # float64: exact rounding
    with _seeded_global_numpy(_rounding_seed(msg, content, state)):
        quantized = quantize(update, state.clipping_range, state.target_range)
    vector = [np.ones(1, np.uint32), *(values.astype(np.uint32) for values in quantized)]
    vector = add_masks(vector, mask_stream(state.rd_seed, [shape for _, shape in layout]), 1)
    private_key = bytes_to_private_key(state.sk1)
    for source in sources:  # the pairwise masks cancel in the sum: the larger node id adds, the smaller subtracts
        shared = generate_shared_key(private_key, bytes_to_public_key(state.public_keys_dict[source][0]))
        vector = add_masks(vector, mask_stream(shared, [shape for _, shape in layout]), 1 if state.nid > source else -1)
    del content.array_records["arrays"]  # the state must not leave in the clear
    content.array_records[MASKED_RECORD] = arrays_to_record(
        {name: values for (name, _), values in zip(layout, vector, strict=True)})
    return {}


def _store_shares(state: SecAggPlusState, configs: ConfigRecord) -> list[int]:
    """Decrypt the neighbours' shares (Flower's ``_collect_masked_vectors``, first half) and keep them for the
    unmask stage; the neighbours they came from, each once."""
    sources, ciphertexts = list(configs[Key.SOURCE_LIST]), list(configs[Key.CIPHERTEXT_LIST])
    if len(set(sources)) != len(sources) or len(sources) != len(ciphertexts):
        raise ValueError("secure aggregation: the collect stage's sources repeat or do not pair with ciphertexts")
    if len(sources) + 1 < state.threshold:
        raise ValueError(f"secure aggregation: {len(sources)} neighbours sent shares, fewer than the threshold "
                         f"{state.threshold} minus this node")
    for source, ciphertext in zip(sources, ciphertexts, strict=True):
        if source == state.nid or source not in state.ss2_dict:
            raise ValueError(f"secure aggregation: shares from node {source}, which is not a neighbour")
        sender, receiver, seed_share, key_share = share_keys_plaintext_separate(decrypt(state.ss2_dict[source],
                                                                                        ciphertext))
        if (sender, receiver) != (source, state.nid):
            raise ValueError(f"secure aggregation: shares from node {source} claim to be from {sender} to {receiver}")
        state.rd_seed_share_dict[source] = seed_share
        state.sk1_share_dict[source] = key_share
    return sources


def _rounding_seed(msg: Message, content: RecordDict, state: SecAggPlusState) -> int:
    run_seed = json.loads(str(msg.content["config"]["run-config"]))["federation"]["seed"]
    client_id = int(content["metrics"]["client_id"])
    return derive_seed(run_seed, "client-secagg-rounding", int(state.server_round), client_id)


@contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """Flower's quantizer rounds stochastically with NumPy's global RNG: seed it for the call, then restore it."""
    saved = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(saved)
