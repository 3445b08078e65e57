"""Round overhead, side by side: the same FedAvg-LoRA work run by Pollinate and by a plain Flower + peft app.

``python -m pollinate.simulations.overhead_probe --out runs/overhead`` runs, one after the other, each in its own
process: ``pollinate simulate`` and ``simulations/plain_flower_app.py``, with SmolLM2 on Dolly (one category per
client, prompt = instruction), ``--local-steps`` steps of ``--batch-size`` × 64 tokens, LoRA r8 on q/v. Both use
Flower's simulation engine with one CPU per client. Per round it compares the round's wall time without
evaluation (Pollinate: ``seconds`` minus its server and client evaluation; the plain app evaluates nothing) with
the ideal, Σ client training seconds ÷ parallel slots (the engine's workers), and prints one JSON line per app
and a Markdown table. Round 1 includes the workers' start and model loads: the summary uses the rounds after it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean
from typing import Any

from pollinate.common.models import resolve_model

ROOT = Path(__file__).resolve().parents[2]


def pollinate_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """``pollinate simulate`` doing the plain app's work; evaluation only after the last round, no client eval."""
    sets = {"data.partition": "pathological", "data.partition_by": "category", "data.classes_per_client": 1,
            "data.prompt_field": "instruction", "data.response_field": "response", "data.eval_examples": 8,
            "train.local_steps": args.local_steps, "train.batch_size": args.batch_size, "model.max_seq_len": 64,
            "lora.r": 8, "lora.target_modules": "q_proj,v_proj", "eval.client_fraction": 0,
            "eval.every": args.rounds, "output.plots": "false", "federation.seed": args.seed}
    argv = [sys.executable, "-m", "pollinate.cli", "simulate", "--model", args.model, "--data", args.data,
            "--clients", str(args.clients), "--rounds", str(args.rounds), "--out", str(out)]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def pollinate_rounds(run_dir: Path) -> list[dict[str, Any]]:
    """Per round: wall seconds without evaluation and the clients' training seconds."""
    report = json.loads((run_dir / "report.json").read_text())
    rounds = []
    for record in report["rounds"]:
        timing = record["timing"]
        evaluation = (timing.get("eval_seconds") or 0.0) + (timing.get("client_eval_seconds") or 0.0)
        rounds.append({"round": record["round"], "seconds": record["seconds"] - evaluation,
                       "client_train_seconds": [c["train_seconds"] for c in record["clients"]
                                                if c.get("train_seconds") is not None]})
    return rounds


def summarize(app: str, rounds: list[dict[str, Any]], slots: int) -> dict[str, Any]:
    """Mean over rounds after the first: wall, Σ client training, the ideal (Σ ÷ slots) and wall ÷ ideal."""
    later = rounds[1:] or rounds
    wall = mean(r["seconds"] for r in later)
    train = mean(sum(r["client_train_seconds"]) for r in later)
    ideal = train / slots
    return {"app": app, "rounds": len(rounds), "slots": slots, "round_seconds": round(wall, 2),
            "client_train_seconds_sum": round(train, 2), "ideal_seconds": round(ideal, 2),
            "wall_over_ideal": round(wall / ideal, 3) if ideal else None,
            "overhead_seconds": round(wall - ideal, 2), "per_round": rounds}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| app | round s (no eval) | Σ client train s | ideal s (Σ ÷ slots) | wall ÷ ideal | overhead s |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['app']} | {r['round_seconds']:.1f} | {r['client_train_seconds_sum']:.1f} | "
              f"{r['ideal_seconds']:.1f} | {r['wall_over_ideal']:.2f} | {r['overhead_seconds']:.1f} |" for r in rows]
    return "\n".join(lines)


def run_plain(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    config = {"model_path": resolve_model(args.model, quiet=True).path, "data_dir": str(Path(args.data).resolve()),
              "out": str(out / "rounds.jsonl"), "clients": args.clients, "rounds": args.rounds,
              "local_steps": args.local_steps, "batch_size": args.batch_size, "seed": args.seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    with open(out / "log.txt", "wb") as log:
        subprocess.run([sys.executable, "-m", "pollinate.simulations.plain_flower_app", str(out / "config.json")],
                       cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]


def run_pollinate(args: argparse.Namespace, out: Path) -> list[dict[str, Any]]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "pollinate-log.txt", "wb") as log:
        subprocess.run(pollinate_argv(args, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    return pollinate_rounds(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "dolly"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/overhead"))
    args = parser.parse_args(argv)
    slots = min(args.clients, os.cpu_count() or 1)  # one CPU per client: the engine runs this many at once
    rows = [summarize("pollinate", run_pollinate(args, args.out / "pollinate"), slots),
            summarize("plain-flower", run_plain(args, args.out / "plain-flower"), slots)]
    for row in rows:
        print(json.dumps(row))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
