"""FedPipe's planner: per client, which weight matrices to adapt, at which LoRA rank, with which batch size
and base-weight bits, so that training fits the client's memory and its round fits the deadline.

``spec`` describes a model by its shapes, ``costs`` is the cost model (memory, compute, communication),
``search`` finds the best plan of every client; ``options`` holds the search space and constants; ``workload``
describes a client's own steps (its examples' token lengths and its measured speed).
"""

from pollinate.methods.fedpipe.planner.options import PlanOptions
from pollinate.methods.fedpipe.planner.search import ClientPlan, PlanInfeasible, combine_importance, plan_clients
from pollinate.methods.fedpipe.planner.spec import model_spec_from_model
from pollinate.methods.fedpipe.planner.workload import Workload

__all__ = ["ClientPlan", "PlanInfeasible", "PlanOptions", "Workload", "combine_importance", "model_spec_from_model",
           "plan_clients"]
