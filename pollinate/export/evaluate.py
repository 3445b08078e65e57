"""``pollinate eval``: the run's metric (exact match or accuracy) and eval loss on any data file, read with the
run's fields and evaluated exactly as the server evaluates each round (``common.evaluation.evaluate_model``).

For the built-in task, the examples are the run's own held-out evaluation split, so the result repeats the
round's reported evaluation.
"""

from __future__ import annotations

from typing import Any

from pollinate.common.data import BUILTIN_TASKS, encoder_for, load_task
from pollinate.common.evaluation import EvalExamples, evaluate_model
from pollinate.export.run import ExportError, FinishedRun, config_for_file
from pollinate.export.weights import TrainedModel


def file_examples(run: FinishedRun, tokenizer: Any, source: str, overrides: list[str],
                  max_examples: int = 0) -> tuple[EvalExamples, Any]:
    """(the examples of ``source`` as the run reads them, the config used); a classifier's labels are mapped to
    the run's class indices (a class the run never saw is an error naming it)."""
    cfg = config_for_file(run, source, overrides)
    task = load_task(cfg.data, run.task_type, cfg.federation.seed)
    rows = task.eval if cfg.data.source in BUILTIN_TASKS else task.train + task.eval
    if run.task_type == "classification":
        index = {name: i for i, name in enumerate(run.labels())}
        unknown = sorted({task.labels[r["label"]] for r in rows} - set(index))
        if unknown:
            raise ExportError(f"'{source}' has classes the run never trained on: {unknown[:5]}; the run's classes "
                              f"are {sorted(index)[:20]}")
        rows = [{**r, "label": index[task.labels[r["label"]]]} for r in rows]
    rows = rows[:max_examples] if max_examples else rows
    encode = encoder_for(run.task_type, cfg.data.template)
    encoded = [encode(r, tokenizer, cfg.model.max_seq_len) for r in rows]
    group_key = task.partition_by if run.task_type == "generation" and rows and task.partition_by in rows[0] else ""
    return EvalExamples(run.task_type, rows, encoded, group_key, cfg.data.template), cfg


def evaluate_file(run: FinishedRun, trained: TrainedModel, source: str, overrides: list[str] | None = None,
                  max_examples: int = 0) -> dict[str, Any]:
    """``{"examples", "round", "eval_loss", "eval_metrics"}`` of the run's model on ``source``."""
    examples, cfg = file_examples(run, trained.tokenizer, source, overrides or [], max_examples)
    result = evaluate_model(trained.model, examples, trained.tokenizer, cfg.eval.batch_size, cfg.eval.max_new_tokens)
    return {"examples": len(examples.rows), "round": trained.server_round, **result}
