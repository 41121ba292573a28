"""Logging what a guest or a peer did wrong, at a rate it cannot turn into a flood.

Anything a guest (or a vhost-user front-end) can trigger at will, it can trigger a million
times a second. Every shim, transport and device logs such errors through a
:class:`GuestErrorLog`: the first line goes out, the next ones within ``interval`` seconds are
counted and their number is appended to the next line that goes out.
"""

from __future__ import annotations

import logging
import threading
import time


class GuestErrorLog:
    """At most one line per ``interval`` seconds on ``logger``."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -interval
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, msg: str, *args: object) -> None:
        self._emit(logging.WARNING, msg, args)

    def error(self, msg: str, *args: object) -> None:
        self._emit(logging.ERROR, msg, args)

    def _emit(self, level: int, msg: str, args: tuple[object, ...]) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last = now
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
