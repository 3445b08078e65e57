"""A finished run, used outside training: export it (a portable PEFT adapter with a model card, or a merged
model), generate with it, evaluate it on any file. ``pollinate export | generate | eval RUN_DIR``.

Everything starts from the run directory: its ``config.toml`` (model, data fields, LoRA settings), its
per-round checkpoints (the global state after each round) and ``report.json``.
"""
