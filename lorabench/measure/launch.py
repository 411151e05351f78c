"""`lorabench bench --nproc N --sharding S`: the same cases as `bench`, each run on N processes started by
torch.distributed.run (torchrun), one row per rank next to the estimate for that rank.

The launcher does the process start-up (STYLE.md): for each case this writes the case to a temporary folder,
runs `python -m torch.distributed.run --standalone --nproc-per-node N -m lorabench.measure.distributed_worker`, and
reads back each rank's row (lorabench.measure.distributed_worker). Each row gets the estimate for its rank
(lorabench.estimator.sharding.rank_memory, gpu_rank=r) and the communication the estimator expects
(lorabench.estimator.comms.comm_volume); with --nproc 1 --sharding none the estimate is bench's own, field for field.

A rank that fails or runs out of memory writes a row saying so and exits 1; torchrun then stops the other
ranks (SIGTERM to each), whose rows say they were stopped. A rank that dies without a row (SIGKILL, the kernel's
OOM killer, a crash in C) is named with how it died, read from torchrun's failure summary (rank_exits). A case
that runs past `timeout_s` is stopped: torchrun gets SIGTERM (it passes it on), then every process of the case
gets SIGKILL; its rows say "timeout". The temporary folder goes in every case, and no process of the case
outlives it: SIGINT and SIGTERM to bench are held while torchrun is started and while the case is stopped.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from lorabench.errors import LorabenchError
from lorabench.estimator.case import Case
from lorabench.estimator.rows import error_pct
from lorabench.estimator.setup import QUANTIZED, TrainingSetup
from lorabench.methods import Method
from lorabench.safety.signals import signals_deferred
from lorabench.models.spec import ModelSpec

DEFAULT_TIMEOUT_S = 600
MAX_NPROC = 1024
STOP_GRACE_S = 10  # after SIGTERM, how long the case's processes get before SIGKILL


def check_distributed(nproc: int, sharding: str, setup: TrainingSetup, device: str) -> None:
    """Refuse, in one line each, what the distributed bench does not run.

    Raises:
        LorabenchError: a bad count or strategy, several processes without a strategy, a loss computed outside
            the model's forward, a quantized base, or more processes than CUDA devices.
    """
    from lorabench.estimator.sharding import STRATEGIES, Parallel

    SHARDINGS = tuple(STRATEGIES)  # the estimator's table: no torch import to check a name
    if isinstance(nproc, bool) or not isinstance(nproc, int) or not 1 <= nproc <= MAX_NPROC:
        raise LorabenchError(f"--nproc must be an integer from 1 to {MAX_NPROC}, got {nproc!r}.")
    if sharding not in SHARDINGS:
        raise LorabenchError(f"unknown sharding '{sharding}'; choose from {', '.join(SHARDINGS)}.")
    if nproc > 1 and sharding == "none":
        raise LorabenchError(f"--nproc {nproc} needs --sharding ddp, zero2 or fsdp: how the processes share the step.")
    Parallel(nproc, sharding).validate()
    if setup.loss != "standard":
        raise LorabenchError(f"--loss {setup.loss} computes the loss outside the model's forward, which DDP and "
                             "fully_shard wrap; measure it without --nproc.")
    if setup.dtype in QUANTIZED:
        raise LorabenchError(f"--dtype {setup.dtype} with --nproc: bitsandbytes' packed weights are not run under "
                             "fully_shard or DDP here; measure it without --nproc.")
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < nproc:
            raise LorabenchError(f"--nproc {nproc} runs one process per GPU; this machine has "
                                 f"{torch.cuda.device_count()} CUDA device(s).")


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workers(folder: str) -> List[int]:
    """The pids of this case's workers that are still running (each wrote folder/pid-R as it started; a pid
    counts only while /proc says it is still a lorabench worker, so a reused pid is never signalled)."""
    pids = []
    for name in os.listdir(folder):
        if not name.startswith("pid-"):
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"lorabench.measure.distributed_worker" in f.read():
                    pids.append(pid)
        except (OSError, ValueError):  # gone, or no /proc: torchrun's own SIGTERM is all there is
            pass
    return pids


def _stop(proc: subprocess.Popen) -> None:
    """Stop a case still running (timeout, Ctrl-C, SIGTERM): SIGTERM to torchrun, which passes it to its
    workers and waits for them; after STOP_GRACE_S, SIGKILL to torchrun and to each worker still there (torchrun
    starts each in a process group of its own)."""
    if proc.poll() is not None:
        return
    folder = proc.args[proc.args.index("--out") + 1]
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(STOP_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):  # gone just now, or not gone in time
        pass
    for pid in _workers(folder):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def launch_case(case: Dict, nproc: int, timeout_s: float) -> List[Dict]:
    """Run one case on nproc processes under torchrun; one measured row per rank, in rank order. Ranks that
    wrote no row get one saying why (killed, stopped after another rank failed, or the timeout)."""
    folder = None
    try:
        with signals_deferred():  # folder is set before a signal can end the run
            folder = tempfile.mkdtemp(prefix="lorabench-dist-")
        return _run_case(case, nproc, timeout_s, folder)
    finally:
        if folder is not None:
            with signals_deferred():
                shutil.rmtree(folder, ignore_errors=True)


def _run_case(case: Dict, nproc: int, timeout_s: float, folder: str) -> List[Dict]:
    path = os.path.join(folder, "case.pickle")
    with open(path, "wb") as f:
        pickle.dump(case, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # --log-dir inside the case's folder: torchrun's own (a torchelastic_* folder in $TMPDIR) outlived every run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--max-restarts=0", f"--log-dir={os.path.join(folder, 'torchelastic')}", "-m",
           "lorabench.measure.distributed_worker", "--case", path, "--out", folder]
    log_path = os.path.join(folder, "torchrun.log")
    started = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        proc = None
        try:
            with signals_deferred():  # a signal inside Popen could leave torchrun running, unknown to us
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on Ctrl-C or SIGTERM here: nothing of the case outlives it
            if proc is not None:
                with signals_deferred():  # a second Ctrl-C must not cut the stop short (at most STOP_GRACE_S)
                    _stop(proc)
    wall_s = time.monotonic() - started
    rows = []
    for r in range(nproc):
        try:
            with open(os.path.join(folder, f"rank-{r}.json")) as f:
                rows.append(json.load(f))
        except (OSError, ValueError):
            rows.append({"gpu_rank": r, "nproc": nproc, "status": None, "error": None})
    exits, first = rank_exits(log_path)
    failed = [row["gpu_rank"] for row in rows if row["status"] in ("failed", "oom")]
    cause = failed[0] if failed else first
    for row in rows:
        r = row["gpu_rank"]
        if row["status"] is not None:
            continue
        if timed_out:
            row.update({"status": "timeout", "error": f"the case ran past --timeout {timeout_s:g} s and was "
                                                      "stopped"})
        elif r in exits and (r == cause or exits[r] != -signal.SIGTERM):  # torchrun's own stop is SIGTERM
            row.update({"status": "failed", "error": f"rank {r} {describe_exit(exits[r])} before it wrote its row"})
        elif cause is not None:
            how = "" if cause in failed or cause not in exits else f": it {describe_exit(exits[cause])}"
            row.update({"status": "stopped", "error": f"stopped by torchrun when rank {cause} failed{how}"})
        else:
            row.update({"status": "failed", "error": _log_tail(log_path) or
                        f"torchrun exited with {proc.returncode} and this rank wrote no row"})
    for row in rows:
        row["case_wall_s"] = wall_s
    return rows


_FAILURE_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\b")
_FAILURE_EXIT = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)\b")


def rank_exits(log_path: str) -> Tuple[Dict[int, int], Optional[int]]:
    """({rank: exit code}, the rank torchrun names as the root cause) from torchrun's failure summary, the
    ChildFailedError it prints when a worker fails (torch.distributed.elastic.multiprocessing.errors):

        Root Cause (first observed failure):
        [0]:
          ...
          rank      : 1 (local_rank: 1)
          exitcode  : -9 (pid: 5007)  (SIGKILL)

    A negative exit code is the signal that ended the rank. ({}, None) when there is no summary."""
    exits: Dict[int, int] = {}
    first, rank, root = None, None, False
    try:
        with open(log_path, errors="replace") as f:
            for line in f:
                if "Root Cause" in line:
                    root = True
                elif (m := _FAILURE_RANK.match(line)):
                    rank = int(m[1])
                elif rank is not None and (m := _FAILURE_EXIT.match(line)):
                    exits[rank] = int(m[1])
                    if root and first is None:
                        first = rank
                    rank = None
    except OSError:
        pass
    return exits, first


def describe_exit(code: int) -> str:
    """How a process ended, from torchrun's exit code: 'was killed by SIGKILL (exit code -9)'."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


def _log_tail(path: str) -> str:
    """The last error line torchrun or a worker printed (for a rank that wrote no row)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or [""])[-1][:300]


def _rank_estimate(case: Case, gpu, nproc: int, sharding: str, gpu_rank: int) -> Dict:
    """bench's estimate fields for the case, with one rank's share under the strategy."""
    from lorabench.measure.bench import _estimate_fields
    from lorabench.estimator.comms import comm_volume
    from lorabench.estimator.rows import RANK_FIELDS
    from lorabench.estimator.sharding import Parallel, plan_step, rank_memory

    row = _estimate_fields(case, gpu)
    parallel = Parallel(nproc, sharding)
    plan = plan_step(replace(case, targets=tuple(row["targets"].split(",")) if row["targets"] else None))
    volume = comm_volume(plan, parallel)
    row.update({"gpus": nproc, "sharding": sharding, "comm_all_gather_bytes": volume.all_gather_bytes,
                "comm_reduce_scatter_bytes": volume.reduce_scatter_bytes,
                "comm_all_reduce_bytes": volume.all_reduce_bytes, "comm_bytes": volume.total_bytes})
    if parallel.single:  # bench's own estimate, as it is
        row.update({"bucket_bytes": 0, "gather_bytes": 0, "reduce_scatter_bytes": 0})
        return row
    rm = rank_memory(plan, parallel, gpu_rank)
    row.update({k: getattr(rm, k) for k in RANK_FIELDS})
    row.update({"bucket_bytes": rm.bucket_bytes, "gather_bytes": rm.gather_bytes,
                "reduce_scatter_bytes": rm.reduce_scatter_bytes})
    # what forward leaves alive: the activations and what stays gathered once it has returned
    row["estimated_after_forward_bytes"] += rm.held.gathered.after_forward_bytes
    return row


def distributed_case(case: Case, *, nproc: int, sharding: str, device: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                     layers: Optional[int] = None, steps: int = 5, warmup: int = 2, impl: str = "peft",
                     tolerance_pct: float = 5.0, gpu=None, info: Optional[Dict] = None, seed: int = 0) -> List[Dict]:
    """One case on nproc processes: a row per rank with the estimate for that rank, what it measured, the
    error and the verdict; every row carries the largest rank error of the case (largest_rank_error_pct)."""
    spec, method, rank, setup = case.spec, case.method, case.rank, case.setup
    cut = spec.with_layers(layers) if layers and layers < spec.num_layers else spec
    setup = replace(setup, device=device, impl=impl)
    case = replace(case, spec=cut, setup=setup)
    first = _rank_estimate(case, gpu, nproc, sharding, 0)
    resolved = tuple(first["targets"].split(",")) if first["targets"] else None
    job = {"spec": cut, "method": method, "rank": rank, "targets": resolved, "setup": setup, "impl": impl,
            "sharding": sharding, "steps": steps, "warmup": warmup, "seed": seed, "device": device,
            "timeout_s": timeout_s}
    measured = launch_case(job, nproc, timeout_s)
    rows = []
    for r, got in enumerate(measured):
        row = first if r == 0 else _rank_estimate(case, gpu, nproc, sharding, r)
        row.update({"model": spec.name, "layers": cut.num_layers, "full_layers": spec.num_layers, "impl": impl,
                    "tolerance_pct": tolerance_pct, "steps": steps, "warmup": warmup, "nproc": nproc})
        row.update(info or {})
        row.update(got)
        row["peak_error_pct"] = error_pct(row["peak_bytes"], row.get("measured_peak_bytes"))
        row["activations_error_pct"] = error_pct(row["estimated_after_forward_bytes"],
                                                  row.get("measured_activations_bytes"))
        row["comm_error_bytes"] = (None if row.get("measured_comm_bytes") is None
                                   else row["comm_bytes"] - row["measured_comm_bytes"])
        row["within_tolerance"] = (None if row["peak_error_pct"] is None
                                   else abs(row["peak_error_pct"]) <= tolerance_pct)
        cap = row.get("device_memory_bytes")
        row["estimated_fits"] = None if cap is None else row["device_bytes"] <= cap
        step_ms = row.get("measured_step_ms")
        if step_ms:
            row["measured_tokens_per_s"] = setup.tokens * setup.grad_accum / (step_ms / 1e3)
        rows.append(row)
    errors = [r["peak_error_pct"] for r in rows if r["peak_error_pct"] is not None]
    largest = max(errors, key=abs) if errors else None
    for row in rows:
        row["largest_rank_error_pct"] = largest
    return rows


def run_distributed_bench(spec: ModelSpec, methods: Sequence[Method], ranks: Sequence[int], targets,
                          setup: TrainingSetup, *, nproc: int, sharding: str, timeout_s: float = DEFAULT_TIMEOUT_S,
                          layers: Optional[int] = None, steps: int = 5, warmup: int = 2, impl: str = "peft",
                          tolerance_pct: float = 5.0, progress: bool = True, gpu=None, device: Optional[str] = None,
                          on_row: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
    """Every (method, rank) on nproc processes under `sharding`; a row per rank (distributed_case).

    Raises:
        LorabenchError: bad options (as run_bench, and check_distributed).
    """
    import torch

    from lorabench.measure.bench import IMPLS, catalog_gpu
    from lorabench.measure.probes import device_info

    if impl not in IMPLS:
        raise LorabenchError(f"unknown implementation '{impl}'; choose from {', '.join(IMPLS)}.")
    if steps < 1 or warmup < 1:
        raise LorabenchError("--steps and --warmup must be at least 1.")
    if not timeout_s > 0:
        raise LorabenchError(f"--timeout must be positive, got {timeout_s!r}.")
    setup = setup.for_spec(spec)
    if spec.single_matrix:
        raise LorabenchError("bench builds a model; a bare --d matrix has no forward pass to run.")
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda" and not torch.cuda.is_available():
        raise LorabenchError("--device cuda: no CUDA device is available here; use --device cpu.")
    check_distributed(nproc, sharding, setup, dev)
    setup = replace(setup, device=dev)
    setup.validate()
    from lorabench import __version__

    info = {"lorabench_version": __version__, **device_info(torch.device(dev))}
    if gpu is None and dev == "cuda":
        gpu = catalog_gpu(info["device_name"])
    info["gpu"] = gpu.name if gpu else None
    cases = [(m, r) for m in methods for r in (ranks if m.uses_rank else [None])]
    from tqdm.auto import tqdm

    rows: List[Dict] = []
    bar = tqdm(cases, desc=f"bench x{nproc}", unit="case", file=sys.stderr, leave=False,
               disable=None if progress else True)
    for method, rank in bar:
        bar.set_postfix_str(f"{method.name}" + (f" r={rank}" if rank else ""))
        for row in distributed_case(Case(spec, method, rank, targets, setup), nproc=nproc, sharding=sharding,
                                    device=dev, timeout_s=timeout_s, layers=layers, steps=steps, warmup=warmup,
                                    impl=impl, tolerance_pct=tolerance_pct, gpu=gpu, info=info):
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


__all__ = ["run_distributed_bench", "distributed_case", "launch_case", "check_distributed", "DEFAULT_TIMEOUT_S"]
