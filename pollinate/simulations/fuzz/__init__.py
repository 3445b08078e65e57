"""Fuzz what peers send the coordinator: update replies through each method's real validation, and requests to the
SFPrompt split service over gRPC on 127.0.0.1.

``python -m pollinate.simulations.fuzz --updates 10000 --split-requests 10000 --seed 0``

Updates (split evenly over three targets): ``codec`` is FedPipe's ``decode_bundle`` with the arguments its server
passes; ``fedpipe-round`` and ``dense-round`` run one whole round of the real server half per case (tiny-llama
``FedPipe`` and ``FedAvgLora``, Flower's ``configure_train``/``aggregate_train`` hooks driven with fabricated
Messages, honest peers beside the attacker). Valid replies come from the real encoders (``encode_bundle`` in every
encoding, ``arrays_to_record``), then seeded mutations apply: bit flips, truncations, extensions, garbage, protobuf
field edits, ``.npy`` header edits, NaN/Inf/huge values, wrong names, shapes, dtypes, example counts, markup text.
Split requests: a valid Forward, Backward or CloseSession (after a valid Forward where the call needs one), then
field edits, other nodes' and revoked or expired tokens, wrong node ids, foreign or closed sessions, replayed
steps; one request at a time.

Every case is ``accepted`` (and valid when checked again here), ``rejected`` (``UpdateRejected``, the strategy's
rejection path, or a clean gRPC status), ``crash`` (any other exception, INTERNAL/UNKNOWN, no server), ``hang``
(over ``--case-timeout-s``) or ``bad-accept`` (accepted but not valid). Prints a table, then one JSON line: the
counts, the commonest reasons, what reproduces each finding, and memory (this process serves the split service).

Modules: ``mutations`` (the seeded mutator), ``tally`` (outcomes, watchdog, memory), ``bundles`` (FedPipe update
bundles and the ``codec`` target), ``replies`` (record-level edits of a reply), ``rounds`` (the round targets),
``updates`` (the update fuzzer), ``split`` (the split-service target and fuzzer), ``__main__`` (the command).
"""

