"""The end of a deployed run, as the coordinator tells its clients: so `pollinate join` exits instead of rejoining.

Once every round is done, the coordinator's ServerApp sends each connected node one ``query.run_finished``
message. The ClientApp answers it and writes a small marker file at the path ``pollinate join`` put in its
node config (``run-end-file``); ``join`` watches that file and exits 0. A coordinator that merely restarts sends
nothing, so its clients rejoin. Only the authenticated coordinator's (signed) ServerApp reaches a ClientApp, and
the marker path comes from the node's own config, so no peer can make a client exit or write elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.app import MessageType

RUN_END_ACTION = "run_finished"
RUN_END_MESSAGE_TYPE = f"{MessageType.QUERY}.{RUN_END_ACTION}"
# Node config key: where the ClientApp writes the marker (set by `pollinate join`, absent in simulation).
RUN_END_FILE_KEY = "run-end-file"
RUN_END_SECTION = "run-end"


@dataclass(frozen=True)
class RunEnd:
    """What a node learnt of its finished run.

    Parameters
    ----------
    run_id : int
        Flower's run id.
    rounds : int
        Rounds the run completed.
    """

    run_id: int
    rounds: int


def write_run_end(path: Path, end: RunEnd) -> None:
    """Write the marker atomically (a watcher never reads half of it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"run_id": end.run_id, "rounds": end.rounds}))
    os.replace(tmp, path)


def read_run_end(path: Path) -> RunEnd | None:
    """The marker at ``path``, or None when there is none (or it is not one this module wrote)."""
    try:
        data = json.loads(Path(path).read_text())
        return RunEnd(run_id=int(data["run_id"]), rounds=int(data["rounds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
