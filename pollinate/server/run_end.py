"""The coordinator's last message of a deployed run: each connected client hears that the run is complete
(see ``pollinate.common.run_end``), so its ``pollinate join`` exits instead of waiting for a restart."""

from __future__ import annotations

from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from pollinate.common.run_end import RUN_END_MESSAGE_TYPE, RUN_END_SECTION

# Long enough for a client to start a ClientApp process and answer; the run's results are already written.
RUN_END_TIMEOUT_S = 30.0


def announce_run_end(grid: Grid, rounds: int, timeout_s: float = RUN_END_TIMEOUT_S) -> int:
    """Tell every connected node that the run completed ``rounds`` rounds; returns how many acknowledged.

    A node that does not answer within ``timeout_s`` (it left, or is slow) is not waited for: its ``join``
    falls back to its retry budget.
    """
    nodes = list(grid.get_node_ids())
    if not nodes:
        return 0
    messages = [
        Message(content=RecordDict({RUN_END_SECTION: ConfigRecord({"rounds": rounds})}), dst_node_id=node,
                message_type=RUN_END_MESSAGE_TYPE)
        for node in nodes
    ]
    try:
        replies = grid.send_and_receive(messages, timeout=timeout_s)
    except Exception as err:  # noqa: BLE001 - the run's results are written; a failed notice must not fail it
        log(WARNING, "run end: could not tell the clients (%s); their `pollinate join` ends after its retry budget",
            err)
        return 0
    acknowledged = sum(1 for reply in replies if not reply.has_error())
    log(INFO, "run end: %d of %d connected clients acknowledged", acknowledged, len(nodes))
    return acknowledged
