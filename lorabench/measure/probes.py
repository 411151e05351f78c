"""Measuring memory and time on the device a step runs on: the probes `lorabench bench` reads.

Memory:
- CUDA: the caching allocator's own counters (`torch.cuda.memory_allocated`, `max_memory_allocated`
  with `reset_peak_memory_stats` per phase), and NVML (nvidia-ml-py) for the whole process's device
  memory, CUDA context included.
- Any device (CPU included): `LiveTensorTracker`, a TorchDispatchMode that sees every tensor an op
  returns (autograd's backward ops too: the engine carries the mode to its threads), and holds a weak
  reference to each storage, so it knows the bytes of live storages at every moment and their peak.
  It counts exact `nbytes`, without the CUDA allocator's 512-byte rounding or a CPU allocator's slack.

Time: CUDA events around each phase (recorded on the stream, read after one synchronize), or
`time.perf_counter` on the CPU, whose ops are synchronous. The matmul ceiling is timed with
`torch.utils.benchmark.Timer`, which synchronizes CUDA itself.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
import weakref
from typing import Dict, Iterable, List, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorabench.measure.envinfo import nvml_info


class LiveTensorTracker(TorchDispatchMode):
    """Bytes of the live tensor storages created while the mode is active, and their peak.

    Storages are counted once however many views share them, and leave the count when their last
    reference dies (a weakref callback on the storage), also after the mode has exited. A DTensor counts
    as its local shard (the ops inside DTensor's own dispatch run with the mode set aside, so its shard is
    taken from the DTensor an op returns). `UntypedStorage.resize_` does not go through the dispatcher, and
    FSDP2 frees and re-allocates its unsharded parameters with it (_fsdp_param.free_storage /
    alloc_storage): while the mode is active resize_ is wrapped to count the new size.

    Example:
        with LiveTensorTracker() as tracker:
            model = build(); out = model(x); tracker.reset_peak(); out.sum().backward()
        tracker.peak_bytes  # the backward's peak, every live tensor counted
    """

    def __init__(self, device_type: Optional[str] = None, record_events: bool = False):
        super().__init__()
        self.device_type = device_type
        # the allocations and frees of device storages, in order, ("a" or "f", storage, bytes): what
        # estimator.allocator.replay turns into the CUDA caching allocator's reserved bytes
        self.events: Optional[list] = [] if record_events else None
        self._live: Dict[int, list] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        # storages that stand for host memory (measure.offload's copies on a machine without a GPU): counted apart
        self._host: set = set()
        self.host_bytes = 0
        self.host_peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def __enter__(self):
        original, tracker = torch.UntypedStorage.resize_, self

        def resize_(storage, size):
            out = original(storage, size)
            # a fake tensor's storage is a meta one: counted when the tracker already holds it
            if storage._cdata in tracker._live or (storage.device.type != "meta" and (
                    not tracker.device_type or storage.device.type == tracker.device_type)):
                tracker._track_storage(storage)
            return out

        self._original_resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._original_resize
        return super().__exit__(*exc)

    def track(self, tensors: Iterable[torch.Tensor]) -> None:
        """Count tensors made outside the mode (already counted storages are skipped)."""
        for t in tensors:
            self._track(t)

    def _track(self, t: torch.Tensor) -> None:
        t = local_tensor(t)
        if t.device.type == "meta" or (self.device_type and t.device.type != self.device_type):
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return
        self._track_storage(st)

    def _track_storage(self, st) -> None:
        key, nbytes = st._cdata, st.nbytes()
        entry = self._live.get(key)
        if entry is not None:
            if entry[0] != nbytes:  # resized in place (out= ops)
                if self.events is not None and key not in self._host:
                    self.events += [("f", key, entry[0]), ("a", key, nbytes)]
                self._add(nbytes - entry[0])
                entry[0] = nbytes
            return
        self._live[key] = [nbytes, weakref.ref(st, lambda _ref, k=key: self._free(k))]
        if self.events is not None:
            self.events.append(("a", key, nbytes))
        self._add(nbytes)

    def _add(self, nbytes: int) -> None:
        self.current_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.current_bytes)

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is None:
            return
        if key in self._host:
            self._host.discard(key)
            self.host_bytes -= entry[0]
        else:
            self.current_bytes -= entry[0]
            if self.events is not None:
                self.events.append(("f", key, entry[0]))

    def as_host(self, t: torch.Tensor) -> None:
        """Count t's storage as host memory from now on (a copy that stands for one in pinned host memory): out of
        current_bytes and its peak, into host_bytes and host_peak_bytes."""
        st = local_tensor(t).untyped_storage()
        key = st._cdata
        if key in self._host:
            return
        entry = self._live.get(key)
        if entry is None:  # made outside the mode: never counted on the device
            entry = self._live[key] = [st.nbytes(), weakref.ref(st, lambda _ref, k=key: self._free(k))]
        else:
            self.current_bytes -= entry[0]
            if self.events is not None:
                self.events.append(("f", key, entry[0]))
        self._host.add(key)
        self.host_bytes += entry[0]
        self.host_peak_bytes = max(self.host_peak_bytes, self.host_bytes)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes


class MemoryProbe:
    """Current and peak bytes on one device, relative to where the probe was made.

    CUDA reads the caching allocator; other devices need a LiveTensorTracker that was active while the
    tensors were made.
    """

    def __init__(self, device: torch.device, tracker: Optional[LiveTensorTracker] = None):
        self.device, self.tracker = torch.device(device), tracker
        self.cuda = self.device.type == "cuda"
        if not self.cuda and tracker is None:
            raise ValueError("memory on a non-CUDA device needs a LiveTensorTracker")
        self.base = self._raw_current()

    def _raw_current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else self.tracker.current_bytes

    def current(self) -> int:
        return self._raw_current() - self.base

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracker.reset_peak()

    def peak(self) -> int:
        raw = torch.cuda.max_memory_allocated(self.device) if self.cuda else self.tracker.peak_bytes
        return raw - self.base


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what this process stores: `_local_tensor`, what to_local() returns), or t."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local


def storage_bytes(tensors: Iterable[Optional[torch.Tensor]]) -> int:
    """Bytes of the distinct storages behind tensors (views and shared storages counted once; a DTensor's
    local shard's storage, padding included)."""
    seen: Dict[int, int] = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        t = local_tensor(t)
        st = t.untyped_storage()
        seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def nvml_process_bytes(device: torch.device) -> Optional[int]:
    """Device memory NVML attributes to this process (CUDA context included), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.device(device).index or 0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
        return None  # in a container NVML may not see our pid
    except Exception:  # noqa: BLE001 - NVML absent, no driver, or not permitted: nothing to report
        return None


def device_info(device: torch.device) -> Dict[str, Optional[str]]:
    """What the measurement ran on: device name, driver, torch and CUDA versions."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    return {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if cuda
                        else f"CPU {platform.machine()}, {torch.get_num_threads()} threads"),
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "driver": nvml_info()["driver_version"] if cuda else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


class PhaseTimer:
    """Times consecutive phases of a step: mark(name) ends the phase begun at the previous mark; a name
    marked several times (one per micro-batch) gets the sum of its phases.

    CUDA: events recorded on the current stream, read after a synchronize in finish(). CPU: perf_counter.
    """

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self._marks: List[tuple] = []

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def mark(self, name: str) -> None:
        self._marks.append((name, self._now()))

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def finish(self) -> Dict[str, float]:
        """Milliseconds per phase, and 'step' for the whole."""
        if self.cuda:
            torch.cuda.synchronize()
            ms = [a.elapsed_time(b) for (_, a), (_, b) in zip(self._marks, self._marks[1:])]
            total = self._marks[0][1].elapsed_time(self._marks[-1][1])
        else:
            ms = [(b - a) * 1e3 for (_, a), (_, b) in zip(self._marks, self._marks[1:])]
            total = (self._marks[-1][1] - self._marks[0][1]) * 1e3
        out: Dict[str, float] = {}
        for (name, _), t in zip(self._marks[1:], ms):  # a phase marked again (micro-batches) adds up
            out[name] = out.get(name, 0.0) + t
        out["step"] = total
        return out


def summarize(samples: List[float]) -> Dict[str, float]:
    """Median and spread (interquartile range, min, max) of timing samples."""
    if len(samples) == 1:
        return {"median": samples[0], "iqr": 0.0, "min": samples[0], "max": samples[0]}
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return {"median": statistics.median(samples), "iqr": q[2] - q[0], "min": min(samples), "max": max(samples)}


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: Optional[int] = None,
                       min_run_time: float = 0.2) -> float:
    """Achievable dense matmul FLOP/s here: an n x n x n product timed with torch.utils.benchmark
    (2 n^3 FLOPs per product). The ceiling a training step's matmuls can approach on this device."""
    from torch.utils.benchmark import Timer

    device = torch.device(device)
    if n is None and device.type == "cpu":
        # a CPU without bf16 units (no AVX-512 BF16, no AMX) multiplies bf16 at well under 1 GFLOP/s, where one
        # 1024^3 product would take seconds: a 256^3 one first says which size to time
        a = torch.randn(256, 256, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, a)
        n = 1024 if time.perf_counter() - start < 2e-3 else 256
    n = n or 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timer = Timer("torch.mm(a, b)", globals={"torch": torch, "a": a, "b": b})
    seconds = timer.blocked_autorange(min_run_time=min_run_time).median
    return 2 * n ** 3 / seconds


_CPU_RATES: Dict[str, float] = {}


def cpu_matmul_rates() -> Dict[str, float]:
    """This CPU's matmul ceilings, FLOP/s: {"bf16": ..., "fp32": ...}, measured once per process. CPUs differ
    by a thousandfold in bf16 (AMX or AVX-512 BF16 run it faster than fp32; without them torch falls back to
    a scalar loop) while fp32 stays within a few times, so neither is derived from the other."""
    if not _CPU_RATES:
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            _CPU_RATES[name] = matmul_flops_per_s(torch.device("cpu"), dtype, min_run_time=0.1)
    return dict(_CPU_RATES)


def warm_cuda_libraries(device: torch.device) -> None:
    """Create cuBLAS's handles and workspaces before any case is measured.

    cuBLAS keeps one handle per thread, and its workspace (32 MiB on Hopper) comes from the caching
    allocator the first time a thread multiplies: backward runs on autograd's own device thread, so
    without this the first case measured in a process reads 32 MiB more than the rest (seen on an H100:
    full fine-tuning, the first case, -0.17% at Llama-3-8B and -29% at tiny-llama). The estimate counts
    the workspace with the runtime's overhead, outside the peak, as it is for every later case.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
        w = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(64, device=device, dtype=dtype, requires_grad=True)
        torch.nn.functional.linear(x @ w, w, b).sum().backward()  # cuBLAS and cuBLASLt, both threads
    torch.cuda.synchronize(device)


__all__ = ["LiveTensorTracker", "MemoryProbe", "PhaseTimer", "local_tensor", "storage_bytes", "nvml_process_bytes",
           "device_info", "summarize", "matmul_flops_per_s", "cpu_matmul_rates", "warm_cuda_libraries"]
