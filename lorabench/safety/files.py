"""Files lorabench writes: checked before the run, written atomically, never replacing what lorabench did
not write. (Report folders: lorabench.report.folder, built on the helpers here.)

- An output path is checked before any work starts (check_output_file): the folder exists and is
  writable, the path is not a folder, a device or a symlink to nothing, the extension is known, and an
  existing file is lorabench's own (bench rows, which name the lorabench version that wrote them).
  A regular file of the user's that is not is refused in one line unless the user says --force, and even
  then it is moved aside (move_aside), never deleted; a folder, a device or another user's file is refused
  with --force too (move_aside moves nothing but a regular file).
- Files are written to a temporary file beside the target, fsynced, and renamed over it (atomic_write),
  keeping the permissions of the file they replace; rows are rewritten that way as each one finishes
  (RowFile), so a kill at any moment leaves the rows that finished.
- Temporary files and folders carry the writer's pid; the next run removes those whose process is gone.
- Files get the user's umask, as any other program's.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from lorabench.errors import LorabenchError
from lorabench.safety.signals import signals_deferred

ROW_EXTENSIONS = (".json", ".csv")
# The columns every bench row has: what makes a rows file recognisably lorabench's.
# (lorabench_version is in every row since the rows carried it: older files need --force.)
ROW_KEYS = ("lorabench_version", "model", "method", "rank", "status", "impl")
MAX_ROWS_FILE_BYTES = 64 << 20  # a sweep's rows are a few KB each
TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap check: keep it
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def tmp_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}"


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


def probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in folder: os.access cannot tell a read-only filesystem, and root passes it."""
    probe = folder / tmp_name("lorabench-probe", "tmp")
    with signals_deferred():  # a Ctrl-C between the two would leave the probe behind
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            raise LorabenchError(f"{what}: cannot write in '{folder}': {exc.strerror or exc}.") from None
        os.close(fd)
        os.unlink(probe)


# --------------------------------------------------------------------------------------------------
# Single files: -o rows.


def check_output_file(path: str, *, option: str = "--output", extensions: Sequence[str] = ROW_EXTENSIONS,
                      force: bool = False) -> Path:
    """The path to write, checked before the run: known extension, an existing writable folder, not a
    folder or a device, and not a file lorabench did not write (unless force, and then only a regular
    file of this user's: see movable_file). Symlinks are followed.

    Raises:
        LorabenchError: in one line, naming the option.
    """
    if not path or not path.strip():
        raise LorabenchError(f"{option} is empty; give a file name ending in {' or '.join(extensions)}.")
    if not path.lower().endswith(tuple(extensions)):
        raise LorabenchError(f"{option} '{path}' must end in {' or '.join(extensions)}.")
    if os.path.islink(path) and not os.path.exists(path):
        raise LorabenchError(f"{option} '{path}' is a symlink to nothing (dangling, or a loop).")
    target = Path(os.path.realpath(path))
    folder = target.parent
    if not folder.is_dir():
        raise LorabenchError(f"{option}: folder '{os.path.dirname(path) or '.'}' does not exist.")
    longest = name_max(folder)
    if len(os.fsencode(tmp_name(target.name, "tmp"))) > longest:
        raise LorabenchError(f"{option}: the file name is longer than a file name can be here "
                             f"({longest} bytes, with room for a temporary name).")
    if target.is_dir():
        raise LorabenchError(f"{option} '{path}' is a folder; choose another name.")
    if target.exists():
        if not stat.S_ISREG(target.stat().st_mode):
            raise LorabenchError(f"{option} '{path}' exists and is not a regular file; choose another name.")
        if not is_rows_file(target):
            why = movable_file(target)
            if why:
                raise LorabenchError(f"{option} '{path}' exists, was not written by lorabench bench and {why}; "
                                     "choose another name (--force moves aside only your own regular files).")
            if not force:
                raise LorabenchError(f"{option} '{path}' exists and was not written by lorabench bench; "
                                     "choose another name, or add --force to move it aside and write there.")
    probe_writable(folder, option)
    clean_stale_files(folder, target.name)
    return target


def movable_file(path: Path) -> Optional[str]:
    """Why --force may not move path aside (None: it may). Only a regular file of this user's: never a
    folder, a device or a socket, nor, for root, a file that another user owns."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"belongs to another user (uid {st.st_uid})"
    return None


def is_rows_file(path: Path) -> bool:
    """An empty file (nothing to lose), or rows lorabench bench wrote: a JSON list of its rows, or a CSV
    with their header (each row names the lorabench version that wrote it)."""
    csv = path.suffix.lower() == ".csv"
    try:
        with open(path, "rb") as fh:
            head = fh.readline(1 << 16) if csv else fh.read(MAX_ROWS_FILE_BYTES + 1)
    except OSError:
        return False
    if not head.strip():
        return True
    text = head.decode("utf-8", "replace")
    if csv:
        return set(ROW_KEYS) <= {c.strip() for c in text.split(",")}
    if len(head) > MAX_ROWS_FILE_BYTES:
        return False
    try:
        rows = json.loads(text)
    except ValueError:
        return False
    return isinstance(rows, list) and all(isinstance(r, dict) and set(ROW_KEYS) <= set(r) for r in rows)


def atomic_write(path: Path, text: str) -> None:
    """Write text to path all at once: a temporary file beside it, fsynced, renamed over it.

    Any failure (KeyboardInterrupt and Terminated included) leaves the old file and no temporary file.
    """
    path = Path(path)
    tmp = path.parent / tmp_name(path.name, "tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # the umask applies, as for open()
    try:
        try:  # a file being replaced keeps its permissions (a chmod 600 stays private)
            os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
        except FileNotFoundError:
            pass
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def clean_stale_files(folder: Path, name: str) -> None:
    """Remove temporary files of name that a killed writer left in folder."""
    for entry in folder.iterdir():
        m = TMP_RE.match(entry.name)
        if m and m["name"] == name and m["kind"] == "tmp" and entry.is_file() and not pid_alive(int(m["pid"])):
            try:
                entry.unlink()
            except OSError:
                pass


class RowFile:
    """Rows written as they finish: each add() rewrites the whole file atomically, so it is always
    complete JSON (or CSV) holding every finished row, whatever kills the run.

    The file is claimed for the run (a lock beside it): a second run writing the same file is refused
    before it starts, instead of the two overwriting each other's rows. A file there that lorabench did
    not write (accepted by check_output_file with force) is moved aside before the first row is
    written, never overwritten; `moved` says where. What appeared there since the check (a folder, a
    file without force) is left alone: add() refuses. The lock file goes with close(), which callers
    put in a `finally` (a signal is held while the lock is made and removed, so none lands between).

    Raises:
        LorabenchError: another run holds the file.
    """

    def __init__(self, path: Path, render: Callable[[List[Dict], str], str], force: bool = False):
        self.path = Path(path)
        self.fmt = "csv" if self.path.suffix.lower() == ".csv" else "json"
        self.render = render
        self.force = force
        self.rows: List[Dict] = []
        self.moved: Optional[Path] = None
        self._lock = _claim(self.path.parent / f".{self.path.name}.lock", str(self.path))

    def add(self, row: Dict) -> None:
        """Rewrite the file with row added.

        Raises:
            LorabenchError: before the first row, the path now holds something that may not be replaced.
            OSError: the file cannot be written (a full disk).
        """
        with signals_deferred():  # a Ctrl-C now would cost this row its place in the file
            if not self.rows and os.path.lexists(self.path):
                why = None
                if not stat.S_ISREG(os.lstat(self.path).st_mode):  # (a FIFO is not even opened)
                    why = "is not a regular file"
                elif not is_rows_file(self.path):
                    why = movable_file(self.path) or (None if self.force else "was not written by lorabench bench")
                    if why is None:
                        self.moved = move_aside(self.path)
                if why:
                    raise LorabenchError(f"{self.path} changed since the run started: it {why}; it is left as it is.")
            self.rows.append(row)
            atomic_write(self.path, self.render(self.rows, self.fmt) + "\n")

    def close(self) -> None:
        """Give the file back (the lock goes; the rows stay)."""
        with signals_deferred():  # a signal between unlink and close, or before unlink, would leave the lock
            if self._lock is not None:
                lock_path, fd = self._lock
                self._lock = None
                try:
                    os.unlink(lock_path)
                except OSError:
                    pass
                os.close(fd)


def _claim(lock_path: Path, what: str):
    """(lock_path, fd) holding an exclusive flock on lock_path, or None where there is no flock.
    A killed holder's lock is released by the kernel, so a stale lock file is simply taken over."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise LorabenchError(f"{what} is being written by another lorabench run; wait for it or choose "
                             "another name.") from None
    return lock_path, fd


def aside_path(path: Path, stem: str, ext: str) -> Path:
    """A free name beside path: STEM.replaced-DATE[-N]EXT."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    n, aside = 1, path.with_name(f"{stem}.replaced-{stamp}{ext}")
    while os.path.lexists(aside):
        n += 1
        aside = path.with_name(f"{stem}.replaced-{stamp}-{n}{ext}")
    return aside


def move_aside(path: Path) -> Path:
    """Rename the regular file path to NAME.replaced-DATE.ext beside it (never over anything); returns the
    new path. Folders are not moved here (lorabench.report.folder moves only its own reports).

    Raises:
        LorabenchError: path is not a regular file of this user's (movable_file).
    """
    why = movable_file(path)
    if why:
        raise LorabenchError(f"{path} {why}; it is not moved.")
    aside = aside_path(path, path.stem, path.suffix)
    os.rename(path, aside)
    return aside


# --------------------------------------------------------------------------------------------------
# Report folders.


