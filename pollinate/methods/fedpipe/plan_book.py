"""FedPipe's plans and what they rest on: every planned client's profile, workload and plan.

A client is planned from its round-0 reply: its profile, its examples' token lengths and its measured step
(``calibration.initial_workload``). Each round the strategy hands in the trained clients' measured timing; before
the next round ``review`` checks it against the plans' estimates and re-plans every client whose round ran over
the deadline or whose compute was more than ``calibration.TOLERANCE`` off (``fedpipe.replan``), recording a
``replan`` event with the reason and a ``plans`` event with the new plans (the dashboard's and report's format).

Resume: a resumed run prepares again (round 0 on every client: profile, scores, token lengths and a new measured
step), so plans and calibration are rebuilt from fresh measurements, as the plans always were; the stopped run's
per-round corrections are not carried over and are made again from the resumed rounds' measurements.
"""

from __future__ import annotations

from typing import Any

from pollinate.common.config import RunConfig
from pollinate.common.profiles import ResourceProfile
from pollinate.common.report import RunRecorder
from pollinate.methods.fedpipe.calibration import Review, initial_workload, review
from pollinate.methods.fedpipe.plan_options import plan_options
from pollinate.methods.fedpipe.plan_table import plan_summary, print_plan_table
from pollinate.methods.fedpipe.planner import ClientPlan, PlanInfeasible, Workload, plan_clients
from pollinate.methods.fedpipe.planner.spec import ModelSpec
from pollinate.methods.fedpipe.round_zero import PrepareReply


class PlanBook:
    """The planned clients of a run: ``plans``, and the ``profiles`` and ``workloads`` they were planned from.

    Parameters
    ----------
    cfg : RunConfig
        The run's config (``[fedpipe]``, the deadline, the round's shape).
    spec : ModelSpec
        The model's shapes.
    recorder : RunRecorder
        Where plans, re-plans and clients that fit no plan are recorded.
    """

    def __init__(self, cfg: RunConfig, spec: ModelSpec, recorder: RunRecorder):
        self.cfg, self.spec, self.recorder = cfg, spec, recorder
        self.options = plan_options(cfg)
        self.plans: dict[int, ClientPlan] = {}
        self.profiles: dict[int, ResourceProfile] = {}
        self.workloads: dict[int, Workload] = {}
        self.timings: dict[int, dict[str, Any]] = {}  # the round's measured timing per trained client

    def plan_new(self, replies: list[PrepareReply], importance: dict[str, float],
                 server_round: int) -> dict[int, ClientPlan]:
        """Plan the clients of these round-0 replies; the plans that fit (the others are rejected)."""
        for reply in replies:
            self.profiles[reply.client_id] = reply.profile
            self.workloads[reply.client_id] = initial_workload(self.spec, self.options, reply.profile,
                                                               reply.token_quantiles, reply.measured)
        plans, infeasible = self._plan([reply.client_id for reply in replies], importance, server_round)
        for client, message in infeasible.items():
            self.recorder.reject(server_round, client, f"no feasible plan: {message}")
            self.plans.pop(client, None)
        self._record(plans, server_round, importance, replanned=False)
        return plans

    def estimate_fields(self, client: int) -> dict[str, Any]:
        """A trained client's report fields from its plan: the plan, and its memory, round and compute estimates."""
        plan = self.plans.get(client)
        if plan is None:
            return {}
        return {"plan": plan_summary(plan), "est_memory_bytes": int(plan.est_memory_bytes),
                "est_round_seconds": round(plan.est_compute_s + plan.est_comm_s, 3),
                "estimated_compute_seconds": round(plan.est_compute_s, 3)}

    def observe(self, client: int, timing: dict[str, Any]) -> None:
        """A planned client's measured round (``compute_seconds``, ``comm_seconds``, ``round_seconds``,
        ``met_deadline``), checked against its plan by the next ``review``."""
        if client in self.plans and timing:
            self.timings[client] = dict(timing)

    def review(self, importance: dict[str, float], server_round: int) -> set[int]:
        """Re-plan, for ``server_round``, the clients whose last measured round missed its plan (one that fits no
        plan at its corrected speed keeps its plan and workload); returns those whose ranks changed (what the
        server holds for them no longer applies)."""
        timings, self.timings = self.timings, {}
        if not self.cfg.fedpipe.replan:
            return set()
        due: dict[int, Review] = {}
        for client, timing in sorted(timings.items()):
            plan, workload = self.plans.get(client), self.workloads.get(client)
            found = None if plan is None or workload is None else review(
                plan, workload, timing, self.options.deadline_s)
            if found is not None:
                due[client] = found
        if not due:
            return set()
        before = {client: self.plans[client] for client in due}
        kept_workloads = {client: self.workloads[client] for client in due}
        for client, found in due.items():
            self.workloads[client] = found.workload
        after, infeasible = self._plan(list(due), importance, server_round)
        for client, found in due.items():
            reason = found.reason
            if client in infeasible:
                # One slow round (a shared or throttled device) must not cost a client the rest of the run: it keeps
                # the plan it had, and its next round is reviewed again.
                self.workloads[client] = kept_workloads[client]
                reason += f"; no plan fits at that speed ({infeasible[client]}), so it keeps its plan"
            new = after.get(client, before[client])
            self.recorder.event("replan", round=server_round, client_id=client, reason=reason,
                                compute_ratio=round(found.compute_ratio, 3), before=plan_summary(before[client]),
                                after=plan_summary(new))
        self._record(after, server_round, importance, replanned=True)
        return {client for client in after if after[client].ranks != before[client].ranks}

    def _plan(self, clients: list[int], importance: dict[str, float],
              server_round: int) -> tuple[dict[int, ClientPlan], dict[int, str]]:
        """Plan ``clients`` from their profiles and workloads: the plans that fit (recorded in ``plans``), and the
        planner's message for each client that fits nothing (its old plan, if any, is left to the caller)."""
        profiles = [self.profiles[client] for client in clients]
        workloads = [self.workloads[client] for client in clients]
        plans: dict[int, ClientPlan] = {}
        infeasible: dict[int, str] = {}
        try:
            for plan in plan_clients(profiles, importance, self.spec, self.options, clients, workloads):
                plans[int(plan.client_id)] = plan
        except PlanInfeasible:
            for client, profile, workload in zip(clients, profiles, workloads, strict=True):
                try:
                    plans[client] = plan_clients([profile], importance, self.spec, self.options, [client],
                                                 [workload])[0]
                except PlanInfeasible as exc:
                    infeasible[client] = str(exc)
        self.plans.update(plans)
        return plans, infeasible

    def _record(self, plans: dict[int, ClientPlan], server_round: int, importance: dict[str, float],
                replanned: bool) -> None:
        """The ``plans`` event (module_ranks: each module's rank, for the dashboard's heat map) and the table."""
        head_params = {"head_params": self.spec.head_params} if self.spec.head_params else {}
        self.recorder.event("plans", round=server_round, importance_top=sorted(importance, key=importance.get)[-5:],
                            plans={str(c): {**plan_summary(p), "module_ranks": dict(p.ranks)}
                                   for c, p in plans.items()}, **head_params)
        print_plan_table(self.recorder, {str(c): plan_summary(p) for c, p in plans.items()},
                         {str(c): self.profiles[c].name for c in plans}, server_round, replanned=replanned)
