"""``pollinate``: parse, build the config, call into the package. Bad input exits 2 with a message."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from pollinate.common.config import ConfigError, RunConfig, build_config, describe_fields, to_toml
from pollinate.common.data import DataError
from pollinate.common.models import ModelError
from pollinate.methods import METHODS

USER_ERRORS = (ConfigError, DataError, ModelError)

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
    parser.add_argument("--out", help="run directory (output.dir; default runs/<timestamp>)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config key (repeatable)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    overrides = [f"{key}={_toml_value(getattr(args, flag))}" for flag, key in FLAG_KEYS.items()
                 if getattr(args, flag, None) is not None]
    return build_config(args.config, [*overrides, *args.set])


def _toml_value(value: object) -> str:
    return str(value) if isinstance(value, int) else '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pollinate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    simulate = sub.add_parser("simulate", help="run N simulated clients on this machine (Flower + Ray)",
                              epilog=_config_reference(), formatter_class=fmt)
    _add_run_options(simulate)
    simulate.add_argument("--quiet", action="store_true", help="no per-round progress lines")

    bench = sub.add_parser("bench", help="run several methods on the same setup, side by side (table + plots)",
                           epilog=_config_reference(), formatter_class=fmt)
    _add_run_options(bench)
    bench.add_argument("--methods", default="fedavg-lora,fedpipe",
                       help="comma-separated methods; the first is the baseline (default fedavg-lora,fedpipe)")
    bench.add_argument("--memory-probe", action="store_true",
                       help="also measure one client's peak training memory per base precision (32/8/4 bits)")

    config = sub.add_parser("config", help="inspect configuration")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the effective config as TOML", epilog=_config_reference(),
                                 formatter_class=fmt)
    _add_run_options(show)
    return parser


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from pollinate.simulations.run import default_run_dir, simulate

    cfg = config_from_args(args)
    run_dir = default_run_dir(cfg)
    console = Console(stderr=True)
    console.print(f"pollinate simulate: {cfg.method} on {cfg.model.name}, task {cfg.data.source}, "
                  f"{cfg.federation.clients} clients x {cfg.federation.rounds} rounds -> {run_dir}")
    report = simulate(cfg, run_dir, quiet=args.quiet)
    from pollinate.common.report import summary_table

    console.print(summary_table(report))
    print(f"report: {run_dir / 'report.json'}  (and report.md, metrics.jsonl, adapter/)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from pollinate.simulations.bench import bench

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ConfigError(f"--methods {args.methods!r}: unknown {unknown}; expected some of {sorted(METHODS)}")
    out_dir = args.out
    args.out, args.method = None, None
    cfg = config_from_args(args)  # validates everything once, before any run starts
    run_args = [*(["--config", args.config] if args.config else []), *sum((["--set", s] for s in args.set), [])]
    for flag in ("model", "data", "clients", "rounds", "seed", "scenario"):
        if getattr(args, flag) is not None:
            run_args += [f"--{flag}", str(getattr(args, flag))]
    from pathlib import Path

    out = Path(out_dir or f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}")
    probe = None
    if args.memory_probe:
        probe = {"model": cfg.model.name, "bits": [32, 8, 4], "rank": cfg.lora.r,
                 "batch_size": cfg.train.batch_size, "seq_len": cfg.model.max_seq_len}
    print(f"bench: {', '.join(methods)} on {cfg.model.name} / {cfg.data.source} -> {out}", file=sys.stderr)
    bench(methods, run_args, out, probe)
    print((out / "bench.md").read_text())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(config_from_args(args)), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"simulate": cmd_simulate, "config": cmd_config, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except USER_ERRORS as exc:
        print(f"pollinate: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
