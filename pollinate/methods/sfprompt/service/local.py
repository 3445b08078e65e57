"""``LocalBody``: the split service's own handlers behind the channel's interface, in process (no network)."""

from __future__ import annotations

from typing import Any

from torch import nn

from pollinate.methods.sfprompt.channel import SplitBodyClient, SplitCallError
from pollinate.methods.sfprompt.service.core import SplitBodyService
from pollinate.methods.sfprompt.service.sessions import SplitRejected
from pollinate.methods.sfprompt.service.tokens import TokenRegistry
from pollinate.methods.sfprompt.split import WireDType

_LOCAL_NODE = "local"


class LocalBody(SplitBodyClient):
    """In-process stand-in for ``SplitChannel``: same interface, same service logic, no network.

    Requests go through ``SplitBodyService``'s handlers (same validation, step order, wire-dtype rounding
    and byte accounting), so a method's split steps can run in unit tests and single-process simulations.

    Parameters
    ----------
    body : nn.Module
        The body module (``SplitParts.body``); frozen by the service.
    wire_dtype : {"fp32", "fp16", "bf16"}, default "fp32"
    session_id : str, optional
    **service_kwargs
        Passed to ``SplitBodyService`` (``limits``, ``session_ttl_s``, ``graph_cost``, ...).
    """

    def __init__(self, body: nn.Module, *, wire_dtype: WireDType = "fp32", session_id: str | None = None,
                 **service_kwargs: Any) -> None:
        tokens = TokenRegistry()
        super().__init__(tokens.issue(_LOCAL_NODE, 0, ttl_s=365 * 24 * 3600.0), session_id, wire_dtype)
        self.service = SplitBodyService(body, tokens, **service_kwargs)
        self._handlers = {"Forward": self.service.handle_forward, "Backward": self.service.handle_backward,
                          "CloseSession": self.service.handle_close}

    def _invoke(self, method: str, request: Any) -> Any:
        try:
            return self._handlers[method](request, _LOCAL_NODE)
        except SplitRejected as exc:
            raise SplitCallError(method, exc.code, exc.details) from exc
