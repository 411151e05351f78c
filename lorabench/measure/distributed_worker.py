"""What one rank of `lorabench bench --nproc N` runs, started by torch.distributed.run (torchrun), which sets
RANK, LOCAL_RANK and WORLD_SIZE and does the rendezvous:

    python -m torch.distributed.run --standalone --nproc-per-node N -m lorabench.measure.distributed_worker \\
        --case CASE.pickle --out DIR

It joins the process group (NCCL with one GPU per rank on CUDA, gloo on the CPU), builds the case with bench's
own builders (the same seed on every rank: the same initial weights, as loading a checkpoint gives), applies the
strategy (lorabench.measure.distributed), runs the warm-up steps and one step whose memory is read phase by phase
(CUDA: the allocator's peak; CPU: the live-tensor tracker, this rank's own tensors) with its collectives counted,
then the timed steps; each rank draws its own batch. It writes its row to DIR/rank-R.json (a temporary file
renamed into place: the parent never reads half a row) and exits 0, or, when it fails or runs out of memory,
writes a row saying so and exits 1, so that torchrun stops the other ranks.

LORABENCH_FAULT=R:raise (R:hang, R:kill) makes rank R fail (sleep, SIGKILL itself) before it builds: the test hook
for what happens to the others (tests/test_distributed.py).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import sys
import time
import traceback
from datetime import timedelta
from typing import Dict

FAULT_ENV = "LORABENCH_FAULT"


def write_row(out_dir: str, rank: int, row: Dict) -> None:
    """DIR/rank-R.json, whole or not at all (written aside, then renamed)."""
    path = os.path.join(out_dir, f"rank-{rank}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, path)


def _fault(rank: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return
    who, _, kind = spec.partition(":")
    if who.strip() != str(rank):
        return
    if kind == "hang":
        while True:
            time.sleep(3600)
    if kind == "kill":  # dies as the kernel's OOM killer or a scheduler would end it: no row, no traceback
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"{FAULT_ENV}={spec}: rank {rank} fails on purpose")


def run_rank(case: Dict, rank: int, world: int, local_rank: int) -> Dict:
    """This rank's measured fields (lorabench.measure.bench.measure_case under the case's strategy) and its
    collectives during the measured step."""
    import torch
    import torch.distributed as dist

    from lorabench.estimator.case import Case
    from lorabench.measure.bench import RankHooks, measure_case
    from lorabench.measure.distributed import CommCounter, parallelize, settle
    from lorabench.measure.probes import storage_bytes, warm_cuda_libraries

    device = torch.device("cuda", local_rank) if case["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=case["timeout_s"]),
                            device_id=device if device.type == "cuda" else None)
    _fault(rank)
    warm_cuda_libraries(device)  # cuBLAS's workspaces before the measurement, as bench does (a fresh process)
    counter = CommCounter()

    def shards(built) -> Dict:  # what this rank stores of the parameters: the DTensors' local shards, padded
        params = list(built.model.parameters())
        return {"measured_param_shard_bytes": storage_bytes(params),
                "measured_trainable_shard_bytes": storage_bytes(p for p in params if p.requires_grad),
                "measured_optimizer_tensors": sum(1 for s in built.optimizer.state.values() for t in s.values()
                                                  if isinstance(t, torch.Tensor))}

    rec = measure_case(Case(case["spec"], case["method"], case["rank"], case["targets"], case["setup"]), device,
                       case["steps"], case["warmup"], case["impl"], seed=case["seed"],
                       hooks=RankHooks(lambda model: parallelize(model, case["sharding"], device), counter,
                                       settle if device.type == "cpu" else None, case["seed"] + rank, shards))
    sent = counter.sent_bytes(world)
    rec.update({f"measured_comm_{kind}_bytes": sent[kind] for kind in sent})
    rec["measured_comm_bytes"] = sum(sent.values())
    rec.update({f"measured_{kind}_buffer_bytes": counter.buffer_bytes[kind] for kind in counter.buffer_bytes})
    rec.update({f"measured_{kind}_calls": counter.calls[kind] for kind in counter.calls})
    dist.destroy_process_group()
    return rec


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lorabench.measure.distributed_worker",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--case", required=True, help="the case, pickled by lorabench.measure.launch")
    parser.add_argument("--out", required=True, help="folder for rank-R.json")
    args = parser.parse_args(argv)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    with open(os.path.join(args.out, f"pid-{rank}"), "w") as f:  # for the launcher, should it have to stop us
        f.write(str(os.getpid()))
    with open(args.case, "rb") as f:
        case = pickle.load(f)
    row: Dict = {"gpu_rank": rank, "nproc": world, "status": "ok", "error": None, "pid": os.getpid()}
    code = 0
    try:
        import torch

        from lorabench.measure.bench import _is_oom
        from lorabench.errors import LorabenchError
        from lorabench.measure.probes import device_info

        row.update(device_info(torch.device("cuda", local_rank) if case["device"] == "cuda" else torch.device("cpu")))
        try:
            row.update(run_rank(case, rank, world, local_rank))
        except LorabenchError as exc:  # the case cannot run here: every rank says the same
            row.update({"status": "skipped", "error": str(exc)})
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc):
                raise
            row.update({"status": "oom", "error": str(exc).splitlines()[0][:200]})
            code = 1
    except Exception as exc:  # noqa: BLE001 - any failure becomes this rank's row
        lines = str(exc).strip().splitlines() or [""]
        row.update({"status": "failed", "error": f"{type(exc).__name__}: {lines[0][:300]}"})
        traceback.print_exc(file=sys.stderr)
        code = 1
    write_row(args.out, rank, row)
    return code


if __name__ == "__main__":
    sys.exit(main())
