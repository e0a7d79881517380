"""Progress of a long load: a tqdm bar when tqdm is installed, else INFO log lines.

Nothing is shown for loads that finish within ``delay`` seconds, nor on ranks other than 0.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


class LoadProgress:
    """Counts bytes read towards ``total`` and reports them once loading takes a while."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True, delay: float = 1.0) -> None:
        self.total, self.desc, self.delay = total, desc, delay
        self.done = 0
        self.enabled = enabled and total > 0
        self._start = self._last = time.monotonic()
        self._bar: Any = None
        if self.enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit="B", unit_scale=True, delay=delay, leave=False
            )

    def update(self, nbytes: int) -> None:
        self.done += nbytes
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self._start >= self.delay and now - self._last >= 1.0:
            self._last = now
            logger.info("%s: %.1f / %.1f MiB", self.desc, self.done / 2**20, self.total / 2**20)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
