"""SIGINT and SIGTERM, handled alike: both end a run with what finished (exit 130 and 143).

Python turns SIGINT into KeyboardInterrupt; sigterm_raises does the same for SIGTERM (timeouts, job
schedulers) with Terminated. signals_deferred holds both off while something must not be cut in half:
a row being written, a report being swapped in, torch being imported.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Callable, Dict, List


class Terminated(BaseException):
    """SIGTERM arrived (a timeout, a job scheduler). Like KeyboardInterrupt, not an Exception."""

    exit_code = 128 + signal.SIGTERM


@contextmanager
def _handling(handlers: Dict[int, Callable]):
    """Install signal handlers for the block, then put the previous ones back; yields those (None outside
    the main thread, where Python cannot set handlers and nothing is changed)."""
    previous = {}
    try:
        for signum, handler in handlers.items():
            previous[signum] = signal.signal(signum, handler)
    except ValueError:  # not the main thread
        yield None
        return
    try:
        yield previous
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_terminated(signum, frame):
    raise Terminated()


def sigterm_raises():
    """Within the block SIGTERM raises Terminated (main thread only; elsewhere the default stays)."""
    return _handling({signal.SIGTERM: _raise_terminated})


def ignore_signals() -> None:
    """SIGINT and SIGTERM are ignored from now on (main thread only): for the last moments of a process whose
    work is done, its files closed and its children stopped, where a signal could only turn its exit code
    into a death by the signal (-15) or a traceback from the interpreter's shutdown."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except ValueError:  # not the main thread
        pass


@contextmanager
def signals_deferred():
    """SIGINT and SIGTERM that arrive within the block take effect when it ends.

    Python-level handlers, not a signal mask: a mask is per thread, and torch's worker threads would take
    the signal instead. Outside the main thread this is a no-op.
    """
    got: List[int] = []

    def record(signum, frame):
        got.append(signum)

    with _handling({signal.SIGINT: record, signal.SIGTERM: record}) as previous:
        yield
    if got and previous:
        handler = previous[got[0]]
        if callable(handler):
            handler(got[0], None)  # KeyboardInterrupt, Terminated
        elif handler == signal.SIG_DFL:
            os.kill(os.getpid(), got[0])
