"""Report folders: written whole, swapped in atomically, and never replacing a folder lorabench did not write.

A report folder carries MARKER, listing the files lorabench wrote in it; a folder is replaced only while
it holds that marker and nothing but those files, and a measured report only by another measured one
(keep_reason). --force goes no further than lorabench's own folders and empty ones (force_action): it
moves aside a report lorabench made (one with more files in it, or measurements), and replaces an empty
folder; any other folder (a model's, src/, a system folder such as /tmp) is refused, --force or not.
The new folder is built hidden beside the target and swapped with the old one in one rename
(renameat2 RENAME_EXCHANGE on Linux, renamex_np RENAME_SWAP on macOS), so a crash at any moment leaves
one complete report under its name; elsewhere clean_stale repairs a kill between the two renames, and
removes the hidden folders of killed runs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from lorabench import __version__
from lorabench.errors import LorabenchError
from lorabench.safety.files import TMP_RE, aside_path, name_max, pid_alive, probe_writable, tmp_name
from lorabench.safety.signals import signals_deferred

MARKER = ".lorabench-report.json"


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


def _delete(folder: Path) -> bool:
    """Delete folder's files, then the folder; callers have checked that every file is lorabench's.
    Returns False when that fails part-way (what is left stays)."""
    try:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()
    except OSError:
        return False
    return True


def _remove_report_folder(folder: Path) -> bool:
    """Delete a folder lorabench made (see is_report_folder); anything else in it keeps it whole."""
    return is_report_folder(folder) and _delete(folder)


def keep_reason(target: Path, measured: bool) -> Optional[str]:
    """Why the folder at target must not be replaced (None: absent, or a report that may be).

    Not lorabench's, or lorabench's with other files in it; or a report with measurements (--bench,
    maybe hours of GPU time) about to be replaced by one without.
    """
    if not os.path.lexists(target):
        return None
    marker = read_marker(target) if target.is_dir() and not target.is_symlink() else None
    if marker is None:
        if force_action(target) == "replace":
            return "is an empty folder that lorabench did not make"
        return "was not written by 'lorabench report'"
    if not _only_files(target, [*marker["files"], MARKER]):
        return "holds files lorabench did not write"
    if marker.get("measured") and not measured:
        return "holds measurements (report --bench) and this run has none"
    return None


def force_action(target: Path) -> Optional[str]:
    """What --force may do with the folder at target: "move" aside a folder lorabench made (its marker is
    there), "replace" an empty folder (nothing in it to lose), or None: never touch it. A mount point, a
    symlink or anything else is None: a folder lorabench did not make is never moved (`--out-dir / --name
    tmp --force` must not move the machine's /tmp)."""
    if target.is_symlink() or not target.is_dir() or os.path.ismount(target):
        return None
    if read_marker(target) is not None:
        return "move"
    try:
        return None if any(target.iterdir()) else "replace"
    except OSError:
        return None


def check_report_target(out_dir: str, name: str, files: Sequence[str], force: bool = False,
                        measured: bool = False) -> Path:
    """out_dir/name, checked before the run: out_dir is (or can be made in) a writable folder, and
    out_dir/name is absent or a report lorabench wrote that this one may replace (see keep_reason),
    or force is set and force_action allows it. Stale temporary folders of killed runs are cleaned first.

    Raises:
        LorabenchError: in one line.
    """
    if not out_dir or not out_dir.strip():
        raise LorabenchError("--out-dir is empty; give a folder (default: reports).")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise LorabenchError(f"--out-dir '{out_dir}' is not a folder.")
    missing = missing_folders(out)
    base = missing[0].parent if missing else out.absolute()  # the nearest folder that exists
    if not base.is_dir():
        raise LorabenchError(f"--out-dir: '{base}' is not a folder.")
    for folder in missing:
        if folder.is_symlink():
            raise LorabenchError(f"--out-dir: '{folder}' is a symlink to nothing (dangling, or a loop).")
    probe_writable(base, "--out-dir")
    longest = name_max(base)
    for part in out.absolute().relative_to(base).parts + (name, tmp_name(name, "tmp")):
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
    if why:
        action = force_action(target)
        if action is None:
            raise LorabenchError(f"{target} exists and {why}; choose another --out-dir or --name (--force replaces "
                                 "only lorabench's own reports and empty folders).")
        if not force:
            what = f"move it aside (to {name}.replaced-DATE)" if action == "move" else "replace it"
            raise LorabenchError(f"{target} exists and {why}; choose another --name or --out-dir, or add --force "
                                 f"to {what} and write the report there.")
    return target


def clean_stale(out: Path, name: str, files: Sequence[str]) -> None:
    """Finish what a killed report run left for name: restore a moved-aside report if none is under the
    name, then remove the hidden temporary folders of writers that are gone. Only lorabench's files are
    deleted: those a marker lists or, in a folder killed before its marker, the report's files."""
    leftovers = []
    for entry in out.iterdir():
        m = TMP_RE.match(entry.name)
        if m and m["name"] == name and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(m["pid"])):
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
            _delete(entry)


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
    tmp = out / tmp_name(name, "tmp")
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


def _clear_for_force(target: Path, why: str) -> Optional[Path]:
    """Make room at target as --force allows (force_action, checked again now): move a folder lorabench made
    aside (returns where), or remove an empty folder (rmdir: it fails rather than delete anything)."""
    action = force_action(target)
    if action == "move":
        aside = aside_path(target, target.name, "")
        os.rename(target, aside)
        return aside
    if action == "replace":
        try:
            os.rmdir(target)
        except OSError as exc:
            raise LorabenchError(f"{target} could not be replaced: {exc.strerror or exc}; the report is not "
                                 "written there.") from None
        return None
    raise LorabenchError(f"{target} {why}; the report is not written there (--force replaces only lorabench's own "
                         "reports and empty folders).")


def publish_report(tmp: Path, target: Path, force: bool = False, measured: bool = False) -> Optional[Path]:
    """Put the complete folder tmp under target. Returns where a folder that had to be kept was moved
    (with force), else None.

    A report lorabench wrote is swapped with the new one in one atomic exchange, then deleted (its own
    files only). Without an exchange in the OS it is renamed aside first, and clean_stale repairs a kill
    between the two renames. SIGINT and SIGTERM are held until it is done (a few renames): cut in the
    middle, it would leave the old report in a hidden folder.
    """
    with signals_deferred():
        return _publish(tmp, target, force, measured)


def _publish(tmp: Path, target: Path, force: bool, measured: bool) -> Optional[Path]:
    moved = None
    why = keep_reason(target, measured)
    if why:
        if not force:  # it changed since check_report_target
            raise LorabenchError(f"{target} {why} (it changed since the run started); the report is not written "
                                 "there.")
        moved = _clear_for_force(target, why)
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
    old = target.with_name(tmp_name(target.name, "old"))
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove_report_folder(old)
    return moved
