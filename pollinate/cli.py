"""The ``pollinate`` command: parse the flags, build the config, call into the package.

Bad input exits 2 with a one-line message; deployment commands exit 1 when a run or join fails, 130 when stopped.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pollinate.common.config import ConfigError, RunConfig
from pollinate.common.config_io import build_config, describe_fields, to_toml
from pollinate.common.data import DataError
from pollinate.common.models import ModelError
from pollinate.common.suggest import did_you_mean
from pollinate.dashboard.cli import add_dashboard_option, add_dashboard_parser, cmd_dashboard, dashboard_options
from pollinate.export.commands import HANDLERS as RUN_TOOL_HANDLERS
from pollinate.export.commands import add_parsers as add_run_tool_parsers
from pollinate.methods import METHODS

USER_ERRORS = (ConfigError, DataError, ModelError)
DESCRIPTION = "Fine-tune transformer models with federated and split learning, on Flower."
QUICK_START = """\
quick start:
  pollinate simulate                      a federated run of simulated clients here (built-in model, task)
  pollinate simulate --method fedpipe     the same with another method (see --method)
  pollinate bench                         methods side by side on one setup

after a run (RUN_DIR: its --out):
  pollinate generate RUN_DIR --prompt "What is 37 + 45?"   answer with the trained model
  pollinate eval RUN_DIR --data FILE                       its metric on any data file
  pollinate export RUN_DIR --adapter OUT                   a PEFT adapter with a model card (or --merged OUT)

deploy on several machines:
  pollinate keys init DIR --host NAME     TLS certificates for the coordinator (then `keys node` per client)
  pollinate coordinator --certs DIR --node-key CLIENT.pub ...
  pollinate join --coordinator HOST:PORT --certs ca.crt --key CLIENT --data FILE

`pollinate COMMAND --help` lists a command's options and every config key."""

# Dedicated flags -> config keys (everything else: --set section.key=value).
FLAG_KEYS = {
    "method": "method", "model": "model.name", "data": "data.source", "clients": "federation.clients",
    "rounds": "federation.rounds", "seed": "federation.seed", "out": "output.dir", "scenario": "federation.scenario",
}


def _config_reference() -> str:
    rows = describe_fields(RunConfig)
    width = max(len(key) for key, _, _ in rows)
    lines = ["config keys (TOML sections, or --set section.key=value):"]
    lines += [f"  {key:<{width}}  {help_} (default {default})" for key, default, help_ in rows]
    return "\n".join(lines)


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="run.toml with any of the config sections below")
    parser.add_argument("--method", choices=sorted(METHODS), help="fine-tuning method (method)")
    parser.add_argument("--model", help="preset or local HF model directory (model.name)")
    parser.add_argument("--data", help="built-in task, .jsonl/.csv file or saved dataset dir (data.source)")
    parser.add_argument("--clients", type=int, help="number of clients (federation.clients)")
    parser.add_argument("--rounds", type=int, help="federated rounds (federation.rounds)")
    parser.add_argument("--seed", type=int, help="run seed (federation.seed)")
    parser.add_argument("--scenario", choices=("uniform", "tiers", "mixed"),
                        help="resource profiles of simulated clients (federation.scenario)")
    parser.add_argument("--out", help="run directory (output.dir)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key (repeatable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = [f"{key}={_toml_value(getattr(args, flag))}" for flag, key in FLAG_KEYS.items()
                 if getattr(args, flag, None) is not None]
    return build_config(args.config, [*overrides, *args.set])


def _toml_value(value: object) -> str:
    return str(value) if isinstance(value, int) else '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Parser(argparse.ArgumentParser):
    """argparse with a "did you mean" for a mistyped choice (a command, --method, --scenario)."""

    def _check_value(self, action: argparse.Action, value: object) -> None:
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            raise argparse.ArgumentError(action, f"{exc.message}{did_you_mean(str(value), action.choices)}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pollinate")
    except PackageNotFoundError:  # run from a source tree without installing
        from pollinate import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="pollinate", description=DESCRIPTION, epilog=QUICK_START, formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"pollinate {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    simulate = sub.add_parser("simulate", help="run N simulated clients on this machine (Flower + Ray)",
                              epilog=_config_reference(), formatter_class=fmt)
    _add_run_options(simulate)
    simulate.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    simulate.add_argument("--resume", metavar="RUN_DIR",
                          help="continue RUN_DIR after its last complete round (config: its config.toml unless "
                               "--config/flags are given, which must then match the checkpoint's)")
    add_dashboard_option(simulate, "server.crt/server.key for a dashboard off loopback (`pollinate keys init`)")

    bench = sub.add_parser("bench", help="run several methods on the same setup, side by side (table + plots)",
                           epilog=_config_reference(), formatter_class=fmt)
    _add_run_options(bench)
    bench.add_argument("--methods", default="fedavg-lora,fedpipe",
                       help="comma-separated methods; the first is the baseline (default fedavg-lora,fedpipe)")
    bench.add_argument("--method-set", action="append", default=[], metavar="METHOD:SECTION.KEY=VALUE",
                       help="an override for one method only, e.g. 'fedavg-full:train.lr=1e-4' (full fine-tuning "
                            "wants a smaller step than LoRA); repeatable. Data, partition, seeds stay shared")
    bench.add_argument("--compute-baseline", metavar="METHOD",
                       help="one of --methods: add a column of each method's client compute relative to it "
                            "(e.g. fedavg-full, SFPrompt's comparison)")
    bench.add_argument("--memory-probe", action="store_true",
                       help="also measure one client's peak training memory per base precision (32/8/4 bits)")
    bench.add_argument("--resume", action="store_true",
                       help="continue a bench in --out: reuse the methods that finished, resume one that stopped "
                            "from its last checkpoint (its config must be the same)")
    bench.add_argument("--centralized", action="store_true",
                       help="also run the baseline (first of --methods, fedavg-lora or fedavg-full) as one client "
                            "on the union of the clients' training data, with the same total steps per round as "
                            "all sampled clients (centralized-total) and with the same sequential steps "
                            "(centralized-sequential); the tables give each method's metric and loss over both")

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective config as TOML", epilog=_config_reference(),
                                 formatter_class=fmt)
    _add_run_options(show)
    add_dashboard_parser(sub)
    _add_deploy_parsers(sub, fmt)
    add_run_tool_parsers(sub)
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pollinate.dashboard.launch import dashboard_running
    from pollinate.server.strategy import RunStalled
    from pollinate.simulations.run import default_run_dir, simulate
    from pollinate.simulations.stopping import SimulationInterrupted

    cfg, resume_dir = config_and_resume(args)
    run_dir = resume_dir or default_run_dir(cfg)
    dashboard = dashboard_options(args, None)
    console = Console(stderr=True, soft_wrap=True)
    console.print(f"pollinate simulate: {cfg.method} on {cfg.model.name}, task {cfg.data.source}, "
                  f"{cfg.federation.clients} clients x {cfg.federation.rounds} rounds -> {run_dir}")
    try:
        with dashboard_running(run_dir, dashboard):
            report = simulate(cfg, run_dir, quiet=args.quiet, resume=resume_dir is not None)
    except SimulationInterrupted as stopped:  # Ctrl-C / SIGTERM: 130 / 143, and how to resume
        print(f"pollinate simulate: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except RunStalled as stalled:  # no update accepted for federation.max_skipped_rounds rounds
        print(f"pollinate simulate: {stalled}; fix that, then resume with: pollinate simulate --resume {run_dir}",
              file=sys.stderr)
        return 1
    _print_summary(report, run_dir, "report.md, metrics.jsonl, adapter/")
    return 0


def _print_summary(report: dict[str, Any], run_dir: Path, also: str) -> None:
    from rich.console import Console

    from pollinate.common.report import summary_table

    Console(stderr=True).print(summary_table(report))
    print(f"report: {run_dir / 'report.json'}  (and {also})")


def cmd_bench(args: argparse.Namespace) -> int:
    from pollinate.simulations.bench import bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        hint = did_you_mean(unknown[0], METHODS) if unknown else ""
        raise ConfigError(f"--methods {args.methods!r}: unknown {unknown}{hint}; expected some of {sorted(METHODS)}")
    if args.compute_baseline and args.compute_baseline not in methods:
        raise ConfigError(f"--compute-baseline {args.compute_baseline!r}: expected one of --methods {methods}")
    per_method = method_overrides(args.method_set, methods)
    out_dir = args.out
    args.out, args.method = None, None
    cfg = config_from_args(args)  # validates everything once, before any run starts
    run_args = [*(["--config", args.config] if args.config else []), *sum((["--set", s] for s in args.set), [])]
    for flag in ("model", "data", "clients", "rounds", "seed", "scenario"):
        if getattr(args, flag) is not None:
            run_args += [f"--{flag}", str(getattr(args, flag))]
    for overrides in per_method.values():
        build_config(args.config, [*args.set, *overrides])  # each method's own config must validate too
    from pathlib import Path

    out = Path(out_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    probe = None
    if args.memory_probe:
        probe = {"model": cfg.model.name, "bits": [32, 8, 4], "rank": cfg.lora.r,
                 "batch_size": cfg.train.batch_size, "seq_len": cfg.model.max_seq_len}
    references = centralized_references(args, methods[0], per_method.get(methods[0], [])) if args.centralized else {}
    runs = [*methods, *references]
    print(f"bench: {', '.join(runs)} on {cfg.model.name} / {cfg.data.source} -> {out}", file=sys.stderr)
    bench(methods, run_args, out, probe, per_method, compute_baseline=args.compute_baseline, references=references,
          resume=args.resume)
    print((out / "bench.md").read_text())
    return 0


def centralized_references(args: argparse.Namespace, baseline: str, overrides: list[str]) -> dict[str, list[str]]:
    """``--centralized``: each reference run's overrides on top of the baseline's, all validated before any run."""
    from pollinate.simulations.centralized import reference_overrides

    base_args = argparse.Namespace(**{**vars(args), "method": baseline, "set": [*args.set, *overrides]})
    references = reference_overrides(config_from_args(base_args))
    for sets in references.values():
        config_from_args(argparse.Namespace(**{**vars(base_args), "set": [*base_args.set, *sets]}))
    return references


def method_overrides(items: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``METHOD:section.key=value`` items grouped by method; the method must be one being benched."""
    grouped: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError(f"--method-set {item!r}: expected METHOD:section.key=value")
        if method not in methods:
            raise ConfigError(f"--method-set {item!r}: method {method!r} is not in --methods {methods}")
        grouped.setdefault(method, []).append(override)
    return grouped


def config_and_resume(args: argparse.Namespace) -> tuple[RunConfig, Path | None]:
    """The run config, and with ``--resume RUN_DIR`` that directory, checked against its checkpoint.

    On resume the config is RUN_DIR/config.toml unless ``--config`` is given; flags and ``--set`` apply on top;
    output.dir becomes RUN_DIR. A config that differs from the checkpoint's raises ``ResumeError`` (naming
    the field) before anything is written.
    """
    if not getattr(args, "resume", None):
        return config_from_args(args), None
    from pollinate.server.checkpoint import find_resume_point, saved_config

    run_dir = Path(args.resume).expanduser().resolve()
    if args.out and Path(args.out).expanduser().resolve() != run_dir:
        raise ConfigError(f"--out {args.out} contradicts --resume {args.resume}: a resumed run writes into its "
                          "own directory")
    toml_path = args.config or saved_config(run_dir)
    overrides = [f"{key}={_toml_value(getattr(args, flag))}" for flag, key in FLAG_KEYS.items()
                 if flag != "out" and getattr(args, flag, None) is not None]
    cfg = build_config(toml_path, [*overrides, *args.set, f"output.dir={_toml_value(str(run_dir))}"])
    find_resume_point(run_dir, cfg)
    return cfg, run_dir


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(config_from_args(args)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"simulate": cmd_simulate, "config": cmd_config, "bench": cmd_bench,
                "coordinator": cmd_coordinator, "join": cmd_join, "keys": cmd_keys, "dashboard": cmd_dashboard,
                **RUN_TOOL_HANDLERS}
    try:
        return handlers[args.command](args)
    except USER_ERRORS as exc:
        print(f"pollinate: error: {exc}", file=sys.stderr)
        return 2


# --- deployment: coordinator, join, keys ----------------------------------------------------------------------
def _add_deploy_parsers(sub: argparse._SubParsersAction, fmt: type[argparse.HelpFormatter]) -> None:
    from pollinate.deploy.coordinator import DEFAULT_PORT
    from pollinate.deploy.parsers import add_join_parser, add_keys_parser

    coordinator = sub.add_parser(
        "coordinator", formatter_class=fmt, epilog=_config_reference(),
        help="run a federated job for clients on other machines (Flower SuperLink; TLS + node auth)")
    _add_run_options(coordinator)
    coordinator.add_argument("--host", default="0.0.0.0",
                             help="interface to listen on (default 0.0.0.0: all; 127.0.0.1 for local tests)")
    coordinator.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    coordinator.add_argument("--certs", metavar="DIR", help="directory made by `pollinate keys init` (TLS)")
    coordinator.add_argument("--node-key", action="append", default=[], metavar="PUB",
                             help="public key of a client allowed to join (`pollinate keys node`); repeatable")
    coordinator.add_argument("--insecure", action="store_true",
                             help="no TLS, no client authentication: trusted local networks only")
    coordinator.add_argument("--public-address", metavar="HOST:PORT",
                             help="address clients dial, shown in the join command (default: this host)")
    coordinator.add_argument("--resume", metavar="RUN_DIR",
                             help="continue RUN_DIR after its last complete round (see `simulate --resume`)")
    add_dashboard_option(coordinator, "server.crt/server.key for a dashboard off loopback (default: --certs)")

    add_join_parser(sub)
    add_keys_parser(sub)


def _deploy_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Deployment failures as one clear line: bad input exits 2, a failed run or join 1, Ctrl-C/SIGTERM 130."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        from pollinate.deploy.coordinator import CoordinatorError, PortInUseError
        from pollinate.deploy.join import JoinError

        try:
            return handler(args)
        except (*USER_ERRORS, PortInUseError, FileNotFoundError, FileExistsError, PermissionError,
                ValueError) as exc:
            print(f"pollinate: error: {exc}", file=sys.stderr)
            return 2
        except (CoordinatorError, JoinError) as exc:
            print(f"pollinate: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"pollinate {args.command}: stopped", file=sys.stderr)
            return 130

    return wrapped


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


@_deploy_errors
def cmd_coordinator(args: argparse.Namespace) -> int:
    from pollinate.deploy.commands import coordinate

    cfg, resume_dir = config_and_resume(args)
    run_dir = coordinate(cfg, resume_dir, host=args.host, port=args.port, certs_dir=_path(args.certs),
                         node_keys=[Path(p) for p in args.node_key], insecure=args.insecure,
                         public_address=args.public_address, dashboard=dashboard_options(args, _path(args.certs)))
    _print_summary(json.loads((run_dir / "report.json").read_text()), run_dir,
                   "report.md, metrics.jsonl, checkpoints/, adapter/")
    return 0


@_deploy_errors
def cmd_join(args: argparse.Namespace) -> int:
    from pollinate.deploy.commands import join_coordinator

    join_coordinator(args.coordinator, Path(args.data), certs=_path(args.certs), key=_path(args.key),
                     insecure=args.insecure, partition_id=args.partition_id, profile=_path(args.profile),
                     work_dir=_path(args.work_dir), retry_budget_s=args.retry_budget, worker=not args.no_worker)
    return 0


@_deploy_errors
def cmd_keys(args: argparse.Namespace) -> int:
    from pollinate.deploy.commands import make_certs, make_node_key

    if args.keys_command == "init":
        make_certs(Path(args.dir), args.host, days=args.days, overwrite=args.overwrite)
    else:
        make_node_key(Path(args.dir), args.name, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
