"""The split service (server side of SFPrompt's split plane): the frozen body behind gRPC.

``tokens`` issues node-bound per-round credentials, ``limits`` holds what a request may ask for, ``sessions`` the
state and budgets, ``core`` the service's calls, ``serve`` the gRPC server, ``local`` an in-process client of it.
Nothing on the client side imports this package.
"""

from pollinate.methods.sfprompt.service.core import SplitBodyService
from pollinate.methods.sfprompt.service.limits import GraphCost, SplitLimits
from pollinate.methods.sfprompt.service.local import LocalBody
from pollinate.methods.sfprompt.service.serve import start_split_server
from pollinate.methods.sfprompt.service.sessions import SplitRejected
from pollinate.methods.sfprompt.service.tokens import TokenError, TokenInfo, TokenRegistry

__all__ = ["GraphCost", "LocalBody", "SplitBodyService", "SplitLimits", "SplitRejected", "TokenError", "TokenInfo",
           "TokenRegistry", "start_split_server"]
