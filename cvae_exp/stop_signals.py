"""SIGTERM and SIGINT from a command's first line on, and never raised inside an import.

Python's default handling ends a process on SIGTERM with no word (exit code -15), and the start-up handler of a
run (cvae_exp.runs.launch.Interruptible) raises `Interrupted` wherever the main thread is. Raised inside an
import, that exception interrupts the initialisation of a C extension (jaxlib's `_jax` reports "Encountered an
error while initializing the extension"), and the half-initialised module crashed the interpreter at exit (a
segmentation fault, exit code -11, in 4 of 12 signals during start-up). So:

- `hold_from_start()`, called on a command's first line (cvae_exp/train.py, before Hydra is imported), notes a
  stop signal instead of ending the process; the run's handler acts on it as soon as it is installed
  (`take_pending`). A second signal ends the process at once, as everywhere.
- `importing(frame)` tells a handler that the main thread is inside an import; `raise_after_import(check)` then
  has `check()` (which raises) called on the first line the main thread runs outside the import machinery,
  through a trace function set for that moment only.

Standard library only: this module loads before anything else of the command.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_pending: list[int] = []
_IMPORT_MACHINERY = "<frozen importlib._bootstrap"  # and _bootstrap_external: the frames of every import


def hold_from_start() -> None:
    """Until a run installs its own handler, a stop signal is noted (`take_pending`), not acted on in the middle
    of an import; a second one ends the process. Only where Python's default handling is still in place."""

    def note(signum, frame) -> None:
        _pending.append(signum)
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)  # a second signal ends the process at once

    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, note)


def take_pending() -> int | None:
    """The stop signal noted before a handler was installed (once), or None."""
    return _pending.pop(0) if _pending else None


def importing(frame) -> bool:
    """Whether `frame` (the main thread's, where a signal handler interrupted it) is inside an import."""
    while frame is not None:
        if frame.f_code.co_filename.startswith(_IMPORT_MACHINERY):
            return True
        frame = frame.f_back
    return False


def raise_after_import(frame, check: Callable[[], None]) -> None:
    """Calls `check()` (which raises) on the first line the main thread runs outside any import: a trace function
    on the frames of the interrupted stack that lie outside the import and on new frames outside it (the import
    itself runs untraced, at full speed), removed again before `check` runs."""

    def tracer(current, event, arg):
        if importing(current):
            return None  # a frame of the import: not traced
        if event == "line":
            stop_tracing()
            check()
        return tracer

    traced = []
    while frame is not None:
        if not importing(frame):
            frame.f_trace = tracer
            traced.append(frame)
        frame = frame.f_back
    _tracing[:] = traced
    sys.settrace(tracer)


_tracing: list = []


def stop_tracing() -> None:
    """Removes the trace function of `raise_after_import` (a no-op when none is set)."""
    if not _tracing:
        return
    sys.settrace(None)
    for frame in _tracing:
        frame.f_trace = None
    _tracing.clear()
