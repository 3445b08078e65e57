"""Secure aggregation (SecAgg+) as the strategy drives it: setup and share keys from configure_train, the collect
stage in the train messages, unmask from aggregate_train, with every node's client mod run in-process. The mean
equals the plain mean to quantization tolerance, the server never holds a client's update, dropouts after share
keys still give a round with the survivors' mean, below the threshold the round keeps the global and says why, and
combinations that cannot work are refused at start."""

import uuid

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client.privacy import privatize_reply
from pollinate.client.secagg import STATE_RECORD, secure_aggregation_mod
from pollinate.common.config import ConfigError
from pollinate.common.config_io import build_config
from pollinate.common.privacy import DP_CLIPPED_METRIC
from pollinate.common.report import RunRecorder
from pollinate.common.secagg import MASKED_RECORD, SECAGG_RECORD
from pollinate.common.wire import arrays_to_record, record_to_arrays
from pollinate.server.state_fedavg import StateFedAvg

NODES = [101, 102, 103, 104, 105]
SHAPES = {"layer.a": (6, 5), "layer.b": (9,)}
SECAGG = ["privacy.secure_aggregation=true", "federation.update_norm_bound=0", "federation.relative_norm_bound=0"]


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages take their run and source from Flower's task identity, which a ServerApp process sets."""
    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


class ToyFedAvg(StateFedAvg):
    """A dense-state method with two small tensors (no model to load)."""

    supports_secure_aggregation = True
    shapes = SHAPES

    def initial_arrays(self) -> ArrayRecord:
        rng = np.random.default_rng(0)
        return arrays_to_record({name: rng.normal(size=shape).astype(np.float32) for name, shape in SHAPES.items()})

    def evaluate_global(self, arrays):
        return {"eval_loss": 0.0, "eval_metrics": {}}

    def save_final(self, arrays):
        return {}


def toy_strategy(tmp_path, *overrides: str, nodes: list[int] = NODES) -> ToyFedAvg:
    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", f"federation.clients={len(nodes)}",
                              "data.builtin_examples=20", "data.eval_examples=2", *SECAGG, *overrides])
    return ToyFedAvg(cfg, RunRecorder(tmp_path, {"rounds_planned": 3}, quiet=True), tmp_path)


def deltas_for(nodes: list[int], scale: float = 1e-3, seed: int = 1) -> dict[int, dict[str, np.ndarray]]:
    """Each node's update, the size of a few optimizer steps."""
    rng = np.random.default_rng(seed)
    return {node: {name: (scale * rng.normal(size=shape)).astype(np.float32) for name, shape in SHAPES.items()}
            for node in nodes}


class SecAggGrid:
    """Flower's grid with the nodes in-process: each message runs the node's client mod (its own Context), whose
    train handler returns the global plus the node's delta. ``silent[stage]`` nodes never answer that stage;
    ``tamper[stage](node, reply)`` may rewrite a node's reply to it (a hostile client)."""

    def __init__(self, nodes: list[int], deltas: dict[int, dict[str, np.ndarray]], clip: bool = False) -> None:
        self.nodes, self.deltas, self.clip = nodes, deltas, clip
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
                         for node in nodes}
        self.silent: dict[str, set[int]] = {}
        self.tamper: dict[str, object] = {}
        self.seen: dict[int, list[Message]] = {node: [] for node in nodes}  # every reply a node sent

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def train(self, msg: Message, ctxt: Context) -> Message:
        node = msg.metadata.dst_node_id
        state = {k: v + self.deltas[node][k] for k, v in record_to_arrays(msg.content["arrays"]).items()}
        content = RecordDict({"arrays": arrays_to_record(state), "metrics": MetricRecord(
            {"client_id": self.nodes.index(node), "num-examples": 10, "train_loss": 1.0})})
        if self.clip:  # what the ClientApp's train handler does when the round asks for clipping
            content = privatize_reply(msg, content, 0)
        return Message(content, reply_to=msg)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())  # what pushing does
            node, stage = message.metadata.dst_node_id, message.content[SECAGG_RECORD]["stage"]
            if node in self.silent.get(stage, set()):
                continue
            reply = secure_aggregation_mod(message, self.contexts[node], self.train)
            if stage in self.tamper:
                reply = self.tamper[stage](node, reply)
            self.seen[node].append(reply)
            replies.append(reply)
        return replies


def run_round(strategy: ToyFedAvg, grid: SecAggGrid, server_round: int = 1, arrays: ArrayRecord | None = None):
    """One round as Flower's loop drives it: configure_train, the train messages through the grid,
    aggregate_train, end_round. The new global (None: unchanged) and the round record."""
    arrays = arrays if arrays is not None else strategy.initial_arrays()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))
    new, _ = strategy.aggregate_train(server_round, grid.send_and_receive(messages))
    strategy.end_round(server_round, new if new is not None else arrays)
    return new, strategy.recorder.rounds[-1]


def plain_mean(deltas: dict[int, dict[str, np.ndarray]], nodes) -> dict[str, np.ndarray]:
    return {name: np.mean([deltas[node][name].astype(np.float64) for node in nodes], axis=0) for name in SHAPES}


def assert_mean_is(strategy, new: ArrayRecord, expected: dict[str, np.ndarray], tolerance: float) -> None:
    base = record_to_arrays(strategy.initial_arrays())
    for name, value in record_to_arrays(new).items():
        assert np.abs(value.astype(np.float64) - base[name] - expected[name]).max() <= tolerance, name


def quantization_step(strategy) -> float:
    return 2 * strategy.cfg.privacy.secagg_clipping_range / strategy.cfg.privacy.secagg_quantization_range


# --- the sum -------------------------------------------------------------------------------------------------
def test_the_secure_mean_equals_the_plain_mean_to_quantization_tolerance(tmp_path):
    strategy, deltas = toy_strategy(tmp_path), deltas_for(NODES)
    new, record = run_round(strategy, SecAggGrid(NODES, deltas))
    # Stochastic rounding moves each client's coordinate by less than one step; the mean by less than one step,
    # and fp32 rounding of the new global adds an ulp of the weights (|w| < 5 here).
    assert_mean_is(strategy, new, plain_mean(deltas, NODES), quantization_step(strategy) + 5e-7)
    secagg = record["secagg"]
    assert secagg["clients"] == {"sampled": 5, "setup": 5, "share_keys": 5, "unmasked": 5}
    assert secagg["failed"] is None and secagg["dropped"] == []
    assert record["bytes_secagg_up"] > 0 and record["bytes_secagg_down"] > 0
    assert all("update_norm" not in client for client in record["clients"])  # never measured: never seen
    assert strategy.recorder.rejected == []


def test_with_a_fine_grid_the_error_shrinks_with_the_step(tmp_path):
    strategy, deltas = toy_strategy(tmp_path, "privacy.secagg_clipping_range=0.01"), deltas_for(NODES)
    new, _ = run_round(strategy, SecAggGrid(NODES, deltas))
    assert_mean_is(strategy, new, plain_mean(deltas, NODES), quantization_step(strategy) + 5e-7)
    assert quantization_step(strategy) < 1e-8


def test_the_server_never_holds_a_clients_update_in_the_clear(tmp_path):
    strategy, deltas = toy_strategy(tmp_path), deltas_for(NODES)
    grid = SecAggGrid(NODES, deltas)
    run_round(strategy, grid)
    step = quantization_step(strategy)
    for node in NODES:
        (masked_reply,) = [r for r in grid.seen[node] if MASKED_RECORD in r.content.array_records]
        assert "arrays" not in masked_reply.content.array_records
        masked = record_to_arrays(masked_reply.content[MASKED_RECORD])["layer.a"].astype(np.float64)
        plain = np.round((deltas[node]["layer.a"] + 8.0) / step)  # the unmasked quantized update
        assert np.abs(masked - plain).min() > 1000  # no coordinate is within 1000 steps of the plain one
        assert masked.std() > 2**32 / 8  # masks spread it over the whole uint32 range


# --- dropouts ------------------------------------------------------------------------------------------------
def test_a_client_dropping_after_share_keys_still_gives_the_survivors_mean(tmp_path):
    strategy, deltas = toy_strategy(tmp_path), deltas_for(NODES)
    grid = SecAggGrid(NODES, deltas)
    grid.silent["collect_masked_vectors"] = {103}  # it shared its keys, then never sent its vector
    new, record = run_round(strategy, grid)
    survivors = [node for node in NODES if node != 103]
    assert_mean_is(strategy, new, plain_mean(deltas, survivors), quantization_step(strategy) + 5e-7)
    assert record["secagg"]["clients"]["unmasked"] == 4
    (rejected,) = strategy.recorder.rejected
    assert rejected["client_id"] == "node-103" and rejected["reason"].startswith("dropped:")


def test_a_client_dropping_at_setup_is_left_out_before_it_trains(tmp_path):
    strategy, deltas = toy_strategy(tmp_path), deltas_for(NODES)
    grid = SecAggGrid(NODES, deltas)
    grid.silent["setup"] = {105}
    new, record = run_round(strategy, grid)
    assert_mean_is(strategy, new, plain_mean(deltas, NODES[:4]), quantization_step(strategy) + 5e-7)
    assert not any(MASKED_RECORD in r.content.array_records for r in grid.seen[105])  # never trained
    assert record["secagg"]["dropped"][0]["stage"] == "setup"
    assert "secure aggregation (setup): no reply" in strategy.recorder.rejected[0]["reason"]


def test_a_client_dropping_at_unmask_leaves_its_shares_to_the_others(tmp_path):
    strategy = toy_strategy(tmp_path, "privacy.secagg_num_shares=5", "privacy.secagg_reconstruction_threshold=3")
    grid = SecAggGrid(NODES, deltas := deltas_for(NODES))
    grid.silent["unmask"] = {101}  # its vector is in the sum; its mask seed comes from the others' shares
    new, record = run_round(strategy, grid)
    assert_mean_is(strategy, new, plain_mean(deltas, NODES), quantization_step(strategy) + 5e-7)
    assert [d["stage"] for d in record["secagg"]["dropped"]] == ["unmask"]


def test_below_the_threshold_the_round_keeps_the_previous_global_and_says_why(tmp_path):
    strategy = toy_strategy(tmp_path, "privacy.secagg_num_shares=5", "privacy.secagg_reconstruction_threshold=4")
    grid = SecAggGrid(NODES, deltas_for(NODES))
    grid.silent["collect_masked_vectors"] = {101, 102}  # 3 vectors left, every secret needs 4 shares
    new, record = run_round(strategy, grid)
    assert new is None
    assert "need 4 shares" in record["secagg"]["failed"]
    assert record["train_loss"] is None


def test_too_few_clients_after_share_keys_skip_training_altogether(tmp_path):
    strategy = toy_strategy(tmp_path, "federation.min_clients=4")
    grid = SecAggGrid(NODES, deltas_for(NODES))
    grid.silent["share_keys"] = {101, 102}
    new, record = run_round(strategy, grid)
    assert new is None
    assert not any(MASKED_RECORD in r.content.array_records for node in NODES for r in grid.seen[node])
    assert "the round needs 4" in record["secagg"]["failed"]


def test_fewer_vectors_than_min_clients_unmask_nothing_and_say_so(tmp_path):
    strategy = toy_strategy(tmp_path, "federation.min_clients=5")
    grid = SecAggGrid(NODES, deltas_for(NODES))
    grid.silent["collect_masked_vectors"] = {102}
    new, record = run_round(strategy, grid)
    assert new is None and "nothing was unmasked" in record["secagg"]["failed"]
    stages = {SecAggPlusState(**dict(grid.contexts[n].state.config_records[STATE_RECORD])).current_stage
              for n in NODES if n != 102}
    assert stages == {"collect_masked_vectors"}  # nobody was asked to unmask


def test_the_next_round_starts_afresh_after_a_failed_one(tmp_path):
    strategy, deltas = toy_strategy(tmp_path, "federation.min_clients=5"), deltas_for(NODES)
    grid = SecAggGrid(NODES, deltas)
    grid.silent["share_keys"] = {104}
    assert run_round(strategy, grid)[0] is None
    grid.silent = {}
    new, record = run_round(strategy, grid, server_round=2)
    assert_mean_is(strategy, new, plain_mean(deltas, NODES), quantization_step(strategy) + 5e-7)
    assert record["secagg"]["failed"] is None


# --- with DP and the server optimizer -------------------------------------------------------------------------
def test_central_dp_clips_on_the_clients_and_noises_the_secure_mean(tmp_path):
    pytest.importorskip("opacus")
    strategy = toy_strategy(tmp_path, "privacy.dp=central", "privacy.clip_norm=0.01", "privacy.noise_multiplier=0")
    deltas = deltas_for(NODES, scale=1e-2)  # norms ~0.07: every client clips to 0.01
    new, record = run_round(strategy, SecAggGrid(NODES, deltas, clip=True))
    assert record["secagg"]["clipping_range"] == 0.01  # the clip norm bounds every coordinate
    base = record_to_arrays(strategy.initial_arrays())
    change = np.concatenate([(record_to_arrays(new)[k].astype(np.float64) - base[k]).ravel() for k in SHAPES])
    assert np.linalg.norm(change) <= 0.01 + 1e-6
    assert record["privacy"]["clipped_fraction"] == 1.0


def test_the_server_optimizer_moves_the_global_by_the_secure_mean(tmp_path):
    plain = toy_strategy(tmp_path / "plain", "federation.server_optimizer=fedavgm", "privacy.secure_aggregation=false")
    secure = toy_strategy(tmp_path / "secure", "federation.server_optimizer=fedavgm")
    deltas = deltas_for(NODES)
    expected, _ = run_round(plain, PlainGrid(NODES, deltas))
    new, _ = run_round(secure, SecAggGrid(NODES, deltas))
    for name, value in record_to_arrays(new).items():
        assert np.abs(value - record_to_arrays(expected)[name]).max() <= quantization_step(secure) + 5e-7


class PlainGrid(SecAggGrid):
    """The same clients without secure aggregation (equal example counts: the plain mean is equal-weight too)."""

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
        return [self.train(message, self.contexts[message.metadata.dst_node_id]) for message in messages]


# --- refused at start ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "field"), [
    (["federation.aggregator=median"], "federation.aggregator = 'median'"),
    (["federation.update_norm_bound=100"], "federation.update_norm_bound = 100"),
    (["federation.relative_norm_bound=5"], "federation.relative_norm_bound = 5"),
    (["federation.fraction_train=0.2"], "needs at least 2 clients per round"),
    (["federation.fraction_train=0.4", "privacy.secagg_num_shares=5", "privacy.secagg_reconstruction_threshold=3"],
     "privacy.secagg_reconstruction_threshold = 3 exceeds the 2 clients"),
    (["privacy.secagg_quantization_range=1073741824"], "privacy.secagg_quantization_range = 1073741824"),
])
def test_combinations_that_cannot_work_are_refused_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace("(", r"\(")) as caught:
        toy_strategy(tmp_path, *overrides)
    assert "\n" not in str(caught.value)


def test_a_method_that_cannot_be_securely_aggregated_refuses_it(tmp_path):
    class Unsupported(ToyFedAvg):
        supports_secure_aggregation = False

    cfg = build_config(None, ["model.name=tiny-llama", "method=fedavg-full", *SECAGG])
    with pytest.raises(ConfigError, match="privacy.secure_aggregation = true is not supported by method"):
        Unsupported(cfg, RunRecorder(tmp_path, {}, quiet=True), tmp_path)


def test_without_dp_the_replies_carry_no_clipped_flag(tmp_path):
    strategy, deltas = toy_strategy(tmp_path), deltas_for(NODES)
    grid = SecAggGrid(NODES, deltas, clip=True)
    run_round(strategy, grid)
    for node in NODES:
        (masked_reply,) = [r for r in grid.seen[node] if MASKED_RECORD in r.content.array_records]
        assert DP_CLIPPED_METRIC not in masked_reply.content["metrics"]  # no DP: the round asked for no clipping


@pytest.mark.parametrize(("sets", "field"), [
    (["method=fedpipe"], "method 'fedpipe'"),
    (["federation.aggregator=median"], "federation.aggregator"),
    (["federation.update_norm_bound=5", "federation.relative_norm_bound=0"], "federation.update_norm_bound"),
])
def test_simulate_refuses_an_impossible_combination_before_the_engine_starts(sets, field):
    from pollinate.simulations.run import check_secure_aggregation

    base = ["privacy.secure_aggregation=true", "federation.clients=4", "federation.update_norm_bound=0",
            "federation.relative_norm_bound=0"]
    with pytest.raises(ConfigError, match=field):
        check_secure_aggregation(build_config(None, base + sets))
    check_secure_aggregation(build_config(None, base))  # fedavg-lora, fedavg aggregator, no bounds: fine
