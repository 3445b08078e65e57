"""The split-service target: SFPrompt's split service on 127.0.0.1 in this process, fuzzed one request at a time,
each OK answer checked against an independent reading of the request."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pollinate.common.config_io import build_config
from pollinate.methods.sfprompt.channel import NODE_ID_METADATA
from pollinate.methods.sfprompt.server import split_limits
from pollinate.methods.sfprompt.service import TokenRegistry, start_split_server
from pollinate.methods.sfprompt.service.compute import return_free_memory
from pollinate.methods.sfprompt.split import encode_tensor, split_model
from pollinate.protos import split_pb2, split_pb2_grpc
from pollinate.simulations.fuzz.mutations import Mutator
from pollinate.simulations.fuzz.tally import Tally, rss_mib

_CLEAN_CODES = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED", "NOT_FOUND",
                          "FAILED_PRECONDITION", "PERMISSION_DENIED", "OUT_OF_RANGE", "ALREADY_EXISTS"})
_HIDDEN = 64
_FLOAT_CODES = {split_pb2.FLOAT32: torch.float32, split_pb2.FLOAT16: torch.float16, split_pb2.BFLOAT16: torch.bfloat16}
_ITEMSIZE = {split_pb2.FLOAT32: 4, split_pb2.FLOAT16: 2, split_pb2.BFLOAT16: 2, split_pb2.INT64: 8, split_pb2.BOOL: 1}


def tiny_body() -> torch.nn.Module:
    """The body of a tiny random Llama (4 layers, hidden 64, 64 positions), as the split-service tests use."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=_HIDDEN, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return split_model(LlamaForCausalLM(config).eval(), 1, 1).body


def _finite(t: split_pb2.Tensor) -> bool:
    if t.dtype == split_pb2.BFLOAT16:  # exponent bits all set: Inf or NaN
        return not np.any((np.frombuffer(t.data, "<u2") & 0x7F80) == 0x7F80)
    return bool(np.isfinite(np.frombuffer(t.data, "<f4" if t.dtype == split_pb2.FLOAT32 else "<f2")).all())


def _tensor_ok(t: split_pb2.Tensor, dtypes: Any, shape: tuple[int, ...]) -> bool:
    """``t`` is ``shape`` of one of ``dtypes`` with exactly its bytes, and finite where it is float."""
    if t.dtype not in dtypes or tuple(t.shape) != shape or len(t.data) != math.prod(shape) * _ITEMSIZE[t.dtype]:
        return False
    return t.dtype not in _FLOAT_CODES or _finite(t)


@dataclass
class _Session:
    owner: str
    last_step: int
    pending: tuple[int, tuple[int, ...]] | None = None  # (step, output shape) of a step kept for its Backward


class SplitTarget:
    """The split service on 127.0.0.1 in this process, tiny body; node "1" fuzzes, node "2" holds a session that
    node "1" must not reach. Each case: a valid Forward first where needed, one fuzzed call (the counted one), then
    the case's sessions closed."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.notes = timeout_s, Counter()
        self.tokens = TokenRegistry()
        cfg = build_config(None, ['method="sfprompt"'])
        sf = cfg.sfprompt  # the default run's limits and caps, as SFPrompt's server half passes them; a long TTL
        self.server, port = start_split_server(tiny_body(), tokens=self.tokens, limits=split_limits(cfg),
                                               max_message_bytes=sf.max_message_bytes, session_ttl_s=3600.0,
                                               max_concurrent_rpcs=sf.max_concurrent_rpcs,
                                               compute_slots=sf.compute_slots)
        self.service = self.server.split_service
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = split_pb2_grpc.SplitBodyStub(self.channel)
        self.creds = {node: self.tokens.issue(node, 1, 86400.0) for node in ("1", "2")}
        revoked = self.tokens.issue("1", 1, 86400.0)
        self.tokens.revoke(revoked)
        self.bad_tokens = ("", "x" * 43, revoked, self.tokens.issue("1", 1, 1e-9), self.creds["2"], "[/x]")
        self.victims, self.request, self.node = 0, None, "1"
        self.new_victim()

    def call(self, method: str, request: Any, node: str | None) -> tuple[str, Any]:
        metadata = () if node is None else ((NODE_ID_METADATA, node),)
        try:
            return "OK", getattr(self.stub, method)(request, metadata=metadata, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or ""

    def new_victim(self) -> None:
        self.victims += 1
        self.victim = f"victim-{self.victims}"
        m = Mutator(np.random.default_rng(self.victims), 1 << 20)
        status, details = self.call("Forward", self._forward(m, self.victim, 1, "2", split_pb2.FLOAT32, False), "2")
        if status != "OK":
            raise RuntimeError(f"node 2 could not open its session: {status} {details}")

    def _forward(self, m: Mutator, session: str, step: int, node: str, dtype: int, keep_graph: bool,
                 shape: tuple[int, int] = (1, 2)) -> split_pb2.ForwardRequest:
        hidden = torch.from_numpy(m.rng.standard_normal((*shape, _HIDDEN), dtype=np.float32))
        mask = torch.ones(shape, dtype=m.pick((torch.bool, torch.long)))
        return split_pb2.ForwardRequest(session_id=session, step_id=step, token=self.creds[node],
                                        keep_graph=keep_graph, hidden=encode_tensor(hidden, _FLOAT_CODES[dtype]),
                                        attention_mask=encode_tensor(mask))

    def case(self, m: Mutator, index: int) -> tuple[str, str]:
        kind = m.pick(("Forward",) * 10 + ("Backward",) * 7 + ("CloseSession",) * 3)
        sid, known = f"fuzz-{index}", {self.victim: _Session("2", 1)}
        self.request, self.node = None, "1"
        shape, dtype = (int(m.rng.integers(1, 5)), int(m.rng.integers(1, 17))), m.pick(tuple(_FLOAT_CODES))
        if kind == "Backward" or m.chance(0.5):  # a step first: Backward needs one, replays and reorders need one
            step0, keep = int(m.rng.integers(1, 50)), m.chance(0.9 if kind == "Backward" else 0.5)
            status, details = self.call("Forward", self._forward(m, sid, step0, "1", dtype, keep, shape), "1")
            if status != "OK":
                self._cleanup(sid, "1")
                return "crash", f"a valid Forward was refused: {status} {details}"[:300]
            known[sid] = _Session("1", step0, (step0, (*shape, _HIDDEN)) if keep else None)
        try:
            return self._fuzzed_call(m, kind, sid, known, shape, dtype, index)
        finally:
            self._cleanup(sid, self.request.session_id if self.request is not None else sid, self.node)

    def _fuzzed_call(self, m: Mutator, kind: str, sid: str, known: dict[str, _Session], shape: tuple[int, int],
                     dtype: int, index: int) -> tuple[str, str]:
        step = known[sid].last_step if sid in known else 0
        if kind == "Forward":
            request = self._forward(m, sid, step + 1, "1", dtype, m.chance(0.5), shape)
        elif kind == "Backward":
            grad = torch.from_numpy(m.rng.standard_normal((*shape, _HIDDEN), dtype=np.float32))
            request = split_pb2.BackwardRequest(session_id=sid, step_id=step, token=self.creds["1"],
                                                grad=encode_tensor(grad, _FLOAT_CODES[dtype]))
        else:
            request = split_pb2.CloseSessionRequest(session_id=sid, token=self.creds["1"])
        if kind == "Backward" and m.chance(0.15):  # the counted Backward replays one that already ran
            m.log.append("replay")
            if self.call(kind, request, "1")[0] == "OK":
                known[sid].pending = None
        self.request = request
        for _ in range(0 if m.chance(0.1) else int(m.rng.integers(1, 4))):
            self.node = self._mutate(m, request, self.node, step, index)
        node = self.node
        status, reply = self.call(kind, request, node)
        if status == "OK":
            problems = self._problems(kind, request, node, reply, known)
            return ("bad-accept", f"{kind}: " + "; ".join(problems)) if problems else ("accepted", kind)
        if status in _CLEAN_CODES:
            return "rejected", f"{kind} {status}"
        return ("hang" if status == "DEADLINE_EXCEEDED" else "crash"), f"{kind} {status}: {str(reply)[:200]}"

    def _mutate(self, m: Mutator, request: Any, node: str | None, step: int, index: int) -> str | None:
        op = m.pick(("field",) * 6 + ("tensor", "tensor", "nonfinite", "token", "node", "session", "step"))
        m.log.append(op)
        if op == "field":
            m.edit(request)
        elif op == "nonfinite" and not isinstance(request, split_pb2.CloseSessionRequest):
            tensor = request.grad if isinstance(request, split_pb2.BackwardRequest) else request.hidden
            tensor.data = m.special(tensor.data, 2 if _ITEMSIZE.get(tensor.dtype) == 2 else 4)
        elif op == "tensor" and not isinstance(request, split_pb2.CloseSessionRequest):
            self._replace_tensor(m, request)
        elif op == "token":
            request.token = m.pick(self.bad_tokens)
        elif op == "node":
            node = m.pick(("2", "", "3", None, "1" * 200, " 1"))
        elif op == "session":
            request.session_id = m.pick((self.victim, "", "s" * 129, "s" * 128, f"fuzz-{index - 1}", "x"))
        elif hasattr(request, "step_id"):
            request.step_id = m.pick((0, step, max(step - 1, 0), step + 1, 2**64 - 1))
        return node

    def _replace_tensor(self, m: Mutator, request: Any) -> None:
        """A tensor of the request replaced by a consistent one of random rank, shape and dtype (bytes under the
        cap), whose values may be NaN/Inf or huge."""
        name = "grad" if isinstance(request, split_pb2.BackwardRequest) else m.pick(("hidden", "attention_mask"))
        dims = [int(m.pick((0, 1, 2, 7, 16, 63, 64, 65, 128))) for _ in range(int(m.rng.integers(0, 5)))]
        dtype = m.pick(tuple(_ITEMSIZE))
        while math.prod(dims) * _ITEMSIZE[dtype] > m.max_bytes:
            dims[int(np.argmax(dims))] //= 2
        data = m.rng.standard_normal(math.prod(dims)).astype("<f4" if dtype == split_pb2.FLOAT32 else "<f2")
        data = data.tobytes()[: math.prod(dims) * _ITEMSIZE[dtype]].ljust(math.prod(dims) * _ITEMSIZE[dtype], b"\1")
        getattr(request, name).CopyFrom(split_pb2.Tensor(dtype=dtype, shape=dims, data=m.blob(data) if m.chance(0.3)
                                                         else data))
        m.log.append(f"{name}:{split_pb2.DType.Name(dtype)}{dims}")

    def _problems(self, kind: str, request: Any, node: str | None, reply: Any, known: dict) -> list[str]:
        """Why an OK answer to ``request`` was wrong (empty when the request was valid and the reply fits it)."""
        problems = [] if node in self.creds and request.token == self.creds[node] else ["token not the named node's"]
        if not 1 <= len(request.session_id) <= 128:
            problems.append(f"session id of {len(request.session_id)} characters")
        session = known.get(request.session_id)
        mine = session is not None and session.owner == node
        if kind == "Forward":
            h, shape = request.hidden, tuple(request.hidden.shape)
            limits = self.service.limits
            if len(shape) != 3 or shape[2] != _HIDDEN or not (1 <= shape[0] <= limits.max_batch
                                                                and 1 <= shape[1] <= self.service.max_seq_len):
                problems.append(f"hidden of shape {shape}")
            elif not (_tensor_ok(h, _FLOAT_CODES, shape) and _tensor_ok(request.attention_mask, (4, 5), shape[:2])):
                problems.append("hidden or mask inconsistent, or not finite")
            if session is not None and (not mine or request.step_id <= session.last_step):
                problems.append(f"step {request.step_id} on node {session.owner}'s session, last {session.last_step}")
            if not problems and (reply.hidden.dtype != h.dtype or tuple(reply.hidden.shape) != shape):
                problems.append(f"reply of shape {tuple(reply.hidden.shape)}, dtype {reply.hidden.dtype}")
            elif not problems and not _finite(reply.hidden):
                self.notes["Forward: non-finite output from a finite input"] += 1
        elif kind == "Backward":
            pending = session.pending if mine else None
            if pending is None or pending[0] != request.step_id:
                problems.append(f"no pending step {request.step_id} of this node's")
            elif not _tensor_ok(request.grad, _FLOAT_CODES, pending[1]):
                problems.append("grad inconsistent with the pending step, or not finite")
            elif tuple(reply.grad.shape) != pending[1]:
                problems.append(f"reply of shape {tuple(reply.grad.shape)}")
        elif reply.existed and not mine:
            problems.append("closed a session the node does not hold")
        return problems

    def _cleanup(self, *sessions_and_node: Any) -> None:
        *sessions, node = sessions_and_node
        for session in {s for s in sessions if 1 <= len(s) <= 128} - {self.victim}:
            for owner in {"1", node} & set(self.creds):
                self.call("CloseSession", split_pb2.CloseSessionRequest(session_id=session, token=self.creds[owner]),
                          owner)
        if self.victim in sessions:  # node 2 may have closed it itself: start it afresh
            self.call("CloseSession", split_pb2.CloseSessionRequest(session_id=self.victim, token=self.creds["2"]), "2")
            self.new_victim()

    def repro(self) -> dict[str, Any]:
        wire = self.request.SerializeToString() if self.request is not None else b""
        return {"node": self.node, "request_hex": wire.hex() if len(wire) <= 4096 else f"{len(wire)} bytes"}

    def serves_a_step(self) -> bool:
        """Whether a valid Forward and its Backward both still succeed."""
        m = Mutator(np.random.default_rng(0), 1 << 20)
        forward = self._forward(m, "last-check", 1, "1", split_pb2.FLOAT32, True, (2, 8))
        grad = encode_tensor(torch.ones(2, 8, _HIDDEN))
        backward = split_pb2.BackwardRequest(session_id="last-check", step_id=1, token=self.creds["1"], grad=grad)
        ok = self.call("Forward", forward, "1")[0] == "OK" and self.call("Backward", backward, "1")[0] == "OK"
        self.call("CloseSession", split_pb2.CloseSessionRequest(session_id="last-check", token=self.creds["1"]), "1")
        return ok

    def stop(self) -> dict[str, Any]:
        """Close node 2's session, sweep, return free memory to the OS; what the service still holds."""
        alive = self.serves_a_step()
        self.call("CloseSession", split_pb2.CloseSessionRequest(session_id=self.victim, token=self.creds["2"]), "2")
        self.service.sweep_expired()
        return_free_memory()
        left = {"serves_a_valid_step_after": alive, "sessions_left": self.service.num_sessions,
                "graph_bytes_left": self.service.graph_bytes, "rss_after_sessions_closed_mib": rss_mib()}
        self.channel.close()
        self.server.stop(None)
        return left


def fuzz_split(cases: int, seed: int, timeout_s: float, max_request_bytes: int) -> tuple[Tally, dict[str, Any]]:
    """``cases`` fuzzed requests to a split service started here; the tally and the service's memory."""
    memory = {"rss_before_service_mib": rss_mib()}
    target = SplitTarget(timeout_s)
    memory["rss_service_started_mib"] = rss_mib()
    tally = Tally("split-service")
    try:
        for index in range(cases):
            mutator = Mutator(np.random.default_rng([seed, 3, index]), max_bytes=max_request_bytes)
            # The watchdog covers the case's few calls, each with its own gRPC deadline of timeout_s.
            tally.run(6 * timeout_s, lambda m=mutator, i=index: target.case(m, i),
                      lambda m=mutator, i=index: {"seed": [seed, 3, i], "edits": m.log[:16], **target.repro()})
        memory["rss_after_requests_mib"] = rss_mib()
    finally:
        memory.update(target.stop())
    tally.notes = target.notes
    return tally, memory
