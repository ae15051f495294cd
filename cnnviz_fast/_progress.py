"""Progress bars of the long methods: one tqdm bar on stderr, shared by all of them.

``progress=None`` (the default) shows the bar only where someone watches it, on an
interactive terminal, and only once the work has run ``AUTO_DELAY_S`` seconds, so quick calls,
pipes, logs and tests stay quiet; ``True`` always shows it, ``False`` never.
"""
from __future__ import annotations

import sys

AUTO_DELAY_S = 3.0


def progress_bar(progress, desc: str, total=None, unit: str = "it", initial: int = 0):
    """A tqdm bar for ``progress`` (None, True or False); use as a context manager."""
    from tqdm.auto import tqdm

    if progress not in (None, True, False):
        raise TypeError(f"progress: expected None (automatic), True or False, got {progress!r}")
    auto = progress is None
    show = sys.stderr.isatty() if auto else progress
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=not show,
                delay=AUTO_DELAY_S if auto else 0, file=sys.stderr, leave=not auto)
