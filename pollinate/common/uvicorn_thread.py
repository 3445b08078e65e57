"""Waiting for a uvicorn server run in a background thread (the Fleet gateway, the dashboard) to come up."""

from __future__ import annotations

import threading
from typing import Any


def wait_until_started(server: Any, thread: threading.Thread, timeout_s: float) -> bool:
    """Poll ``server.started`` until it is true, the thread died, or ``timeout_s`` passed; whether it started."""
    for _ in range(int(timeout_s / 0.02)):
        if server.started or not thread.is_alive():
            break
        threading.Event().wait(0.02)
    return bool(server.started)
