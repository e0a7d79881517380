"""Progress of a long wait.

:class:`LoadProgress`: a tqdm bar when tqdm is installed, else INFO log lines; nothing is
shown for loads that finish within ``delay`` seconds, nor on ranks other than 0.
:func:`announce_wait`: a one-off wait with no measurable progress (a compiler run), announced
before it starts and ticking while it lasts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import threading
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def announce_wait(
    message: str, *, tick: str, done: str, every: float, logger: logging.Logger = logger
) -> Iterator[None]:
    """Log ``message`` (WARNING: shown at the default level) before the block runs, then
    ``"{tick}... N s"`` every ``every`` seconds from a daemon thread while it runs, and
    ``"{done} in N s"`` when it succeeds: a long silent wait reads as a hang."""
    logger.warning("%s", message)
    start = time.monotonic()
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(every):
            logger.warning("%s... %.0f s", tick, time.monotonic() - start)

    thread = threading.Thread(target=ticker, name="quantreg-wait", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    logger.warning("%s in %.0f s", done, time.monotonic() - start)
