"""Standard output that takes the whole answer or says it did not.

Python ignores SIGXFSZ, so under `ulimit -f` a write stops at the limit and the next fails with EFBIG; a full
disk fails with ENOSPC. Unbuffered (python -u, PYTHONUNBUFFERED), sys.stdout is a TextIOWrapper over a raw
FileIO that ignores the count a short write returns: `lorabench memory -f json > big.json` was cut at the
limit with exit code 0. Buffered, the error came only from the flush at exit ("Exception ignored", exit code
120). Under whole_stdout every write is whole or an OSError naming STDOUT, which the CLI turns into one line
and exit code 1.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys

STDOUT = "standard output"  # the filename of the OSError a failed write raises


class WholeWrites(io.RawIOBase):
    """A file descriptor whose every write goes out whole (os.write again after a short write) or raises
    OSError naming STDOUT (BrokenPipeError as it is: the reader left, which is no error of ours)."""

    def __init__(self, fd: int):
        super().__init__()
        self._fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:  # click strips colours where this is False
        return os.isatty(self._fd)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            try:
                done += os.write(self._fd, view[done:])
            except InterruptedError:
                continue
            except BrokenPipeError:
                raise
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, STDOUT) from None
        return done


@contextlib.contextmanager
def whole_stdout():
    """sys.stdout on WholeWrites for the block, where it is the process's own stdout (not a CliRunner's);
    unbuffered, so that nothing is left to fail at exit. After a failed write, fd 1 is pointed at /dev/null
    so that Python's own flush at exit has nothing more to say (as Python's docs advise for EPIPE)."""
    out = sys.stdout
    try:
        fd = out.fileno() if out is sys.__stdout__ else None
    except (AttributeError, OSError, ValueError):
        fd = None
    if fd is None:
        yield
        return
    out.flush()
    sys.stdout = io.TextIOWrapper(WholeWrites(fd), encoding=out.encoding, errors=out.errors,
                                  line_buffering=out.line_buffering, write_through=True)
    try:
        yield
    except OSError as exc:
        if exc.filename == STDOUT:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
        raise
    finally:
        sys.stdout = out
