"""Follow a growing ``metrics.jsonl``: read what was appended since the last look, one JSON object per line.

The file is untrusted input for the dashboard: a line that is not a JSON object, or longer than
``MAX_LINE_BYTES``, is skipped; a last line still being written (no newline yet) waits for the next read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MAX_LINE_BYTES = 1 << 20  # a round record with a few hundred clients' evaluation is far below this
MAX_READ_BYTES = 8 << 20  # per call: a huge file is caught up over several polls, memory stays bounded


class MetricsTail:
    """Incremental reader of one JSON-lines file.

    Parameters
    ----------
    path : Path
        The file to follow; it may not exist yet (then ``read`` returns nothing until it does).
    max_line_bytes : int, default MAX_LINE_BYTES
        Longer lines are dropped whole.
    max_read_bytes : int, default MAX_READ_BYTES
        At most this much is read per ``read`` call.
    """

    def __init__(self, path: Path, max_line_bytes: int = MAX_LINE_BYTES, max_read_bytes: int = MAX_READ_BYTES):
        self.path = Path(path)
        self.max_line_bytes = max_line_bytes
        self.max_read_bytes = max_read_bytes
        self.offset = 0
        self.skipped = 0  # malformed or oversized lines seen so far
        self._partial = b""
        self._dropping = False  # inside an oversized line: discard until its newline
        self._identity: tuple[int, int] | None = None
        self.restarts = 0  # times the file was replaced or truncated: earlier events no longer hold

    def read(self) -> list[dict[str, Any]]:
        """The complete JSON-object lines appended since the last call (malformed ones skipped)."""
        try:
            with open(self.path, "rb") as fh:
                stat = os.fstat(fh.fileno())
                self._restart_if_replaced((stat.st_dev, stat.st_ino), stat.st_size)
                fh.seek(self.offset)
                chunk = fh.read(self.max_read_bytes)
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        return [event for line in self._complete_lines(chunk) if (event := self._parse(line)) is not None]

    def _restart_if_replaced(self, identity: tuple[int, int], size: int) -> None:
        """A new file under the same name, or one cut shorter, is read again from its start."""
        if identity != self._identity or size < self.offset:
            self.restarts += self._identity is not None
            self._identity = identity
            self.offset, self._partial, self._dropping = 0, b"", False

    def _complete_lines(self, chunk: bytes) -> list[bytes]:
        if self._dropping:  # the rest of an oversized line: discard through its newline
            cut = chunk.find(b"\n")
            if cut < 0:
                return []
            chunk, self._dropping = chunk[cut + 1:], False
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > self.max_line_bytes:
            self._partial, self._dropping = b"", True
            self.skipped += 1
        return lines

    def _parse(self, line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        if len(line) > self.max_line_bytes:
            self.skipped += 1
            return None
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            self.skipped += 1
            return None
        if not isinstance(event, dict):
            self.skipped += 1
            return None
        return event
