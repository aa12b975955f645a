"""Loops that must outlive an outage (the database restarting, a network cut): they say so
once when it starts and once when it ends, and wait longer between tries while it lasts,
instead of logging a traceback every round."""

from __future__ import annotations

import logging
import time


class Outage:
    """The failures of one loop (`what`): logged when they start or change kind, and when
    they end; `delay_s` doubles from `base_s` to `max_s` while they last."""

    def __init__(self, what: str, logger: logging.Logger, base_s: float,
                 max_s: float = 5.0) -> None:
        self.what = what
        self.log = logger
        self.base_s = base_s
        self.max_s = max(max_s, base_s)
        self.delay_s = base_s
        self._kind: str | None = None  # the failing exception's type while an outage lasts
        self._since = 0.0

    @property
    def ongoing(self) -> bool:
        return self._kind is not None

    def failed(self, exc: BaseException) -> float:
        """One more failed round; returns how long to wait before the next."""
        kind = type(exc).__name__
        if self._kind is None:
            self._since = time.monotonic()
            self.log.error("%s failed (%s: %s); retrying every %g-%g s until it works",
                           self.what, kind, exc, self.base_s, self.max_s,
                           exc_info=exc)
        elif kind != self._kind:
            self.log.error("%s still failing, now %s: %s", self.what, kind, exc)
        self._kind = kind
        self.delay_s = min(self.delay_s * 2, self.max_s)
        return self.delay_s

    def succeeded(self) -> float:
        """A round worked; returns the normal wait."""
        if self._kind is not None:
            self.log.warning("%s works again, after %.0f s", self.what,
                             time.monotonic() - self._since)
            self._kind = None
        self.delay_s = self.base_s
        return self.delay_s
