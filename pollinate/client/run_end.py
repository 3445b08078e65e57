"""The ClientApp's answer to the coordinator's run-end message: the marker ``pollinate join`` waits for."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict

from pollinate.common.run_end import RUN_END_FILE_KEY, RUN_END_SECTION, RunEnd, write_run_end


def note_run_end(msg: Message, context: Context) -> Message:
    """Write the run-end marker where this node's config says (only ``pollinate join`` sets one; a simulated
    node has none and just acknowledges), then acknowledge."""
    if (path := context.node_config.get(RUN_END_FILE_KEY)) is not None:
        rounds = msg.content[RUN_END_SECTION]["rounds"] if RUN_END_SECTION in msg.content else 0
        write_run_end(Path(str(path)), RunEnd(run_id=int(context.run_id), rounds=int(rounds)))
    return Message(content=RecordDict(), reply_to=msg)
