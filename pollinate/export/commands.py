"""The ``export``, ``generate`` and ``eval`` commands: their flags and what they print (``pollinate.cli`` adds
them). Bad input exits 2 with one line; heavy imports wait until a command runs."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

Handler = Callable[[argparse.Namespace], int]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add the three commands to ``sub`` (their handlers: ``HANDLERS``)."""
    export = sub.add_parser(
        "export", help="write a finished run's model as a PEFT adapter or a merged model",
        description="Write the run's model after its last (or --round N) checkpointed round: --adapter OUT, a "
                    "PEFT adapter with a model card (base_model_name_or_path is the base's Hugging Face id), "
                    "and/or --merged OUT, the adapter merged into the base with its tokenizer (loadable with "
                    "AutoModelForCausalLM / AutoModelForSequenceClassification).")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (--out of the run)")
    export.add_argument("--adapter", metavar="OUT", help="write the PEFT adapter and its README.md here")
    export.add_argument("--merged", metavar="OUT", help="write the merged model, tokenizer and README.md here")
    export.add_argument("--base-id", metavar="HUB_ID",
                        help="the base model's Hugging Face id for adapter_config.json (known for the presets)")
    export.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    _add_round(export)

    generate = sub.add_parser(
        "generate", help="answer prompts with a finished run's model (its prompt template)",
        description="Greedy answers of the run's model to prompts in the run's template; a classifier prints "
                    "each text's class. --file reads a .jsonl file (objects with the run's prompt field, or "
                    "strings) and prints one JSON object per line.")
    generate.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    given = generate.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    given.add_argument("--file", metavar="JSONL", help="prompts, one per line")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                          help="most tokens generated per answer (default 64; it stops at end of sequence)")
    _add_round(generate)

    evaluate = sub.add_parser(
        "eval", help="a finished run's metric and eval loss on any data file",
        description="Evaluate the run's model on every example of a data file, read with the run's fields "
                    "(data.prompt_field, ...) and scored as the run scored each round (exact match or "
                    "accuracy). --data skills repeats the run's own held-out evaluation.")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="the run directory")
    evaluate.add_argument("--data", required=True, metavar="FILE", help=".jsonl/.csv file, directory or saved dataset")
    evaluate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                          help="change how the file is read or scored: data.* and eval.* keys (repeatable)")
    evaluate.add_argument("--max-examples", type=int, default=0, metavar="N", help="evaluate the first N (default all)")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_round(evaluate)


def _add_round(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--round", type=int, metavar="N", help="use the checkpoint of round N (default: the last)")


def _user_errors(handler: Handler) -> Handler:
    """A run that cannot be used as asked, or bad input: one line, exit 2."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        from pollinate.common.config import ConfigError
        from pollinate.common.data import DataError
        from pollinate.common.models import ModelError
        from pollinate.export.run import ExportError

        try:
            return handler(args)
        except (ExportError, ConfigError, DataError, ModelError) as exc:
            print(f"pollinate {args.command}: error: {exc}", file=sys.stderr)
            return 2

    return wrapped


def _open(args: argparse.Namespace):
    """The run, after quieting library chatter (load progress bars, deprecation warnings)."""
    import warnings

    from transformers.utils import logging as hf_logging

    from pollinate.common.environment import QUIET_ENV, set_env_defaults
    from pollinate.export.run import open_run

    set_env_defaults(QUIET_ENV)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    run = open_run(args.run_dir)
    args.round = run.pick_round(args.round)
    print(f"{run.cfg.method} run '{run.run_dir}' ({run.cfg.model.name}): round {args.round}", file=sys.stderr)
    return run


def _load(args: argparse.Namespace):
    from pollinate.export.weights import trained_model

    run = _open(args)
    return run, trained_model(run, args.round)


@_user_errors
def cmd_export(args: argparse.Namespace) -> int:
    from pollinate.export.export import export_run

    run = _open(args)
    adapter, merged = (Path(p) if p else None for p in (args.adapter, args.merged))
    for done in export_run(run, adapter, merged, args.round, args.base_id, args.overwrite):
        print(f"{done.kind} (round {done.server_round}): {done.path}  [base {done.base}]")
        if done.kind == "adapter" and done.base == run.model.path:
            print("note: adapter_config.json names the base by its local path; pass --base-id ORG/NAME for its "
                  "Hugging Face id", file=sys.stderr)
    return 0


@_user_errors
def cmd_generate(args: argparse.Namespace) -> int:
    from pollinate.export.generate import read_prompts, respond
    from pollinate.export.run import ExportError

    if args.max_new_tokens < 1:
        raise ExportError(f"--max-new-tokens {args.max_new_tokens}: expected an int >= 1")
    run, trained = _load(args)
    field = run.cfg.data.prompt_field if run.task_type == "generation" else run.cfg.data.text_field
    prompts = args.prompt or read_prompts(Path(args.file), field)
    answers = respond(run, trained, prompts, args.max_new_tokens)
    key = "response" if run.task_type == "generation" else "label"
    for prompt, answer in zip(prompts, answers, strict=True):
        print(answer if args.prompt else json.dumps({"prompt": prompt, key: answer}, ensure_ascii=False))
    return 0


@_user_errors
def cmd_eval(args: argparse.Namespace) -> int:
    from pollinate.common.report import headline_metric
    from pollinate.export.evaluate import evaluate_file
    from pollinate.export.run import ExportError

    if args.max_examples < 0:
        raise ExportError(f"--max-examples {args.max_examples}: expected an int >= 0 (0 = all)")
    run, trained = _load(args)
    result = evaluate_file(run, trained, args.data, args.set, args.max_examples)
    if args.json:
        print(json.dumps({"run_dir": str(run.run_dir), "data": args.data, **result}))
        return 0
    name, value = headline_metric(result["eval_metrics"])
    groups = {k.split("/", 1)[1]: v for k, v in result["eval_metrics"].items() if "/" in k}
    per_group = f" ({', '.join(f'{k} {v:.3f}' for k, v in groups.items())})" if groups else ""
    print(f"{args.data}: {result['examples']} examples, round {result['round']}: eval_loss {result['eval_loss']:.4f}, "
          f"{name} {value:.3f}{per_group}")
    return 0


HANDLERS: dict[str, Handler] = {"export": cmd_export, "generate": cmd_generate, "eval": cmd_eval}
