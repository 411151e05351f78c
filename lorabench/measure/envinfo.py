"""Where a report was made: GPU and driver (NVML), torch and CUDA, lorabench and its git commit.

Never imports torch: its version comes from the installed package's metadata, and torch's own
answers (CUDA build, device) are read only when something else (the bench) has already loaded it.
Every probe that fails gives None, never an exception: a report must not die for want of a GPU.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

import lorabench


def utc_now() -> str:
    """The current time, ISO 8601 in UTC, to the second."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def _text(value) -> str:
    # pynvml returns bytes on old releases and str on new ones.
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_info() -> Dict:
    """GPUs and driver as NVML sees them; every field None where NVML is missing or fails."""
    info: Dict = {"gpu_name": None, "gpu_count": None, "gpus": None, "driver_version": None,
                  "cuda_driver_version": None}
    try:
        import pynvml
    except ImportError:
        return info
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no library, no device: all NVMLError subclasses or OSError
        return info
    try:
        info["driver_version"] = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            v = pynvml.nvmlSystemGetCudaDriverVersion()  # e.g. 12040 for CUDA 12.4
            info["cuda_driver_version"] = f"{v // 1000}.{v % 1000 // 10}"
        except Exception:
            pass
        gpus: List[Dict] = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append({"index": i, "name": _text(pynvml.nvmlDeviceGetName(handle)),
                         "memory_bytes": int(pynvml.nvmlDeviceGetMemoryInfo(handle).total)})
        info.update(gpus=gpus, gpu_count=len(gpus), gpu_name=gpus[0]["name"] if gpus else None)
    except Exception:
        pass
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return info


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_build_cuda() -> Optional[str]:
    """The CUDA torch was built for, read from torch/version.py without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
        if spec is None or not spec.submodule_search_locations:
            return None
        source = Path(list(spec.submodule_search_locations)[0], "version.py").read_text()
        for node in ast.parse(source).body:
            if (isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant)
                    and any(getattr(t, "id", None) == "cuda" for t in
                            (node.targets if isinstance(node, ast.Assign) else [node.target]))):
                return node.value.value
    except (OSError, SyntaxError, ValueError, ImportError):
        return None
    return None


def torch_info() -> Dict:
    """torch's version and CUDA build; device details only if torch is already loaded."""
    info: Dict = {"torch_version": _package_version("torch"), "torch_cuda_version": _torch_build_cuda(),
                  "torch_loaded": "torch" in sys.modules}
    torch = sys.modules.get("torch")
    if torch is None:
        return info
    try:
        info["torch_version"] = torch.__version__
        info["torch_cuda_version"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if info["cuda_available"]:
            info["torch_device_name"] = torch.cuda.get_device_name(0)
            info["cudnn_version"] = torch.backends.cudnn.version()
    except Exception:
        pass
    return info


def git_commit() -> Dict:
    """The commit of the lorabench checkout this code runs from (None outside a git checkout)."""
    root = Path(lorabench.__file__).resolve().parent.parent
    out: Dict = {"git_commit": None, "git_dirty": None}

    def git(*args: str) -> Optional[str]:
        try:
            res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # An installed copy inside some unrelated repository is not a lorabench checkout.
    if top is None or Path(top).resolve() != root:
        return out
    out["git_commit"] = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    out["git_dirty"] = None if status is None else bool(status)
    return out


def command_line(argv: Optional[List[str]] = None) -> str:
    """The command as run (sys.argv, shell-quoted), the program shortened to its name so that the
    line runs anywhere: /usr/local/bin/lorabench -> lorabench, .../lorabench/__main__.py -> python -m lorabench.
    """
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "lorabench"
    head = ["python", "-m", "lorabench"] if prog == "__main__.py" else [prog]
    return " ".join(_shell_word(a) for a in head + argv[1:])


def _shell_word(arg: str) -> str:
    """arg quoted for a POSIX shell; an argument that is not UTF-8 (a folder named b'bad\\xff') becomes
    bash's $'...' with \\x escapes, so that the line is still valid text and still runs."""
    try:
        arg.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(arg)
        return "$'" + "".join(chr(b) if 32 <= b < 127 and chr(b) not in "'\\" else f"\\x{b:02x}"
                              for b in raw) + "'"
    return shlex.quote(arg)


def capture_environment(date: Optional[str] = None) -> Dict:
    """Everything a reader needs to reproduce a report, as plain JSON values.

    Args:
        date: when the run started (ISO, UTC); now if not given.
    """
    env: Dict = {"date": date or utc_now(), "lorabench_version": lorabench.__version__}
    env.update(git_commit())
    env.update({"python_version": platform.python_version(), "platform": platform.platform(),
                "cpu_count": os.cpu_count()})
    env.update(torch_info())
    env.update(nvml_info())
    return env
