"""Faults on a real loopback deployment: clients SIGKILLed mid-round; the coordinator SIGKILLed mid-run and resumed.

Runs ``pollinate coordinator`` and one ``pollinate join`` per client on 127.0.0.1, as a user runs them (TLS and
node keys unless ``--insecure``), and kills whole process trees with SIGKILL during round ``--at-round``:

- ``clients``: as round ``--at-round`` starts (its messages addressed to them), ``--kill`` clients die with their
  SuperNode, worker and ClientApp processes; the run must finish with the others, name the dead as dropped and
  keep every round (report, metrics, checkpoints, adapter);
- ``coordinator``: the same run twice, once uninterrupted and once with the coordinator's whole tree (SuperLink,
  gateway, ServerApp) SIGKILLed and restarted with ``--resume`` while the clients' ``join`` rejoin on their own;
  the final adapters and every round's checkpoint are compared tensor by tensor.

``python -m pollinate.simulations.deploy_faults --out DIR [clients|coordinator|both]`` writes ``DIR/faults.json``
and prints a summary. Every process it starts is stopped by PID before it returns.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from pollinate.common.data import generate_skills
from pollinate.deploy.app_trust import ensure_app_signing_key
from pollinate.deploy.keys import create_node_key, init_certs
from pollinate.deploy.processes import free_loopback_port, port_in_use
from pollinate.server.checkpoint import GLOBAL_FILE, round_dir
from pollinate.simulations.process_trees import (
    clientapps_since,
    flower_command,
    is_alive,
    kill_tree,
    process_tree,
    stop_tree,
)


class FaultExperimentError(RuntimeError):
    """The deployment did not reach the state an experiment waits for; the message holds the coordinator's log."""


@dataclass
class FaultSetup:
    """The deployment under test and the fault.

    Parameters
    ----------
    clients : int, default 5
        Clients that join (``federation.clients``).
    rounds : int, default 3
        Federated rounds.
    kill : int, default 2
        Clients SIGKILLed in the ``clients`` experiment (the last ones); ``federation.min_clients`` is the rest.
    at_round : int, default 2
        Round during which the victims are killed (>= 2, so round ``at_round - 1`` is checkpointed before).
    round_timeout_s : float, default 60
        ``federation.round_timeout_s``: how long a round waits for a client that does not answer.
    fraction_train : float, default 1.0
        ``federation.fraction_train``; a deployment samples max(fraction × clients, ``min_clients``) per round.
    min_clients : int or None
        ``federation.min_clients``; default ``clients - kill``.
    insecure : bool, default False
        No TLS and no node keys (``--insecure`` on both sides).
    model : str, default "tiny-llama"
        Model preset.
    local_steps : int, default 2
        ``train.local_steps``.
    examples_per_client : int, default 30
        Generated ``skills`` examples in each client's local data file.
    """

    clients: int = 5
    rounds: int = 3
    kill: int = 2
    at_round: int = 2
    round_timeout_s: float = 60.0
    fraction_train: float = 1.0
    min_clients: int | None = None
    insecure: bool = False
    model: str = "tiny-llama"
    local_steps: int = 2
    examples_per_client: int = 30

    def __post_init__(self) -> None:
        if not 0 <= self.kill < self.clients:
            raise ValueError(f"kill={self.kill} must be in [0, clients={self.clients})")
        if not 2 <= self.at_round <= self.rounds:
            raise ValueError(f"at_round={self.at_round} must be in [2, rounds={self.rounds}]")

    @property
    def least_replies(self) -> int:
        """``federation.min_clients`` of the run."""
        return self.clients - self.kill if self.min_clients is None else self.min_clients

    def run_options(self) -> list[str]:
        """The coordinator's run flags: small data and steps so a round takes seconds."""
        sets = {"data.eval_examples": 8, "train.local_steps": self.local_steps, "output.plots": "false",
                "federation.round_timeout_s": self.round_timeout_s, "federation.fraction_train": self.fraction_train,
                "federation.min_clients": self.least_replies}
        return ["--model", self.model, "--clients", str(self.clients), "--rounds", str(self.rounds),
                *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]]

    def run_budget_s(self) -> float:
        """Generous wall-clock bound for a whole run on a busy 2-core machine (a healthy round takes far less)."""
        return 240.0 + self.rounds * (self.round_timeout_s + 120.0)


# --- the run's files ------------------------------------------------------------------------------------------------
def events(run_dir: Path) -> list[dict[str, Any]]:
    """metrics.jsonl as parsed lines (a line still being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def round_time(run_dir: Path, server_round: int) -> float | None:
    """When ``server_round`` was recorded (its last record: a resumed run may repeat none, but be safe)."""
    times = [e["time"] for e in events(run_dir) if e["type"] == "round" and e["round"] == server_round]
    return max(times) if times else None


class LoopbackDeployment:
    """A coordinator and its joined clients on 127.0.0.1, each a ``python -m pollinate.cli`` process; a context
    manager that stops every process it started, by PID.

    Parameters
    ----------
    setup : FaultSetup
        Run flags and client count.
    work : Path
        Logs, client data and node work dirs; the run directory is ``work/run``.
    pki : Path or None
        Made by ``make_pki`` (``certs/`` and ``nodes/``); None for an insecure deployment.
    """

    def __init__(self, setup: FaultSetup, work: Path, pki: Path | None) -> None:
        self.setup, self.work, self.pki = setup, work, pki
        self.run_dir = work / "run"
        self.port = _free_port_pair()
        self.coordinator: subprocess.Popen | None = None
        self.clients: list[subprocess.Popen] = []
        self.started: list[subprocess.Popen] = []
        work.mkdir(parents=True, exist_ok=True)

    def _start(self, args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:  # a pipe nobody reads would block the child
            proc = subprocess.Popen([sys.executable, "-m", "pollinate.cli", *args], stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.work, start_new_session=True)
        self.started.append(proc)
        return proc

    def _tls_args(self) -> list[str]:
        if self.pki is None:
            return ["--insecure"]
        nodes = self.pki / "nodes"
        keys = [a for i in range(self.setup.clients) for a in ("--node-key", str(nodes / f"client{i}.pub"))]
        return ["--certs", str(self.pki / "certs"), *keys]

    @property
    def coordinator_log(self) -> Path:
        return self.work / "coordinator.log"

    def start_coordinator(self, resume: bool = False) -> subprocess.Popen:
        base = ["coordinator", "--host", "127.0.0.1", "--port", str(self.port), *self._tls_args()]
        args = ["--resume", str(self.run_dir)] if resume else [*self.setup.run_options(), "--out", str(self.run_dir)]
        self.coordinator = self._start([*base, *args], self.coordinator_log)
        return self.coordinator

    def start_clients(self) -> None:
        for i in range(self.setup.clients):
            data = self.work / f"client{i}.jsonl"
            data.write_text("".join(json.dumps(row) + "\n" for row in generate_skills(self.setup.examples_per_client,
                                                                                        seed=100 + i)))
            trust = (["--insecure"] if self.pki is None else
                     ["--certs", str(self.pki / "certs"), "--key", str(self.pki / "nodes" / f"client{i}")])
            self.clients.append(self._start(["join", "--coordinator", f"127.0.0.1:{self.port}", *trust,
                                             "--partition-id", str(i), "--data", str(data),
                                             "--work-dir", str(self.work / f"node{i}")], self.work / f"client{i}.log"))

    def wait_until(self, what: str, predicate: Callable[[], Any], timeout: float) -> Any:
        """Poll ``predicate`` until it returns something true; fail when the coordinator exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := predicate():
                return value
            if self.coordinator is not None and self.coordinator.poll() is not None:
                break
            time.sleep(0.3)
        raise FaultExperimentError(f"timed out or coordinator exited waiting for {what}; coordinator log tail:\n"
                                   f"{self.log_tail()}")

    def wait_round_in_flight(self, server_round: int, clients: list[int], at_least: int | None = None) -> float:
        """Block until ``at_least`` (default: all) of ``clients`` run a ClientApp for ``server_round``; returns when
        round ``server_round - 1`` was recorded."""
        previous = self.wait_until(f"round {server_round - 1} recorded",
                                   lambda: round_time(self.run_dir, server_round - 1), self.setup.run_budget_s())
        need = len(clients) if at_least is None else at_least
        self.wait_until(f"{need} of clients {clients} running a round-{server_round} ClientApp",
                        lambda: sum(bool(clientapps_since(self.clients[i].pid, previous)) for i in clients) >= need,
                        180)
        return previous

    def wait_coordinator(self) -> int:
        assert self.coordinator is not None
        try:
            return self.coordinator.wait(self.setup.run_budget_s())
        except subprocess.TimeoutExpired:
            raise FaultExperimentError(f"the run did not end within {self.setup.run_budget_s():.0f} s:\n"
                                       f"{self.log_tail()}") from None

    def log_tail(self, chars: int = 3000) -> str:
        log = self.coordinator_log
        return log.read_text(errors="replace")[-chars:] if log.is_file() else ""

    def close(self) -> None:
        for proc in reversed(self.started):
            if proc.poll() is None:  # an exited (reaped) child's pid may belong to someone else by now
                stop_tree(proc)

    def __enter__(self) -> LoopbackDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port_pair() -> int:
    """A loopback port whose successor (the SuperLink's) is free too."""
    for _ in range(50):
        port = free_loopback_port()
        if port < 65535 and not port_in_use("127.0.0.1", port + 1):
            return port
    raise FaultExperimentError("no free pair of loopback ports")


def make_pki(root: Path, clients: int) -> Path:
    """CA, server certificate, app-signing key and one node key per client under ``root`` (as the CLI makes them)."""
    init_certs(root / "certs", ["coordinator.test"])
    ensure_app_signing_key(root / "certs")  # the coordinator would make it; clients need it before they start
    for i in range(clients):
        create_node_key(root / "nodes", f"client{i}")
    return root


# --- what a run left behind -----------------------------------------------------------------------------------
def run_outcome(run_dir: Path) -> dict[str, Any]:
    """Rounds (seconds, accepted clients, losses), dropped clients, checkpoints and adapter of a finished run."""
    report_path = run_dir / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {"rounds": [], "rejected": []}
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]")
                         if (p / GLOBAL_FILE).is_file()) if (run_dir / "checkpoints").is_dir() else []
    recorded = {e["round"]: e["time"] for e in events(run_dir) if e["type"] == "round"}
    rounds = [{"round": r["round"], "seconds": r["seconds"], "recorded_at": recorded.get(r["round"]),
               "clients": sorted(c["client_id"] for c in r["clients"] if not c.get("rejected")),
               "train_loss": r["train_loss"], "eval_loss": r["eval_loss"]} for r in report["rounds"]]
    return {"run_dir": str(run_dir), "report_written": report_path.is_file(), "rounds": rounds,
            "dropped": report["rejected"], "checkpoints": checkpoints,
            "adapter": (run_dir / "adapter" / "adapter_model.safetensors").is_file(),
            "resumed_from": [e["from_round"] for e in events(run_dir) if e["type"] == "resumed"]}


def nothing_lost(outcome: dict[str, Any], rounds: int) -> dict[str, bool]:
    """Every round reported and checkpointed, the adapter written."""
    return {"report_has_every_round": [r["round"] for r in outcome["rounds"]] == list(range(1, rounds + 1)),
            "checkpoint_per_round": outcome["checkpoints"] == [f"round-{r:04d}" for r in range(1, rounds + 1)],
            "adapter_written": outcome["adapter"]}


def compare_tensors(a: Path, b: Path) -> dict[str, Any]:
    """Two safetensors files tensor by tensor: bit-identical or not, and the largest absolute difference."""
    left, right = load_file(str(a)), load_file(str(b))
    if left.keys() != right.keys():
        return {"bit_identical": False, "max_abs_diff": None, "tensors": len(left),
                "differing": sorted(left.keys() ^ right.keys())}
    differing, largest = [], 0.0
    for name in sorted(left):
        x, y = left[name], right[name]
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            differing.append(name)
            if x.shape == y.shape:
                largest = max(largest, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return {"bit_identical": not differing, "max_abs_diff": largest, "tensors": len(left), "differing": differing}


# --- the experiments ------------------------------------------------------------------------------------------
def kill_clients_mid_round(setup: FaultSetup, work: Path) -> dict[str, Any]:
    """Experiment ``clients``: the last ``setup.kill`` clients (join, SuperNode, ClientApps) are SIGKILLed while
    they train round ``setup.at_round``; the run must finish with the rest."""
    pki = None if setup.insecure else make_pki(work / "pki", setup.clients)
    victims = list(range(setup.clients - setup.kill, setup.clients))
    started = time.time()
    with LoopbackDeployment(setup, work / "deployment", pki) as dep:
        dep.start_coordinator()
        dep.start_clients()
        # Killed as soon as round at_round - 1 is recorded: round at_round's messages are addressed to them (Flower
        # marks a node offline only after missed heartbeats), and tiny-llama's replies could leave before a kill
        # that waited to see their round-at_round ClientApp.
        dep.wait_until(f"round {setup.at_round - 1} recorded", lambda: round_time(dep.run_dir, setup.at_round - 1),
                       setup.run_budget_s())
        killed_at = time.time()
        killed = {i: kill_tree(dep.clients[i].pid) for i in victims}
        code = dep.wait_coordinator()
        log = dep.log_tail()
    outcome = run_outcome(dep.run_dir)
    rounds = {r["round"]: r for r in outcome["rounds"]}
    survivors = list(range(setup.clients - setup.kill))
    dropped = sorted({d["client_id"] for d in outcome["dropped"] if d["round"] == setup.at_round}, key=str)
    recorded = (rounds.get(setup.at_round) or {}).get("recorded_at")
    checks = {"run_completed": code == 0, **nothing_lost(outcome, setup.rounds),
              "killed_round_aggregated_by_survivors": (rounds.get(setup.at_round) or {}).get("clients") == survivors
              and rounds[setup.at_round]["train_loss"] is not None,
              "killed_reported_dropped": dropped == victims,
              "later_rounds_went_on": all(rounds.get(r, {}).get("clients") == survivors
                                          for r in range(setup.at_round + 1, setup.rounds + 1))}
    return {"experiment": "clients", "setup": asdict(setup), "exit_code": code, "killed_clients": victims,
            "killed_pids": killed, "kill_to_round_recorded_s": None if recorded is None else recorded - killed_at,
            "wall_s": round(time.time() - started, 1), "checks": checks, **outcome,
            **({} if code == 0 else {"log_tail": log})}


def crash_and_resume(setup: FaultSetup, work: Path) -> dict[str, Any]:
    """Experiment ``coordinator``: the run uninterrupted, then the same run with the coordinator's whole tree
    SIGKILLed while every client trains round ``setup.at_round`` and restarted with ``--resume``; compares the
    final adapters and every round's checkpoint. No client is killed (``setup.kill`` is not used): every client
    must reply in every round of both runs."""
    setup = replace(setup, kill=0)
    pki = None if setup.insecure else make_pki(work / "pki", setup.clients)
    started = time.time()
    with LoopbackDeployment(setup, work / "uninterrupted", pki) as dep:
        dep.start_coordinator()
        dep.start_clients()
        reference_code = dep.wait_coordinator()
    reference = run_outcome(dep.run_dir)
    with LoopbackDeployment(setup, work / "resumed", pki) as dep:
        dep.start_coordinator()
        dep.start_clients()
        sampled = max(int(setup.clients * setup.fraction_train), setup.least_replies)  # as the strategy samples
        dep.wait_round_in_flight(setup.at_round, list(range(setup.clients)), at_least=sampled)
        crashed_at = time.time()
        # The clients' SuperNodes exit once their coordinator is gone; whatever they started must go with them.
        client_side = {proc: flower_command(proc) for client in dep.clients for proc in process_tree(client.pid)[1:]}
        killed = kill_tree(dep.coordinator.pid)
        checkpoint_at_crash = sorted(p.name for p in (dep.run_dir / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]"))
        dep.start_coordinator(resume=True)
        code = dep.wait_coordinator()
        log = dep.log_tail()
    orphans = [{"pid": proc.pid, "cmd": command} for proc, command in client_side.items() if is_alive(proc)]
    for proc in client_side:
        kill_tree(proc)  # only those still running: the rest are gone, and a psutil.Process is never a reused pid
    resumed = run_outcome(dep.run_dir)
    redone = next((r["recorded_at"] for r in resumed["rounds"] if r["round"] == setup.at_round), None)
    finished = reference["adapter"] and resumed["adapter"]
    adapter = compare_tensors(Path(reference["run_dir"]) / "adapter" / "adapter_model.safetensors",
                              Path(resumed["run_dir"]) / "adapter" / "adapter_model.safetensors") if finished else None
    per_round = {r: compare_tensors(round_dir(Path(reference["run_dir"]), r) / GLOBAL_FILE,
                                    round_dir(Path(resumed["run_dir"]), r) / GLOBAL_FILE)
                 for r in range(1, setup.rounds + 1)
                 if f"round-{r:04d}" in reference["checkpoints"] and f"round-{r:04d}" in resumed["checkpoints"]}
    checks = {"uninterrupted_completed": reference_code == 0, "resumed_completed": code == 0,
              "crashed_mid_round": checkpoint_at_crash[-1:] == [f"round-{setup.at_round - 1:04d}"],
              "resumed_after_last_checkpoint": resumed["resumed_from"] == [setup.at_round - 1],
              **nothing_lost(resumed, setup.rounds),
              "same_final_adapter": bool(adapter and adapter["bit_identical"])}
    return {"experiment": "coordinator", "setup": asdict(setup), "exit_codes": [reference_code, code],
            "killed_pids": killed, "checkpoints_at_crash": checkpoint_at_crash,
            "crash_to_round_recorded_s": None if redone is None else redone - crashed_at,
            "orphaned_after_crash": orphans,
            "wall_s": round(time.time() - started, 1), "checks": checks, "adapter": adapter,
            "global_per_round": per_round, "uninterrupted": reference, "resumed": resumed,
            **({} if code == 0 else {"log_tail": log})}


# --- command line ---------------------------------------------------------------------------------------------
def summary_markdown(results: list[dict[str, Any]]) -> str:
    """Per-round timings, dropped clients, adapter differences and checks, as markdown."""
    lines = []
    for result in results:
        lines.append(f"## {result['experiment']} ({result['wall_s']:.0f} s)")
        runs = ([("run", result)] if result["experiment"] == "clients"
                else [("uninterrupted", result["uninterrupted"]), ("resumed", result["resumed"])])
        lines += ["", "| run | round | seconds | clients aggregated | train loss | eval loss |",
                  "|---|---|---|---|---|---|"]
        for name, outcome in runs:
            lines += [f"| {name} | {r['round']} | {r['seconds']:.1f} | {r['clients']} | {_num(r['train_loss'])} "
                      f"| {_num(r['eval_loss'])} |" for r in outcome["rounds"]]
        for name, outcome in runs:
            lines += [f"- {name}: round {d['round']} dropped client {d['client_id']}: {d['reason']}"
                      for d in outcome["dropped"]]
        if result["experiment"] == "clients" and result["kill_to_round_recorded_s"] is not None:
            lines.append(f"- killed clients {result['killed_clients']}; round {result['setup']['at_round']} "
                         f"recorded {result['kill_to_round_recorded_s']:.1f} s after the kill")
        if result["experiment"] == "coordinator":
            if result["crash_to_round_recorded_s"] is not None:
                lines.append(f"- coordinator killed during round {result['setup']['at_round']}; the resumed run "
                             f"recorded it {result['crash_to_round_recorded_s']:.1f} s after the kill")
            lines.append(f"- client-side processes of the crashed run still running after the run (then killed): "
                         f"{[o['cmd'] for o in result['orphaned_after_crash']] or 'none'}")
            lines.append(f"- final adapter: {_diff(result['adapter'])}")
            lines += [f"- global after round {r}: {_diff(d)}" for r, d in result["global_per_round"].items()]
        lines += [f"- check {name}: {'ok' if ok else 'FAILED'}" for name, ok in result["checks"].items()]
        lines.append("")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _diff(comparison: dict[str, Any] | None) -> str:
    if comparison is None:
        return "not compared (a run wrote no adapter)"
    if comparison["bit_identical"]:
        return f"bit-identical ({comparison['tensors']} tensors)"
    return (f"{len(comparison['differing'])} of {comparison['tensors']} tensors differ, max abs diff "
            f"{comparison['max_abs_diff']:.3g}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pollinate.simulations.deploy_faults",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", nargs="?", choices=("clients", "coordinator", "both"), default="both")
    parser.add_argument("--out", required=True, help="directory for the runs, logs and faults.json")
    defaults = FaultSetup()
    parser.add_argument("--clients", type=int, default=defaults.clients)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--kill", type=int, default=defaults.kill, help="clients SIGKILLed (experiment clients)")
    parser.add_argument("--at-round", type=int, default=defaults.at_round, help="round during which to kill")
    parser.add_argument("--round-timeout", type=float, help="federation.round_timeout_s; default 60 for clients "
                        "(it bounds the wait for the dead), 300 for coordinator (no client may be dropped there)")
    parser.add_argument("--fraction-train", type=float, default=defaults.fraction_train)
    parser.add_argument("--min-clients", type=int, help="federation.min_clients (default: clients - kill)")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node keys")
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser().resolve()
    chosen = ["clients", "coordinator"] if args.experiment == "both" else [args.experiment]
    if taken := [name for name in chosen if (out / name).exists()]:
        parser.error(f"--out {out} already holds {', '.join(taken)}/; choose an empty directory")
    experiments = {"clients": (kill_clients_mid_round, 60.0), "coordinator": (crash_and_resume, 300.0)}
    results = []
    for name in chosen:
        experiment, timeout = experiments[name]
        setup = FaultSetup(clients=args.clients, rounds=args.rounds, kill=args.kill, at_round=args.at_round,
                           round_timeout_s=args.round_timeout or timeout, fraction_train=args.fraction_train,
                           min_clients=args.min_clients, insecure=args.insecure)
        results.append(experiment(setup, out / name))
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(results, indent=2))
    print(summary_markdown(results))
    return 0 if all(all(r["checks"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
