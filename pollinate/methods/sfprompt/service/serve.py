"""Start the split service on a gRPC port: bounded concurrency, TLS when given, a sweeper for idle sessions."""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from torch import nn

from pollinate.methods.sfprompt.channel import DEFAULT_MAX_MESSAGE_BYTES
from pollinate.methods.sfprompt.service.compute import return_free_memory
from pollinate.methods.sfprompt.service.core import SplitBodyService
from pollinate.methods.sfprompt.service.limits import GraphCost, SplitLimits
from pollinate.methods.sfprompt.service.tokens import TokenRegistry
from pollinate.protos import split_pb2_grpc

logger = logging.getLogger(__name__)


def start_split_server(
    body: nn.Module,
    *,
    tokens: TokenRegistry,
    host: str = "127.0.0.1",
    port: int = 0,
    limits: SplitLimits | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    session_ttl_s: float = 300.0,
    max_concurrent_rpcs: int = 16,
    compute_slots: int = 1,
    tls_cert_chain: bytes | None = None,
    tls_private_key: bytes | None = None,
    hidden_size: int | None = None,
    graph_cost: GraphCost | None = None,
) -> tuple[grpc.Server, int]:
    """Serve ``body`` as a ``SplitBody`` gRPC service; returns the started server and the bound port.

    ``port=0`` binds an ephemeral port. With ``tls_cert_chain`` and ``tls_private_key`` (PEM bytes) the port
    is TLS (``grpc.ssl_server_credentials``); otherwise plaintext. Messages over ``max_message_bytes`` are
    refused by gRPC with RESOURCE_EXHAUSTED, and so is any call beyond ``max_concurrent_rpcs`` in progress
    (each admitted call has its own thread, so none queue); the body runs on ``compute_slots`` threads of its
    own. A daemon thread that ends with the server sweeps expired sessions and, once no session is left after
    new work, returns the freed activation memory to the OS. Stop it with ``server.stop(grace)``.
    """
    if (tls_cert_chain is None) != (tls_private_key is None):
        raise ValueError("TLS needs both tls_cert_chain and tls_private_key (PEM bytes), or neither")
    if max_concurrent_rpcs < 1:
        raise ValueError(f"max_concurrent_rpcs={max_concurrent_rpcs}: expected at least 1")
    service = SplitBodyService(body, tokens, limits=limits, session_ttl_s=session_ttl_s, compute_slots=compute_slots,
                               dedicated_compute_threads=True, hidden_size=hidden_size, graph_cost=graph_cost)
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    executor = futures.ThreadPoolExecutor(max_workers=max_concurrent_rpcs, thread_name_prefix="split-body")
    server = grpc.server(executor, options=options, maximum_concurrent_rpcs=max_concurrent_rpcs)
    split_pb2_grpc.add_SplitBodyServicer_to_server(service, server)
    address = f"{host}:{port}"
    if tls_cert_chain is not None:
        credentials = grpc.ssl_server_credentials([(tls_private_key, tls_cert_chain)])
        bound = server.add_secure_port(address, credentials)
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the split service to {address}")
    server.start()
    server.split_service = service  # for inspection (tests, metrics); grpc.Server has no other handle
    _start_sweeper(server, service, interval_s=max(0.05, min(session_ttl_s / 2, 30.0)))
    logger.info("split service on %s:%d (%s)", host, bound, "TLS" if tls_cert_chain else "plaintext")
    return server, bound


def _start_sweeper(server: grpc.Server, service: SplitBodyService, interval_s: float) -> None:
    def sweep() -> None:
        trimmed_at = 0
        # wait_for_termination returns True when it timed out, False once the server stopped.
        while server.wait_for_termination(timeout=interval_s):
            expired = service.sweep_expired()
            if expired or (service.num_sessions == 0 and service.compute.calls != trimmed_at):
                trimmed_at = service.compute.calls
                return_free_memory()
        service.compute.close()

    threading.Thread(target=sweep, name="split-body-sweeper", daemon=True).start()
