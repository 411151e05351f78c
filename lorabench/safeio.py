"""Every file lorabench writes goes through here: checked before the run, written atomically, never
replacing what lorabench did not write.

- Output paths are checked before any work starts (check_output_file, check_report_target): the folder
  exists and is writable, the path is not a folder or a device, the extension is known, and an existing
  file or folder is lorabench's own (a report folder carries MARKER; a rows file has the bench's columns).
  Anything else is refused in one line unless the user says --force, and even then it is moved aside,
  never deleted.
- Files are written to a temporary file beside the target, fsynced, and renamed over it (atomic_write);
  rows are rewritten that way as each one finishes (RowFile), so a kill at any moment leaves the rows
  that finished.
- A report folder is swapped with the old one in one rename (renameat2 RENAME_EXCHANGE on Linux,
  renamex_np RENAME_SWAP on macOS), so a crash at any moment leaves one complete report under its name;
  elsewhere the two renames are repaired by the next run (clean_stale).
- Temporary files and folders carry the writer's pid; the next run removes those whose process is gone.
- Files get the user's umask, as any other program's.
- SIGTERM raises Terminated, as SIGINT raises KeyboardInterrupt, so runs end the same way on both.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import os
import re
import signal
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from lorabench import __version__
from lorabench.errors import LorabenchError

MARKER = ".lorabench-report.json"
ROW_EXTENSIONS = (".json", ".csv")
# The columns every bench row has: what makes a rows file recognisably lorabench's.
# (lorabench_version is in every row since the rows carried it: older files need --force.)
ROW_KEYS = ("lorabench_version", "model", "method", "rank", "status", "impl")
MAX_ROWS_FILE_BYTES = 64 << 20  # a sweep's rows are a few KB each
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


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


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return True  # no cheap check: keep it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}"


def _probe_writable(folder: Path, what: str) -> None:
    """Create and remove a file in folder: os.access cannot tell a read-only filesystem, and root passes it."""
    probe = folder / _tmp_name("lorabench-probe", "tmp")
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
    folder or a device, and not someone else's file (unless force). Symlinks are followed.

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
    if len(os.fsencode(_tmp_name(target.name, "tmp"))) > _name_max(folder):
        raise LorabenchError(f"{option}: the file name is longer than a file name can be here "
                             f"({_name_max(folder)} bytes, with room for a temporary name).")
    if target.is_dir():
        raise LorabenchError(f"{option} '{path}' is a folder.")
    if target.exists():
        if not stat.S_ISREG(target.stat().st_mode):
            raise LorabenchError(f"{option} '{path}' exists and is not a regular file.")
        if not force and not is_rows_file(target):
            raise LorabenchError(f"{option} '{path}' exists and was not written by lorabench bench; "
                                 "choose another name, or add --force to move it aside and write there.")
    _probe_writable(folder, option)
    clean_stale_files(folder, target.name)
    return target


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
    tmp = path.parent / _tmp_name(path.name, "tmp")
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
        m = _TMP_RE.match(entry.name)
        if m and m["name"] == name and m["kind"] == "tmp" and entry.is_file() and not _pid_alive(int(m["pid"])):
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
    written, never overwritten; `moved` says where.

    Raises:
        LorabenchError: another run holds the file.
    """

    def __init__(self, path: Path, render: Callable[[List[Dict], str], str]):
        self.path = Path(path)
        self.fmt = "csv" if self.path.suffix.lower() == ".csv" else "json"
        self.render = render
        self.rows: List[Dict] = []
        self.moved: Optional[Path] = None
        self._lock = _claim(self.path.parent / f".{self.path.name}.lock", str(self.path))

    def add(self, row: Dict) -> None:
        if not self.rows and self.path.exists() and not is_rows_file(self.path):
            self.moved = move_aside(self.path)
        self.rows.append(row)
        with signals_deferred():  # a Ctrl-C now would cost this row its place in the file
            atomic_write(self.path, self.render(self.rows, self.fmt) + "\n")

    def close(self) -> None:
        """Give the file back (the lock goes; the rows stay)."""
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


def move_aside(path: Path) -> Path:
    """Rename path to NAME.replaced-DATE[.ext] beside it (never over anything); returns the new path."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    stem, ext = (path.stem, path.suffix) if path.is_file() else (path.name, "")
    n, aside = 1, path.with_name(f"{stem}.replaced-{stamp}{ext}")
    while aside.exists() or aside.is_symlink():
        n += 1
        aside = path.with_name(f"{stem}.replaced-{stamp}-{n}{ext}")
    os.rename(path, aside)
    return aside


# --------------------------------------------------------------------------------------------------
# Report folders.


def _only_files(folder: Path, names: Iterable[str]) -> bool:
    """folder holds nothing but regular files (not folders, not symlinks) with these names."""
    allowed = set(names)
    return all(p.name in allowed and p.is_file() and not p.is_symlink() for p in folder.iterdir())


def is_report_folder(folder: Path) -> bool:
    """folder holds MARKER and nothing but the files MARKER lists (what lorabench report wrote)."""
    marker = read_marker(folder)
    return marker is not None and _only_files(folder, [*marker["files"], MARKER])


def read_marker(folder: Path) -> Optional[Dict]:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    if not all(isinstance(f, str) and "/" not in f and f not in ("", ".", "..") for f in data["files"]):
        return None
    return data


def write_marker(folder: Path, files: Iterable[str], measured: bool = False) -> None:
    data = {"written_by": "lorabench report", "version": __version__, "files": sorted(files),
            "measured": measured,
            "note": "lorabench replaces this folder only while it holds just these files."}
    (folder / MARKER).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _remove_report_folder(folder: Path) -> bool:
    """Delete a folder lorabench made: the files its marker lists, the marker, then the folder (only if
    that empties it). Returns False when something else is in it (then it stays)."""
    marker = read_marker(folder)
    if marker is None:
        return False
    if not _only_files(folder, [*marker["files"], MARKER]):
        return False
    try:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    except OSError:
        return False
    return True


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (AttributeError, OSError, ValueError):
        return 255


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def keep_reason(target: Path, measured: bool) -> Optional[str]:
    """Why the folder at target must not be replaced (None: absent, or a report that may be).

    Not lorabench's, or lorabench's with other files in it; or a report with measurements (--bench,
    maybe hours of GPU time) about to be replaced by one without.
    """
    if not os.path.lexists(target):
        return None
    marker = read_marker(target) if target.is_dir() and not target.is_symlink() else None
    if marker is None:
        return "was not written by 'lorabench report'"
    if not is_report_folder(target):
        return "holds files lorabench did not write"
    if marker.get("measured") and not measured:
        return "holds measurements (report --bench) and this run has none"
    return None


def check_report_target(out_dir: str, name: str, files: Sequence[str], force: bool = False,
                        measured: bool = False) -> Path:
    """out_dir/name, checked before the run: out_dir is (or can be made in) a writable folder, and
    out_dir/name is absent or a report lorabench wrote that this one may replace (see keep_reason),
    or force is set (it will be moved aside). Stale temporary folders of killed runs are cleaned first.

    Raises:
        LorabenchError: in one line.
    """
    if not out_dir or not out_dir.strip():
        raise LorabenchError("--out-dir is empty; give a folder (default: reports).")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LorabenchError(f"--out-dir '{out_dir}' is not a folder.")
    base = _nearest_existing(out.absolute())
    if not base.is_dir():
        raise LorabenchError(f"--out-dir: '{base}' is not a folder.")
    for folder in missing_folders(out):
        if folder.is_symlink():
            raise LorabenchError(f"--out-dir: '{folder}' is a symlink to nothing (dangling, or a loop).")
    _probe_writable(base, "--out-dir")
    longest = _name_max(base)
    for part in out.absolute().relative_to(base).parts + (name, _tmp_name(name, "tmp")):
        if len(os.fsencode(part)) > longest:
            raise LorabenchError(f"--out-dir/--name: '{part}' is longer than the {longest} bytes a file name "
                                 "can have here.")
    target = out / name
    if out.is_dir():
        clean_stale(out, name, files)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        what = "a symlink" if target.is_symlink() else "not a folder"
        raise LorabenchError(f"{target} exists and is {what}; choose another --name.")
    why = keep_reason(target, measured)
    if why and not force:
        raise LorabenchError(f"{target} exists and {why}; choose another --name or --out-dir, or add --force "
                             f"to move it aside (to {name}.replaced-DATE) and write the report there.")
    return target


def clean_stale(out: Path, name: str, files: Sequence[str]) -> None:
    """Finish what a killed report run left for name: restore a moved-aside report if none is under the
    name, then remove the hidden temporary folders of writers that are gone. Only lorabench's files are
    deleted: those a marker lists or, in a folder killed before its marker, the report's files."""
    leftovers = []
    for entry in out.iterdir():
        m = _TMP_RE.match(entry.name)
        if m and m["name"] == name and entry.is_dir() and not entry.is_symlink() and not _pid_alive(int(m["pid"])):
            leftovers.append((m["kind"], entry))
    target = out / name
    if not target.exists():
        # The fallback's two renames were cut between: a complete new report beats the old one.
        complete = [e for kind, e in sorted(leftovers, key=lambda x: x[0] != "tmp") if read_marker(e) is not None]
        if complete:
            os.rename(complete[0], target)
            leftovers = [(k, e) for k, e in leftovers if e != complete[0]]
    for _, entry in leftovers:
        if read_marker(entry) is not None:
            _remove_report_folder(entry)
        elif not any(entry.iterdir()):
            entry.rmdir()
        elif _only_files(entry, files):  # killed before its marker
            for p in entry.iterdir():
                p.unlink()
            entry.rmdir()


def missing_folders(out: Path) -> List[Path]:
    """The folders of out that do not exist yet, outermost first (what mkdir(parents=True) would make)."""
    missing = []
    path = out.absolute()
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing[::-1]


def remove_empty_folders(folders: Sequence[Path]) -> None:
    """Undo missing_folders' mkdir: remove those folders, innermost first, where they are still empty."""
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:
            return


def new_report_folder(out: Path, name: str) -> Path:
    """A hidden temporary folder beside out/name (same filesystem), with the umask's permissions
    (tempfile.mkdtemp would make it 0700)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / _tmp_name(name, "tmp")
    tmp.mkdir(mode=0o777)  # the umask applies
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename where the OS can; False where it cannot."""
    try:
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "renameat2", None)
            if fn is None:
                return False
            at_fdcwd, rename_exchange = -100, 2
            rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
        elif sys.platform == "darwin":
            libc = ctypes.CDLL(None, use_errno=True)
            rename_swap = 0x2
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), rename_swap)
        else:
            return False
    except (OSError, AttributeError):
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # the kernel or filesystem has no exchange: use two renames
    raise OSError(err, os.strerror(err), str(b))


def publish_report(tmp: Path, target: Path, force: bool = False, measured: bool = False) -> Optional[Path]:
    """Put the complete folder tmp under target. Returns where a folder that had to be kept was moved
    (with force), else None.

    A report lorabench wrote is swapped with the new one in one atomic exchange, then deleted (its own
    files only). Without an exchange in the OS it is renamed aside first, and clean_stale repairs a kill
    between the two renames.
    """
    moved = None
    why = keep_reason(target, measured)
    if why:
        if not force:  # it changed since check_report_target
            raise LorabenchError(f"{target} {why}; the report is not written there (add --force to move the "
                                 "folder aside).")
        moved = move_aside(target)
    if not target.exists():
        try:
            os.rename(tmp, target)
            return moved
        except OSError as exc:  # another run published first: swap with its report as with any other
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or keep_reason(target, measured):
                raise
    if _exchange(tmp, target):
        _remove_report_folder(tmp)  # tmp now holds the old report
        return moved
    old = target.with_name(_tmp_name(target.name, "old"))
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove_report_folder(old)
    return moved
