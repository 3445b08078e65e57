"""The client's secure-aggregation mod and what it relies on in Flower 1.42's SecAgg+ mod (private stage functions:
their inputs, outputs and state are pinned here), the shared mask generator, and what the client refuses."""

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, _setup, _share_keys, _unmask
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client.secagg import STATE_RECORD, secure_aggregation_mod
from pollinate.common.secagg import MASKED_RECORD, MOD_RANGE, SECAGG_RECORD, add_masks, mask_stream
from pollinate.common.wire import arrays_to_record, record_to_arrays

NODES = [7, 8, 9]
BASE = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
SETUP = {Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 1.0,
         Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: MOD_RANGE, Key.MAX_WEIGHT: 1.0}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


# --- Flower's stage functions, as this module uses them ----------------------------------------------------------
def _flower_states() -> tuple[dict[int, SecAggPlusState], dict[int, dict]]:
    states = {}
    for node in NODES:
        states[node] = SecAggPlusState()
        states[node].nid = node
    keys = {node: _setup(state, ConfigRecord(dict(SETUP))) for node, state in states.items()}
    for node, state in states.items():
        assert (state.share_num, state.threshold, state.clipping_range, state.target_range) == (3, 2, 1.0, 2**20)
        assert set(keys[node]) == {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2} and keys[node][Key.PUBLIC_KEY_1] == state.pk1
    return states, keys


def test_flower_setup_and_share_keys_give_shares_indexed_in_the_order_of_the_keys_sent():
    states, keys = _flower_states()
    sent = ConfigRecord({str(n): [keys[n][Key.PUBLIC_KEY_1], keys[n][Key.PUBLIC_KEY_2]] for n in sorted(NODES)})
    out = _share_keys(states[8], sent)
    assert out[Key.DESTINATION_LIST] == [7, 9]  # every neighbour but itself, in the order sent
    plaintext = decrypt(generate_shared_key(bytes_to_private_key(states[7].sk2), bytes_to_public_key(states[8].pk2)),
                        out[Key.CIPHERTEXT_LIST][0])
    src, dst, seed_share, key_share = share_keys_plaintext_separate(plaintext)
    assert (src, dst) == (8, 7)
    assert int.from_bytes(seed_share[:4], "little") == 1  # node 7 is first: Shamir index 1
    assert combine_shares([seed_share, states[8].rd_seed_share_dict[8]]) == states[8].rd_seed
    assert combine_shares([key_share, states[8].sk1_share_dict[8]]) == states[8].sk1
    assert set(states[8].ss2_dict) == {7, 9}


def test_flower_unmask_returns_seed_shares_of_the_active_and_key_shares_of_the_dropped():
    state = SecAggPlusState()
    state.nid, state.threshold = 8, 2
    state.rd_seed_share_dict, state.sk1_share_dict = {8: b"s8", 7: b"s7"}, {8: b"k8", 9: b"k9"}
    out = _unmask(state, ConfigRecord({Key.ACTIVE_NODE_ID_LIST: [8, 7], Key.DEAD_NODE_ID_LIST: [9]}))
    assert out == {Key.NODE_ID_LIST: [8, 7, 9], Key.SHARE_LIST: [b"s8", b"s7", b"k9"]}


def test_flower_state_survives_the_config_record_with_the_round_added():
    states, _ = _flower_states()
    state = states[7]
    state.server_round, state.rd_seed_share_dict = 4, {7: b"a", 9: b"b"}
    restored = SecAggPlusState(**dict(ConfigRecord(state.to_dict())))
    assert (restored.server_round, restored.nid, restored.rd_seed_share_dict) == (4, 7, {7: b"a", 9: b"b"})


# --- the mask generator ----------------------------------------------------------------------------------------
def test_masks_are_uniform_uint32_deterministic_per_seed_and_cancel_pairwise():
    shapes = [(1,), (300, 100)]
    first, again, other = mask_stream(b"k" * 44, shapes), mask_stream(b"k" * 44, shapes), mask_stream(b"j" * 44, shapes)
    assert [m.shape for m in first] == shapes and all(m.dtype == np.uint32 for m in first)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[1], other[1])
    assert abs(float(first[1].mean()) / 2**32 - 0.5) < 0.01  # uniform over the whole range
    vector = [np.zeros(s, np.uint32) + 5 for s in shapes]
    assert all(np.array_equal(v, np.zeros(s, np.uint32) + 5)
               for v, s in zip(add_masks(add_masks(vector, first, 1), first, -1), shapes, strict=True))


# --- the mod ---------------------------------------------------------------------------------------------------
def _stage(node: int, stage: str, server_round: int = 1, **entries) -> Message:
    message = Message(RecordDict({SECAGG_RECORD: ConfigRecord({"stage": stage, "server-round": server_round,
                                                               **entries})}),
                      dst_node_id=node, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = f"{node}-{stage}"
    return message


def _train(shift: float):
    def handler(msg: Message, ctxt: Context) -> Message:
        state = {k: v + np.float32(shift) for k, v in record_to_arrays(msg.content["arrays"]).items()}
        return Message(RecordDict({"arrays": arrays_to_record(state),
                                   "metrics": MetricRecord({"client_id": 3, "num-examples": 4})}), reply_to=msg)
    return handler


def _contexts():
    return {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES}


def _through_share_keys(ctxts) -> dict[int, dict]:
    """Setup and share keys for three nodes, by hand; each node's ciphertexts by destination."""
    keys = {n: secure_aggregation_mod(_stage(n, Stage.SETUP, **SETUP), ctxts[n], _train(0.0)).content[SECAGG_RECORD]
            for n in NODES}
    shared = {}
    for n in NODES:
        entries = {str(m): [keys[m][Key.PUBLIC_KEY_1], keys[m][Key.PUBLIC_KEY_2]] for m in NODES}
        out = secure_aggregation_mod(_stage(n, Stage.SHARE_KEYS, **entries), ctxts[n], _train(0.0))
        shared[n] = dict(zip(out.content[SECAGG_RECORD][Key.DESTINATION_LIST],
                             out.content[SECAGG_RECORD][Key.CIPHERTEXT_LIST], strict=True))
    return shared


def _collect(node: int, shared, shift: float, ctxts) -> Message:
    sources = [m for m in NODES if m != node]
    message = _stage(node, Stage.COLLECT_MASKED_VECTORS, **{Key.CIPHERTEXT_LIST: [shared[m][node] for m in sources],
                                                            Key.SOURCE_LIST: sources})
    message.content["arrays"] = arrays_to_record(BASE)
    message.content["config"] = ConfigRecord({"server-round": 1, "run-config": json.dumps({"federation": {"seed": 0}})})
    return secure_aggregation_mod(message, ctxts[node], _train(shift))


def test_the_masked_vectors_of_a_round_sum_to_the_quantized_updates():
    ctxts = _contexts()
    shared = _through_share_keys(ctxts)
    shifts = {7: 0.1, 8: -0.05, 9: 0.2}
    replies = {n: _collect(n, shared, shifts[n], ctxts) for n in NODES}
    for reply in replies.values():
        assert set(reply.content.array_records) == {MASKED_RECORD}  # the state does not leave
    total = add_masks(*[[record_to_arrays(replies[n].content[MASKED_RECORD])[k] for k in ("secagg-count", "w")]
                        for n in (7, 8)], 1)
    total = add_masks(total, [record_to_arrays(replies[9].content[MASKED_RECORD])[k] for k in ("secagg-count", "w")], 1)
    for n in NODES:  # what the server removes once it has rebuilt every mask seed
        seed = SecAggPlusState(**dict(ctxts[n].state.config_records[STATE_RECORD])).rd_seed
        total = add_masks(total, mask_stream(seed, [(1,), (3, 4)]), -1)
    assert int(total[0][0]) == 3  # three vectors in the sum
    mean = (total[1].astype(np.float64) * 2 / 2**20 - 3) / 3  # Flower's dequantization of 3 offsets of 1.0
    assert np.abs(mean - np.mean(list(shifts.values()))).max() < 2 / 2**20


def test_the_global_numpy_rng_is_left_as_it_was():
    ctxts = _contexts()
    shared = _through_share_keys(ctxts)
    np.random.seed(123)
    expected = np.random.get_state()[1].copy()
    _collect(7, shared, 0.1, ctxts)
    assert np.array_equal(np.random.get_state()[1], expected)


def test_other_messages_pass_through_untouched():
    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=7, message_type=MessageType.EVALUATE)
    message.metadata.__dict__["_message_id"] = "m"
    seen = []
    secure_aggregation_mod(message, _contexts()[7], lambda m, c: seen.append(m) or Message(RecordDict(), reply_to=m))
    assert seen == [message]


@pytest.mark.parametrize(("message", "match"), [
    (lambda: _stage(7, Stage.SHARE_KEYS, server_round=2), "of round 2 follows the setup of round 1"),
    (lambda: _stage(7, Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: [7], Key.DEAD_NODE_ID_LIST: [8]}),
     "expect share_keys stage"),
    (lambda: _stage(7, Stage.SETUP, server_round=True, **SETUP), "expected an int"),
])
def test_a_stage_out_of_order_or_of_another_round_is_refused(message, match):
    ctxts = _contexts()
    secure_aggregation_mod(_stage(7, Stage.SETUP, **SETUP), ctxts[7], _train(0.0))
    with pytest.raises((ValueError, TypeError), match=match):
        secure_aggregation_mod(message(), ctxts[7], _train(0.0))


@pytest.mark.parametrize(("active", "dead", "match"), [
    ([7, 8], [8], "twice or as both active and dropped"),
    ([8, 9], [7], "counts this node as dropped"),
    ([7, 8, 11], [], r"holds none of"),
])
def test_an_unmask_an_honest_server_never_sends_is_refused(active, dead, match):
    ctxts = _contexts()
    shared = _through_share_keys(ctxts)
    _collect(7, shared, 0.1, ctxts)
    unmask = _stage(7, Stage.UNMASK, **{Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead})
    with pytest.raises(ValueError, match=match):
        secure_aggregation_mod(unmask, ctxts[7], _train(0.0))


def test_shares_from_a_node_that_is_not_a_neighbour_are_refused():
    ctxts = _contexts()
    shared = _through_share_keys(ctxts)
    message = _stage(7, Stage.COLLECT_MASKED_VECTORS, **{Key.CIPHERTEXT_LIST: [shared[8][7], shared[8][7]],
                                                         Key.SOURCE_LIST: [8, 8]})
    message.content["arrays"] = arrays_to_record(BASE)
    message.content["config"] = ConfigRecord({"server-round": 1, "run-config": json.dumps({"federation": {"seed": 0}})})
    with pytest.raises(ValueError, match="sources repeat"):
        secure_aggregation_mod(message, ctxts[7], _train(0.1))
