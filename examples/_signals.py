"""Graceful stop on SIGINT / SIGTERM: finish the current step, checkpoint, exit.

The first signal only raises a flag that the training loop checks after every optimizer
step; it then saves a checkpoint at that exact position and exits with 128 + the signal
number (130 for SIGINT, 143 for SIGTERM). A second SIGINT interrupts at once.

Where there is no step to finish (the final evaluation, after the last checkpoint), the
loop sets ``immediate``: a signal then raises :class:`Interrupted` at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any


class Interrupted(BaseException):
    """Raised by the handler in ``immediate`` mode (like KeyboardInterrupt, not an Exception)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


class StopRequest:
    """Context manager that installs the handlers and remembers the first signal."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.signals = signals
        self.received: int | None = None
        self.immediate = False
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or 0)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        if self.immediate:
            raise Interrupted(signum)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
