"""Durations and sizes as people type and read them, for every command that takes or shows one.

One parser and one formatter, so `qlorax gc --older-than` and `qlorax cache gc --older-than`
accept the same spellings and `gc` and `cache ls` print sizes the same way.
"""

from __future__ import annotations

import re
from typing import Any

from qlorax.errors import QloraxError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str = "--older-than", *, unit_required: bool = False) -> float:
    """Seconds from "90s", "30m", "12h", "7d" or "2w" (a bare "90" is seconds unless a unit is
    required, where a bare number would be ambiguous); a QloraxError (exit 2) naming `option`."""
    match = _DURATION.match(text or "")
    if not match or (unit_required and not match[2]):
        bare = "" if unit_required else "; a bare number means seconds"
        raise QloraxError(
            f"{option} {text!r} is not a duration: use a number with a unit s, m, h, d or w "
            f"(for example 36h, 7d, 2w){bare}."
        )
    return float(match[1]) * _UNIT_SECONDS[match[2].lower()]


def format_age(seconds: float) -> str:
    """A short human age ('3d 4h', '5h 2m', '7m')."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"


def format_size(size: Any) -> str:
    """Bytes in binary units, one decimal ('512 B', '1.5 MiB'); '?' when the size is unknown."""
    if not isinstance(size, int | float) or isinstance(size, bool):
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
