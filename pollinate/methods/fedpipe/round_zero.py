"""FedPipe's round-0 reply, read and checked: who the client is, its importance scores, example count, profile,
its examples' token lengths and (``fedpipe.measure_step``) its measured step.

Everything in it is peer-supplied: numbers are read in stated ranges, lists in bounded lengths, and anything else
is that client's rejection (``UpdateRejected``, one line naming the field and what was expected).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import RecordDict

from pollinate.common.checks import UpdateRejected
from pollinate.common.config import RunConfig
from pollinate.common.profiles import ResourceProfile
from pollinate.server.identity import NodeIdentity
from pollinate.server.replies import finite_number, integer_in, reply_metrics

__all__ = ["MAX_STEP_SECONDS", "MAX_TOKEN_LEVELS", "MeasuredStep", "PrepareReply", "read_prepare_reply"]

MAX_TOKEN_LEVELS = 64  # longest token-length summary a reply may carry
MAX_STEP_SECONDS = 86_400.0  # a measured step longer than a day is not a measurement


@dataclass(frozen=True)
class MeasuredStep:
    """Seconds per step a client measured (scaled to its profile) at each of ``bits``, with an adapter of every
    candidate module at ``rank``, at ``batch_size``, over ``tokens`` padded tokens per step on average; and the
    same at ``large_batch_size`` when it measured a second, larger batch."""

    bits: tuple[int, ...]
    seconds: tuple[float, ...]
    batch_size: int
    rank: int
    tokens: float
    large_batch_size: int = 0  # 0: measured at one batch size only
    large_seconds: tuple[float, ...] = ()
    large_tokens: float = 0.0


@dataclass(frozen=True)
class PrepareReply:
    """A checked round-0 reply."""

    client_id: int
    scores: dict[str, float]
    examples: int
    profile: ResourceProfile
    token_quantiles: tuple[int, ...]
    measured: MeasuredStep | None


def read_prepare_reply(content: RecordDict, node_id: int, identity: NodeIdentity, modules: set[str],
                       cfg: RunConfig) -> PrepareReply:
    """Client id (from its node), importance scores of ``modules``, example count, profile, token-length quantiles
    and measured step of a round-0 reply; ``UpdateRejected`` on anything malformed."""
    metrics = reply_metrics(content)
    client_id = identity.resolve(node_id, metrics.get("client_id"))
    examples = integer_in(metrics.get("num-examples"), 1, cfg.federation.max_examples_per_client,
                          "num-examples", reason="weight")
    scores = {k: finite_number(v) for k, v in _record(content, "scores").items() if k in modules}
    if any(value is None for value in scores.values()):
        raise UpdateRejected("importance scores must be finite numbers", reason="non-finite")
    try:
        profile = ResourceProfile(**dict(_record(content, "profile", config=True)))
    except (TypeError, ValueError) as exc:
        raise UpdateRejected(f"profile: {exc}") from exc
    quantiles = read_token_quantiles(_record(content, "tokens"), cfg.model.max_seq_len)
    measured = None
    if "measured_step" in content.metric_records:
        measured = read_measured_step(content["measured_step"], cfg, quantiles[-1])
    return PrepareReply(client_id, scores, examples, profile, quantiles, measured)


def _record(content: RecordDict, name: str, config: bool = False) -> Any:
    records = content.config_records if config else content.metric_records
    if name not in records:
        kind = "ConfigRecord" if config else "MetricRecord"
        raise UpdateRejected(f"prepare reply has no '{name}' {kind}", reason="garbled")
    return records[name]


def _number_list(record: Any, key: str, length: tuple[int, int]) -> list[Any]:
    values = record.get(key)
    if not isinstance(values, list) or not length[0] <= len(values) <= length[1]:
        shown = f"{len(values)} values" if isinstance(values, list) else repr(values)[:40]
        raise UpdateRejected(f"{key}: expected a list of {length[0]} to {length[1]} numbers, got {shown}")
    return values


def read_token_quantiles(record: Any, max_seq_len: int) -> tuple[int, ...]:
    """``quantiles``: 2 to ``MAX_TOKEN_LEVELS`` non-decreasing integers in ``[1, model.max_seq_len]``."""
    values = _number_list(record, "quantiles", (2, MAX_TOKEN_LEVELS))
    lengths = tuple(integer_in(v, 1, max_seq_len, "token length quantile") for v in values)
    if any(b < a for a, b in zip(lengths, lengths[1:], strict=False)):
        raise UpdateRejected(f"token length quantiles must be non-decreasing, got {list(lengths[:8])}")
    return lengths


def read_measured_step(record: Any, cfg: RunConfig, longest: int) -> MeasuredStep:
    """``bits`` (distinct, of ``fedpipe.bits``), ``seconds`` per step (one each, in ``(0, MAX_STEP_SECONDS]``),
    ``batch_size`` (of ``fedpipe.batch_sizes``), ``rank`` (of ``fedpipe.ranks``) and mean padded ``tokens`` per
    step (at most a batch of that size of this client's longest examples: ``[1, batch_size x longest]``);
    optionally ``large_batch_size`` (of ``fedpipe.batch_sizes``, above ``batch_size``) with its own
    ``large_seconds`` and ``large_tokens``, checked alike."""
    fp = cfg.fedpipe
    bits = [integer_in(b, 1, 32, "measured bits") for b in _number_list(record, "bits", (1, len(fp.bits)))]
    if any(b not in fp.bits for b in bits) or len(set(bits)) != len(bits):
        raise UpdateRejected(f"measured bits {bits} must be distinct values of fedpipe.bits = {fp.bits}")
    rank = integer_in(record.get("rank"), 1, max(fp.ranks), "measured rank")
    if rank not in fp.ranks:
        raise UpdateRejected(f"measured rank = {rank} is not one of fedpipe.ranks = {fp.ranks}")
    batch, seconds, tokens = _batch_timing(record, "", cfg, len(bits), longest)
    if record.get("large_batch_size") is None:
        return MeasuredStep(tuple(bits), seconds, batch, rank, tokens)
    large, large_seconds, large_tokens = _batch_timing(record, "large_", cfg, len(bits), longest, above=batch)
    return MeasuredStep(tuple(bits), seconds, batch, rank, tokens, large, large_seconds, large_tokens)


def _batch_timing(record: Any, prefix: str, cfg: RunConfig, n_bits: int, longest: int,
                  above: int = 0) -> tuple[int, tuple[float, ...], float]:
    """``{prefix}batch_size`` (above ``above``), ``{prefix}seconds`` (one per bits) and ``{prefix}tokens`` of a
    measured step."""
    batch_sizes = cfg.fedpipe.batch_sizes
    batch = integer_in(record.get(f"{prefix}batch_size"), 1, max(batch_sizes), f"measured {prefix}batch_size")
    if batch not in batch_sizes:
        raise UpdateRejected(f"measured {prefix}batch_size = {batch} is not one of fedpipe.batch_sizes = "
                             f"{batch_sizes}")
    if batch <= above:
        raise UpdateRejected(f"measured {prefix}batch_size = {batch} must be above batch_size = {above}")
    seconds = _number_list(record, f"{prefix}seconds", (n_bits, n_bits))
    if any(finite_number(s) is None or not 0 < s <= MAX_STEP_SECONDS for s in seconds):
        raise UpdateRejected(f"measured {prefix}seconds per step must be finite numbers in "
                             f"(0, {MAX_STEP_SECONDS:g}], got {seconds}", reason="non-finite")
    tokens = finite_number(record.get(f"{prefix}tokens"))
    if tokens is None or not 1 <= tokens <= batch * longest:
        raise UpdateRejected(f"measured {prefix}tokens per step = {repr(record.get(f'{prefix}tokens'))[:40]} is "
                             f"not a number in [1, {batch * longest}] (batch {batch} of examples up to {longest} "
                             "tokens)")
    return batch, tuple(float(s) for s in seconds), float(tokens)
