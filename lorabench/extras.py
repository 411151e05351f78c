"""What each job needs beyond the estimates' light core (setup.cfg's extras), checked before the job starts so
that a missing package is one line that names the extra to install, not a traceback halfway through."""

from __future__ import annotations

import importlib.util
from typing import Dict, Tuple

from lorabench.errors import LorabenchError

# extra -> the modules it installs that the job imports (module name, package name)
EXTRAS: Dict[str, Tuple[Tuple[str, str], ...]] = {
    "bench": (("torch", "torch"),),
    "report": (("matplotlib", "matplotlib"),),
    "trace": (("torch", "torch"), ("transformers", "transformers"), ("peft", "peft")),
}


def require(extra: str, job: str) -> None:
    """Raises LorabenchError when a module of `extra` is not installed: "<job> needs <package>: pip install
    'lorabench[<extra>]'."."""
    for module, package in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise LorabenchError(f"{job} needs {package}, which is not installed: pip install 'lorabench[{extra}]'.")
