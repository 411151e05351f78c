"""What a trace learned, kept per model config, tuner and setup, so that asking again answers at once. No torch:
a hit is read before transformers, PEFT or torch is imported.

The key is a SHA-256 of: the config.json (canonical JSON), the tuner's PEFT config, every setup field that changes
the step (the device too: a CUDA step's optimizer runs torch's foreach kernels), the versions of torch, transformers and
PEFT, and the source of the modules that trace (a change to them is a new key); a vision-language step's image
inputs where it has any (a text-only step's key leaves them out). One JSON file per key, written
whole or not at all (safety.files.atomic_write), under $LORABENCH_CACHE_DIR, else $XDG_CACHE_HOME/lorabench/traces,
else ~/.cache/lorabench/traces. LORABENCH_CACHE_DIR=off turns it off. A file that cannot be read is a miss; a
folder that cannot be written is no cache, never an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Dict, Optional, Tuple

from lorabench.estimator.images import ImageInputs
from lorabench.estimator.parallel import Parallel
from lorabench.estimator.setup import TrainingSetup
from lorabench.estimator.tuner import Tuner
from lorabench.models.raw import RawModel
from lorabench.safety.files import atomic_write

FORMAT = 1
# The files whose code decides a trace's numbers (read as files: importing lorabench.nn would import torch)
SOURCES = ("measure/traced.py", "measure/trace.py", "measure/oplog.py", "measure/hfbuild.py", "measure/loops.py",
           "measure/steps.py", "measure/bench.py", "measure/probes.py", "measure/builders.py", "measure/images.py",
           "measure/routing.py",
           "nn/optim.py")
PACKAGE = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "peft")
SETUP_IGNORED = ("impl",)  # the trace runs transformers + PEFT whatever this says


def cache_dir() -> Optional[Path]:
    """Where traces are kept, or None when LORABENCH_CACHE_DIR is "off"."""
    given = os.environ.get("LORABENCH_CACHE_DIR", "").strip()
    if given.lower() in ("off", "0", "none", "false"):
        return None
    if given:
        return Path(given)
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorabench" / "traces"


@functools.lru_cache(maxsize=None)  # once a process: a command keys a trace per method and rank
def _versions() -> Tuple[Tuple[str, Optional[str]], ...]:
    out = []
    for name in LIBRARIES:
        try:
            out.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            out.append((name, None))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _code() -> str:
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((PACKAGE / name).read_bytes())
    return digest.hexdigest()


def trace_key(raw: RawModel, tuner: Tuner, setup: TrainingSetup, kind: str = "trace",
              parallel: Parallel = Parallel(), images: ImageInputs = ImageInputs()) -> str:
    """The cache key of a trace (module docstring); kind "counts" for the parameter counts alone. parallel:
    rank 0's step under a strategy (one GPU's keys, which leave it out, stay as they were); images: the images
    each sequence carries (likewise)."""
    fields = {k: v for k, v in asdict(setup).items() if k not in SETUP_IGNORED}
    what = {"format": FORMAT, "kind": kind, "config": raw.config_json, "tuner": asdict(tuner), "setup": fields,
            "versions": dict(_versions()), "code": _code()}
    if not parallel.single:
        what["parallel"] = asdict(parallel)
    if images.count:
        what["images"] = asdict(images)
    what["tuner"].pop("source", None)  # the same config from another path is the same trace
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def load(key: str) -> Optional[Dict]:
    """The trace kept under key, or None."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        found = json.loads((folder / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("key") == key else None


def store(key: str, result: Dict) -> Optional[Path]:
    """Keeps result under key; the file, or None when there is no cache or it cannot be written."""
    folder = cache_dir()
    if folder is None:
        return None
    path = folder / f"{key}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({**result, "key": key}, sort_keys=True))
    except OSError:
        return None
    return path


__all__ = ["FORMAT", "cache_dir", "trace_key", "load", "store"]
