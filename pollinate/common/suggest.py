"""A "did you mean …?" for a misspelled name (config key, preset, method, field), from ``difflib``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[object], cutoff: float = 0.6) -> str | None:
    """The choice most like ``word`` (difflib's ratio at least ``cutoff``), or None."""
    names = [str(c) for c in choices]
    matches = difflib.get_close_matches(str(word), names, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[object], prefix: str = "") -> str:
    """``" (did you mean 'x'?)"`` to append to an error message (the match shown after ``prefix``, e.g. a
    config section), or ``""`` when nothing is close."""
    match = closest(word, choices)
    return f" (did you mean '{prefix}{match}'?)" if match is not None else ""
