"""Hostile clients against secure aggregation: a stage reply that is garbled, names nodes outside the round, or
carries a vector of the wrong shape drops that client from the protocol with a one-line reason, and the round
still finishes with the others' mean (or, when a well-formed but wrong share makes the sum inconsistent, keeps the
previous global and says why); nothing a client sends crashes the round."""

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Error, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import Key
from test_secagg import (  # noqa: F401  (the autouse fixture applies here too)
    NODES,
    SecAggGrid,
    assert_mean_is,
    deltas_for,
    plain_mean,
    quantization_step,
    run_round,
    task_identity,
    toy_strategy,
)

from pollinate.client.secagg import secure_aggregation_mod
from pollinate.common.secagg import MASKED_RECORD, SECAGG_RECORD
from pollinate.common.wire import arrays_to_record, record_to_arrays

WIDE = ["privacy.secagg_num_shares=5", "privacy.secagg_reconstruction_threshold=3"]  # tolerates 2 of 5 missing


class FailingGrid(SecAggGrid):
    """A client whose mod raises answers with an error, as Flower's ClientApp runner does."""

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for message in messages:
            try:
                replies += super().send_and_receive([message], timeout)
            except Exception as exc:  # noqa: BLE001
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=message))
        return replies


def _with_record(reply: Message, **changes) -> Message:
    record = ConfigRecord({**dict(reply.content[SECAGG_RECORD]), **changes})
    return Message(RecordDict({SECAGG_RECORD: record}), reply_to=_request(reply))


def _request(reply: Message) -> Message:
    """The message a reply answers (enough of it for ``reply_to``)."""
    request = Message(RecordDict(), dst_node_id=reply.metadata.src_node_id, message_type="train")
    request.metadata.__dict__["_message_id"] = reply.metadata.reply_to_message_id
    return request


def assert_mean_without(strategy, new, deltas, node: int) -> None:
    """The new global moved by the mean of every client's update but ``node``'s."""
    survivors = [other for other in NODES if other != node]
    assert_mean_is(strategy, new, plain_mean(deltas, survivors), quantization_step(strategy) + 5e-7)


def _only(node: int, change):
    return lambda sender, reply: change(reply) if sender == node else reply


def _round_survives_without(tmp_path, node: int, stage: str, change, *overrides: str, grid_cls=SecAggGrid):
    strategy, deltas = toy_strategy(tmp_path, *WIDE, *overrides), deltas_for(NODES)
    grid = grid_cls(NODES, deltas)
    grid.tamper[stage] = _only(node, change)
    new, record = run_round(strategy, grid)
    return strategy, deltas, new, record


# --- setup and share keys: the client is out before it trains ---------------------------------------------------
@pytest.mark.parametrize(("change", "reason"), [
    (lambda r: _with_record(r, **{Key.PUBLIC_KEY_1: b"not a key"}), "'pk1' is not a PEM public key"),
    (lambda r: _with_record(r, **{Key.PUBLIC_KEY_1: b"x" * 5000}), "'pk1' is not 1 to 1024 bytes"),
    (lambda r: _with_record(r, **{Key.PUBLIC_KEY_2: r.content[SECAGG_RECORD][Key.PUBLIC_KEY_1]}),
     "the same public key twice"),
    (lambda r: Message(RecordDict(), reply_to=_request(r)), "no 'secagg' ConfigRecord"),
])
def test_a_garbled_setup_reply_drops_that_client(tmp_path, change, reason):
    strategy, deltas, new, record = _round_survives_without(tmp_path, 102, "setup", change)
    survivors = [node for node in NODES if node != 102]
    assert_mean_is(strategy, new, plain_mean(deltas, survivors), quantization_step(strategy) + 5e-7)
    (dropped,) = record["secagg"]["dropped"]
    assert dropped["stage"] == "setup" and reason in dropped["reason"]
    assert reason in strategy.recorder.rejected[0]["reason"]


def _outside_node(reply: Message) -> Message:
    record = reply.content[SECAGG_RECORD]
    return _with_record(reply, **{Key.DESTINATION_LIST: [999, *list(record[Key.DESTINATION_LIST])[1:]]})


@pytest.mark.parametrize(("change", "reason"), [
    (_outside_node, "names node ids [999] outside the ones asked about"),
    (lambda r: _with_record(r, **{Key.DESTINATION_LIST: list(r.content[SECAGG_RECORD][Key.DESTINATION_LIST])[1:],
                                  Key.CIPHERTEXT_LIST: list(r.content[SECAGG_RECORD][Key.CIPHERTEXT_LIST])[1:]}),
     "leaves out node ids"),
    (lambda r: _with_record(r, **{Key.CIPHERTEXT_LIST: list(r.content[SECAGG_RECORD][Key.CIPHERTEXT_LIST])[1:]}),
     "pairs 4 destinations with 3 ciphertexts"),
    (lambda r: _with_record(r, **{Key.DESTINATION_LIST: [1.5, 2.5, 3.5, 4.5]}), "is not a list of node ids"),
])
def test_a_share_keys_reply_naming_other_nodes_drops_that_client(tmp_path, change, reason):
    strategy, deltas, new, record = _round_survives_without(tmp_path, 104, "share_keys", change)
    assert_mean_without(strategy, new, deltas, 104)
    (dropped,) = record["secagg"]["dropped"]
    assert dropped["stage"] == "share_keys" and reason in dropped["reason"]


def test_a_garbled_encrypted_share_fails_its_receiver_and_the_round_goes_on(tmp_path):
    """The server cannot read what one client encrypts for another: the receiver fails to decrypt, its training
    reply is an error, and its masks are removed with the others' shares of its key."""
    def garble(reply):
        record = reply.content[SECAGG_RECORD]
        ciphertexts = list(record[Key.CIPHERTEXT_LIST])
        ciphertexts[0] = ciphertexts[0][:-8] + b"AAAAAAAA"
        return _with_record(reply, **{Key.CIPHERTEXT_LIST: ciphertexts})

    strategy, deltas, new, record = _round_survives_without(tmp_path, 101, "share_keys", garble, grid_cls=FailingGrid)
    (victim,) = [r for r in strategy.recorder.rejected if "client failed" in r["reason"]]
    survivors = [node for node in NODES if f"node-{node}" != victim["client_id"]]  # it never got to name itself
    assert_mean_is(strategy, new, plain_mean(deltas, survivors), quantization_step(strategy) + 5e-7)
    assert "InvalidToken" in victim["reason"]


# --- collect: the vector ---------------------------------------------------------------------------------------
def _masked(change):
    def rewrite(reply: Message) -> Message:
        if MASKED_RECORD in reply.content.array_records:
            masked = record_to_arrays(reply.content[MASKED_RECORD])
            reply.content[MASKED_RECORD] = change(masked)
        return reply
    return rewrite


@pytest.mark.parametrize(("change", "reason"), [
    (lambda m: arrays_to_record({**m, "layer.b": m["layer.b"][:5]}), "tensor 'layer.b' has shape (5,), expected (9,)"),
    (lambda m: arrays_to_record({**m, "layer.b": m["layer.b"].astype(np.float32)}), "has dtype float32"),
    (lambda m: arrays_to_record({**m, "extra": m["layer.b"]}), "unknown tensor name 'extra'"),
    (lambda m: arrays_to_record({k: v for k, v in m.items() if k != "secagg-count"}), "missing tensor"),
])
def test_a_masked_vector_of_the_wrong_shape_is_rejected_and_its_masks_removed(tmp_path, change, reason):
    strategy, deltas, new, _ = _round_survives_without(tmp_path, 103, "collect_masked_vectors", _masked(change))
    assert_mean_without(strategy, new, deltas, 103)
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == 2 and reason in rejected["reason"]


def test_a_reply_that_also_sends_its_state_in_the_clear_is_rejected(tmp_path):
    def leak(reply):
        reply.content["arrays"] = arrays_to_record({"layer.b": np.zeros(9, np.float32)})
        return reply

    strategy, deltas, new, _ = _round_survives_without(tmp_path, 105, "collect_masked_vectors", leak)
    assert "in the clear" in strategy.recorder.rejected[0]["reason"]
    assert_mean_is(strategy, new, plain_mean(deltas, NODES[:4]), quantization_step(strategy) + 5e-7)


def test_a_bogus_array_in_the_masked_record_is_rejected_unread(tmp_path):
    def bogus(reply):
        if MASKED_RECORD in reply.content.array_records:
            reply.content[MASKED_RECORD]["layer.a"] = Array(dtype="uint32", shape=(6, 5), stype="numpy.ndarray",
                                                             data=b"\x93NUMPY garbage")
        return reply

    strategy, _, new, _ = _round_survives_without(tmp_path, 101, "collect_masked_vectors", bogus)
    assert new is not None and strategy.recorder.rejected[0]["client_id"] == 0


# --- unmask: the shares ----------------------------------------------------------------------------------------
def _shares(change):
    def rewrite(reply: Message) -> Message:
        record = reply.content[SECAGG_RECORD]
        return _with_record(reply, **change(list(record[Key.NODE_ID_LIST]), list(record[Key.SHARE_LIST])))
    return rewrite


@pytest.mark.parametrize(("change", "reason"), [
    (lambda ids, shares: {Key.SHARE_LIST: [shares[0][:-1], *shares[1:]]}, "bytes, expected"),
    (lambda ids, shares: {Key.SHARE_LIST: [b"\x09\x00\x00\x00" + shares[0][4:], *shares[1:]]}, "has index 9"),
    (lambda ids, shares: {Key.NODE_ID_LIST: [999, *ids[1:]]}, "names node ids [999] outside"),
    (lambda ids, shares: {Key.NODE_ID_LIST: ids[:-1], Key.SHARE_LIST: shares[:-1]}, "leaves out node ids"),
    (lambda ids, shares: {Key.SHARE_LIST: [b"", *shares[1:]]}, "is not a list of 1 to"),
])
def test_a_garbled_unmask_reply_drops_its_shares_and_the_others_suffice(tmp_path, change, reason):
    strategy, deltas, new, record = _round_survives_without(tmp_path, 102, "unmask", _shares(change))
    assert_mean_is(strategy, new, plain_mean(deltas, NODES), quantization_step(strategy) + 5e-7)  # 102's vector counts
    (dropped,) = record["secagg"]["dropped"]
    assert dropped["stage"] == "unmask" and reason in dropped["reason"]
    assert strategy.recorder.rejected == []


def test_a_well_formed_but_wrong_share_keeps_the_global_and_says_why(tmp_path):
    def corrupt(ids, shares):
        share = bytearray(shares[0])
        share[10] ^= 0xFF  # the index and length stay right: only reconstruction can tell
        return {Key.SHARE_LIST: [bytes(share), *shares[1:]]}

    strategy, _, new, record = _round_survives_without(tmp_path, 102, "unmask", _shares(corrupt))
    assert new is None
    assert "inconsistent" in record["secagg"]["failed"] or "rebuilt" in record["secagg"]["failed"]


def test_a_stage_reply_from_another_node_is_not_taken(tmp_path):
    strategy, deltas, new, record = _round_survives_without(tmp_path, 104, "setup", lambda r: _from(r, 105))
    assert "answers a message sent to node 104" in record["secagg"]["dropped"][0]["reason"]
    assert_mean_without(strategy, new, deltas, 104)


def _from(reply: Message, node: int) -> Message:
    reply.metadata.__dict__["_src_node_id"] = node
    return reply


def test_a_client_refuses_an_unmask_that_would_reveal_both_secrets_of_a_node(tmp_path):
    strategy, deltas = toy_strategy(tmp_path, *WIDE), deltas_for(NODES)
    grid = SecAggGrid(NODES, deltas)
    messages = list(strategy.configure_train(1, strategy.initial_arrays(), ConfigRecord(), grid))
    grid.send_and_receive(messages)
    unmask = Message(RecordDict({SECAGG_RECORD: ConfigRecord({
        "stage": "unmask", "server-round": 1, Key.ACTIVE_NODE_ID_LIST: [101, 102], Key.DEAD_NODE_ID_LIST: [102]})}),
        dst_node_id=101, message_type="train")
    with pytest.raises(ValueError, match="twice or as both active and dropped"):
        secure_aggregation_mod(unmask, grid.contexts[101], grid.train)
