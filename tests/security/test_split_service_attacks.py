"""Attacks on SFPrompt's split service (issue 11, finding 4), each against a service on 127.0.0.1 with a tiny body.

A malicious node holds a valid token for itself. It must not make the server allocate or compute beyond the
limits, crash a call into INTERNAL, lock other nodes out, keep memory after its sessions end, or use a token
issued to another node.
"""

import gc
import threading
import time
import weakref
from concurrent import futures

import grpc
import pytest
import torch
from flwr.app import ConfigRecord
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.common.config_io import build_config
from pollinate.common.report import RunRecorder
from pollinate.methods.sfprompt.channel import NODE_ID_METADATA, SplitCallError, SplitChannel
from pollinate.methods.sfprompt.config import SFPromptConfig
from pollinate.methods.sfprompt.server import SFPrompt, split_limits, split_service_hosts
from pollinate.methods.sfprompt.service import (
    GraphCost,
    SplitBodyService,
    SplitLimits,
    TokenRegistry,
    start_split_server,
)
from pollinate.methods.sfprompt.split import encode_tensor, split_model
from pollinate.protos import split_pb2, split_pb2_grpc
from pollinate.server.deployment import Deployment

HIDDEN, POSITIONS = 64, 64
Code = grpc.StatusCode


class CountingBody(torch.nn.Module):
    """The tiny Llama body, counting the calls that reach it and keeping weak references to every tensor its
    submodules return (the inside of each graph, not only its output)."""

    def __init__(self, body: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = body, body.config
        self.calls = 0
        self.outputs: list[weakref.ref] = []
        for module in body.modules():
            module.register_forward_hook(self._remember)

    def _remember(self, module, args, output) -> None:
        for tensor in output if isinstance(output, tuple) else (output,):
            if isinstance(tensor, torch.Tensor) and tensor.grad_fn is not None:
                self.outputs.append(weakref.ref(tensor))

    def forward(self, hidden, mask):
        self.calls += 1
        return self.inner(hidden, mask)


def tiny_body() -> CountingBody:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS)
    return CountingBody(split_model(LlamaForCausalLM(config).eval(), 1, 1).body)


@pytest.fixture
def serve(request):
    """``serve(**kwargs) -> (body, service, address, tokens)``: a fresh service on a loopback port."""

    def start(**kwargs):
        body, tokens = kwargs.pop("body", None) or tiny_body(), TokenRegistry()
        server, port = start_split_server(body, tokens=tokens, **kwargs)
        request.addfinalizer(lambda: server.stop(None))
        body.calls = 0  # the service's calibration ran the body; count the requests' calls only
        return body, server.split_service, f"127.0.0.1:{port}", tokens

    return start


def raw_stub(address: str):
    return split_pb2_grpc.SplitBodyStub(grpc.insecure_channel(address))


def forward(token, session="s", step=1, batch=2, seq=5, keep_graph=True, hidden=None):
    hidden = torch.randn(batch, seq, HIDDEN) if hidden is None else hidden
    return split_pb2.ForwardRequest(
        session_id=session, step_id=step, token=token, keep_graph=keep_graph, hidden=encode_tensor(hidden),
        attention_mask=encode_tensor(torch.ones(hidden.shape[:2], dtype=torch.bool)))


def refused(call, request, node, code, match=""):
    with pytest.raises(grpc.RpcError) as info:
        call(request, metadata=((NODE_ID_METADATA, node),), timeout=10)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()


def one_step(address, token, node, seq=5, timeout_s=10.0):
    with SplitChannel(address, token, node_id=node, timeout_s=timeout_s) as channel:
        hidden = torch.randn(2, seq, HIDDEN, requires_grad=True)
        (channel.body(hidden, torch.ones(2, seq, dtype=torch.long)) * torch.randn(2, seq, HIDDEN)).sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- request shapes
def test_86_byte_request_declaring_a_huge_shape_is_rejected_before_any_compute(serve):
    body, service, address, tokens = serve()
    token = tokens.issue("9", 1, 60)
    request = split_pb2.ForwardRequest(
        session_id="s", step_id=1, token=token, keep_graph=True,
        hidden=split_pb2.Tensor(dtype=split_pb2.FLOAT32, shape=[0, 2**34, HIDDEN]),
        attention_mask=split_pb2.Tensor(dtype=split_pb2.BOOL, shape=[0, 2**34]))
    assert request.ByteSize() < 100
    refused(raw_stub(address).Forward, request, "9", Code.INVALID_ARGUMENT, match="empty batch")
    request.hidden.shape[:] = [1, 2**34, HIDDEN]  # not empty, no data: the length is refused before decoding
    request.attention_mask.shape[:] = [1, 2**34]
    refused(raw_stub(address).Forward, request, "9", Code.INVALID_ARGUMENT, match=f"max_seq_len={POSITIONS}")
    assert body.calls == 0 and service.num_sessions == 0 and service.graph_bytes == 0
    one_step(address, tokens.issue("1", 1, 60), "1")


@pytest.mark.parametrize(("limits", "batch", "seq", "match"), [
    (SplitLimits(), 1, POSITIONS + 1, f"exceeds max_seq_len={POSITIONS}"),  # the model's maximum positions
    (SplitLimits(max_seq_len=8), 1, 9, "exceeds max_seq_len=8"),  # the configured cap, below the model's
    (SplitLimits(max_batch=3), 4, 5, "exceeds max_batch=3"),
    (SplitLimits(), 0, 5, "empty batch"),
    (SplitLimits(), 2, 0, "empty batch"),
])
def test_batch_and_sequence_over_the_limits_are_invalid_argument_without_compute(serve, limits, batch, seq, match):
    body, service, address, tokens = serve(limits=limits)
    refused(raw_stub(address).Forward, forward(tokens.issue("9", 1, 60), batch=batch, seq=seq), "9",
            Code.INVALID_ARGUMENT, match=match)
    assert body.calls == 0 and service.num_sessions == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_and_gradients_are_invalid_argument(serve, bad):
    body, service, address, tokens = serve()
    token, stub = tokens.issue("9", 1, 60), raw_stub(address)
    hidden = torch.randn(2, 5, HIDDEN)
    hidden[1, 3, 7] = bad
    refused(stub.Forward, forward(token, hidden=hidden), "9", Code.INVALID_ARGUMENT, match="NaN or Inf")
    assert body.calls == 0
    stub.Forward(forward(token, "g"), metadata=((NODE_ID_METADATA, "9"),), timeout=10)
    grad = torch.randn(2, 5, HIDDEN)
    grad[0, 0, 0] = bad
    backward = split_pb2.BackwardRequest(session_id="g", step_id=1, token=token, grad=encode_tensor(grad))
    refused(stub.Backward, backward, "9", Code.INVALID_ARGUMENT, match="NaN or Inf")
    assert service.holds_graph("g")  # the step survives a bad gradient, like any malformed one


# --------------------------------------------------------------------------------------------- memory
def one_and_a_half_steps() -> int:
    """Bytes for one (2, 5) step of the tiny body and half of another, as the service estimates them."""
    return int(1.5 * SplitBodyService(tiny_body(), TokenRegistry()).graph_cost.estimate(2, 5))


def test_a_step_over_the_memory_bound_is_refused_before_the_body_runs(serve):
    bound = one_and_a_half_steps()
    body, service, address, tokens = serve(limits=SplitLimits(max_graph_bytes=bound))
    stub = raw_stub(address)
    stub.Forward(forward(tokens.issue("1", 1, 60)), metadata=((NODE_ID_METADATA, "1"),), timeout=10)
    held, calls = service.graph_bytes, body.calls
    refused(stub.Forward, forward(tokens.issue("2", 1, 60), "other"), "2", Code.RESOURCE_EXHAUSTED,
            match=f"max_graph_bytes={bound}")
    assert body.calls == calls and service.graph_bytes == held


def test_one_node_cannot_hold_more_activations_than_its_budget(serve):
    budget = one_and_a_half_steps()
    body, service, address, tokens = serve(limits=SplitLimits(client_activation_budget_bytes=budget))
    token, stub = tokens.issue("9", 1, 60), raw_stub(address)
    stub.Forward(forward(token, "a"), metadata=((NODE_ID_METADATA, "9"),), timeout=10)
    calls = body.calls
    refused(stub.Forward, forward(token, "b"), "9", Code.RESOURCE_EXHAUSTED,
            match=f"client_activation_budget_bytes={budget}")
    assert body.calls == calls
    one_step(address, tokens.issue("1", 1, 60), "1")  # another node's budget is its own


def test_the_estimate_matches_the_measured_graph_of_the_real_body(serve):
    _, service, address, tokens = serve()
    token = tokens.issue("9", 1, 60)
    for session, (batch, seq) in enumerate([(1, 3), (3, 17), (2, POSITIONS)]):
        hidden = torch.randn(batch, seq, HIDDEN)
        before = service.graph_bytes
        raw_stub(address).Forward(forward(token, str(session), hidden=hidden), metadata=((NODE_ID_METADATA, "9"),),
                                  timeout=10)
        measured = service.graph_bytes - before
        assert 0.9 * measured <= service.graph_cost.estimate(batch, seq) <= 1.25 * measured
        service.sessions.close(str(session), "9")


def test_memory_is_released_once_sessions_expire(serve):
    body, service, address, tokens = serve(session_ttl_s=0.3, limits=SplitLimits(sessions_per_client=4))
    stub = raw_stub(address)
    for node in ("1", "2", "3"):
        token = tokens.issue(node, 1, 60)
        for session in range(4):
            for step in (1, 2):  # the second Forward abandons the first step's graph
                stub.Forward(forward(token, f"{node}-{session}", step=step, batch=4, seq=POSITIONS),
                             metadata=((NODE_ID_METADATA, node),), timeout=10)
    assert service.num_sessions == 12 and service.graph_bytes > 0
    deadline = time.monotonic() + 10
    while service.num_sessions and time.monotonic() < deadline:
        time.sleep(0.05)  # the server's sweeper drops idle sessions
    assert service.num_sessions == 0 and service.graph_bytes == 0
    gc.collect()
    # Graphs dropped without their Backward are freed whole, not only their outputs.
    assert len(body.outputs) > 24 and all(ref() is None for ref in body.outputs)


# --------------------------------------------------------------------------------------------- lock-out
def test_one_token_cannot_take_every_session(serve):
    _, service, address, tokens = serve(limits=SplitLimits(max_sessions=4))
    hog = tokens.issue("6", 1, 60)
    stub = raw_stub(address)
    for session in range(2):
        stub.Forward(forward(hog, f"hog-{session}"), metadata=((NODE_ID_METADATA, "6"),), timeout=10)
    refused(stub.Forward, forward(hog, "hog-2"), "6", Code.RESOURCE_EXHAUSTED, match="sessions_per_client=2")
    assert service.num_sessions == 2
    one_step(address, tokens.issue("1", 1, 60), "1")
    one_step(address, tokens.issue("2", 1, 60), "2")


def test_a_node_gets_one_call_at_a_time_and_the_rpc_cap_refuses_instead_of_queueing(serve):
    gate, entered = threading.Event(), threading.Semaphore(0)

    class GatedBody(torch.nn.Module):
        def forward(self, hidden, mask):
            entered.release()
            gate.wait(10)
            return hidden * 2

    _, _, address, tokens = serve(body=GatedBody(), max_concurrent_rpcs=2, compute_slots=2, hidden_size=HIDDEN,
                                  graph_cost=GraphCost(0.0))
    stub = raw_stub(address)
    one, two = tokens.issue("1", 1, 60), tokens.issue("2", 1, 60)
    with futures.ThreadPoolExecutor(2) as pool:
        held = pool.submit(stub.Forward, forward(one, "a"), metadata=((NODE_ID_METADATA, "1"),), timeout=10)
        assert entered.acquire(timeout=10)
        refused(stub.Forward, forward(one, "b"), "1", Code.RESOURCE_EXHAUSTED, match="one at a time")
        other = pool.submit(stub.Forward, forward(two, "c"), metadata=((NODE_ID_METADATA, "2"),), timeout=10)
        assert entered.acquire(timeout=10)
        refused(stub.Forward, forward(tokens.issue("3", 1, 60), "d"), "3", Code.RESOURCE_EXHAUSTED)  # 2 in flight
        gate.set()
        held.result(timeout=10)
        other.result(timeout=10)
    one_step(address, tokens.issue("3", 1, 60), "3")


def test_a_client_refused_for_capacity_retries_until_the_slot_frees(serve):
    gate, entered = threading.Event(), threading.Event()

    class GatedOnce(torch.nn.Module):
        def forward(self, hidden, mask):
            if not entered.is_set():
                entered.set()
                gate.wait(10)
            return hidden * 2

    _, _, address, tokens = serve(body=GatedOnce(), max_concurrent_rpcs=1, hidden_size=HIDDEN,
                                  graph_cost=GraphCost(0.0))
    with futures.ThreadPoolExecutor(1) as pool:
        held = pool.submit(raw_stub(address).Forward, forward(tokens.issue("2", 1, 60)),
                           metadata=((NODE_ID_METADATA, "2"),), timeout=10)
        assert entered.wait(10)
        threading.Timer(0.3, gate.set).start()  # the only slot frees while node 1 is being refused
        with SplitChannel(address, tokens.issue("1", 1, 60), node_id="1", timeout_s=10) as channel:
            out = channel.body(torch.ones(1, 2, HIDDEN), torch.ones(1, 2, dtype=torch.long))
        assert torch.equal(out, 2 * torch.ones(1, 2, HIDDEN))
        held.result(timeout=10)


def test_a_flooding_node_does_not_stop_a_legitimate_one(serve):
    """Eight threads of one token send Forwards as fast as they can for the legitimate node's whole run."""
    _, service, address, tokens = serve(max_concurrent_rpcs=8)
    flood, stop, answers = tokens.issue("66", 1, 60), threading.Event(), []

    def flooder(index: int) -> None:
        stub, step = raw_stub(address), 0
        while not stop.is_set():
            step += 1
            try:
                stub.Forward(forward(flood, f"flood-{index % 3}", step=step, batch=8, seq=POSITIONS),
                             metadata=((NODE_ID_METADATA, "66"),), timeout=10)
                answers.append(Code.OK)
            except grpc.RpcError as exc:
                answers.append(exc.code())

    with futures.ThreadPoolExecutor(8) as pool:
        floods = [pool.submit(flooder, i) for i in range(8)]
        try:
            for round_ in range(5):
                one_step(address, tokens.issue("1", round_, 60), "1", seq=POSITIONS, timeout_s=30)
        finally:
            stop.set()
        for job in floods:
            job.result(timeout=30)
    assert Code.RESOURCE_EXHAUSTED in answers and Code.INTERNAL not in answers
    assert service.sessions.client_bytes("1") == 0


# --------------------------------------------------------------------------------------------- identity
def test_a_token_is_refused_under_another_node_id_or_none(serve):
    _, _, address, tokens = serve()
    token, stub = tokens.issue("7", 1, 60), raw_stub(address)
    refused(stub.Forward, forward(token), "8", Code.UNAUTHENTICATED, match="not issued to node '8'")
    with pytest.raises(grpc.RpcError) as info:
        stub.Forward(forward(token), timeout=10)  # no node named at all
    assert info.value.code() == Code.UNAUTHENTICATED and NODE_ID_METADATA in info.value.details()
    one_step(address, token, "7")


@pytest.fixture
def strategy(tmp_path):
    def build(deployment=None, *overrides):
        cfg = build_config(overrides=["model.name=tiny-llama", "method=sfprompt", "federation.clients=2",
                                      "data.builtin_examples=20", "data.eval_examples=4", *overrides])
        made = SFPrompt(cfg, RunRecorder(tmp_path, {"rounds_planned": 1}, quiet=True), tmp_path, deployment)
        made.prepare(None)
        built.append(made)
        return made

    built: list[SFPrompt] = []
    yield build
    for made in built:
        made.close()


def test_the_round_token_works_only_for_the_node_it_was_sent_to(strategy):
    sfprompt = strategy()
    split = sfprompt.train_content(7, 1, sfprompt.initial_arrays(), ConfigRecord({"server-round": 1}))["split"]
    hidden, mask = torch.zeros(1, 4, HIDDEN), torch.ones(1, 4, dtype=torch.long)
    with SplitChannel(split["address"], split["token"], node_id="8") as thief, pytest.raises(SplitCallError) as info:
        thief.body(hidden, mask)
    assert info.value.code == Code.UNAUTHENTICATED
    with SplitChannel(split["address"], split["token"], node_id="7") as owner:
        assert owner.body(hidden, mask).shape == (1, 4, HIDDEN)


def test_under_a_coordinator_it_binds_the_deployment_host_and_advertises_the_public_host(strategy):
    sfprompt = strategy(Deployment(host="127.0.0.1", public_host="localhost"))
    host, port = sfprompt.address.rsplit(":", 1)
    assert host == "localhost" and int(port) > 0  # what a client on another machine dials
    split = sfprompt.train_content(4, 1, sfprompt.initial_arrays(), ConfigRecord({"server-round": 1}))["split"]
    with SplitChannel(split["address"], split["token"], node_id="4") as channel:
        assert channel.body(torch.zeros(1, 4, HIDDEN), torch.ones(1, 4, dtype=torch.long)).shape == (1, 4, HIDDEN)
    explicit = strategy(Deployment(host="127.0.0.1", public_host="localhost"), 'sfprompt.public_address="a.b:1"')
    assert explicit.address == "a.b:1"  # set by hand, it wins
    public = Deployment(host="0.0.0.0", public_host="coord.example")
    assert split_service_hosts(SFPromptConfig(), public) == ("0.0.0.0", "coord.example")
    assert split_service_hosts(SFPromptConfig(host="10.1.2.3"), public) == ("10.1.2.3", "10.1.2.3")
    assert split_service_hosts(SFPromptConfig(), None) == ("127.0.0.1", "127.0.0.1")  # simulation


def test_the_limits_follow_the_run_unless_set():
    cfg = build_config(overrides=["model.name=tiny-llama", "method=sfprompt", "train.batch_size=4",
                                  "model.max_seq_len=32", "sfprompt.num_prompt_tokens=8"])
    assert (split_limits(cfg).max_batch, split_limits(cfg).max_seq_len) == (4, 40)
    cfg = build_config(overrides=["model.name=tiny-llama", "method=sfprompt", "sfprompt.max_batch=2",
                                  "sfprompt.max_seq_len=16"])
    assert (split_limits(cfg).max_batch, split_limits(cfg).max_seq_len) == (2, 16)
