"""`lorabench bench`: real training steps, timed and measured, next to the estimate for the same setup.

For each (method, rank) it builds the model (Hugging Face transformers + PEFT with impl="peft", the default
everywhere (lorabench.estimator.setup.DEFAULT_IMPL), or lorabench's own modules with impl="lorabench"), runs
warm-up steps (first calls, allocator growth and optimizer-state creation stay out of the numbers), one step
whose memory is read phase by phase, and timed steps. Memory comes from the CUDA caching allocator on a GPU
and from a live-tensor tracker elsewhere (lorabench.measure.probes).

A model cut to N layers (layers=N) is measured as built; the full-depth figures beside it add the
estimator's per-layer terms for the layers not built (memory) and scale time by the FLOPs.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lorabench import __version__

from lorabench.safety import signals
from lorabench.estimator.case import Case
from lorabench.estimator.compute import cpu_device, device_for_gpu, estimate_step_time
from lorabench.errors import LorabenchError
from lorabench.estimator.rows import error_pct, memory_rows
from lorabench.gpus import GPU, GPUS
from lorabench.measure.probes import (LiveTensorTracker, MemoryProbe, PhaseTimer, cpu_matmul_rates, device_info,
                               matmul_flops_per_s, nvml_process_bytes, storage_bytes, summarize,
                               warm_cuda_libraries)
from lorabench.measure.batches import batch_tensors
from lorabench.measure.offload import host_memory
from lorabench.measure.builders import (BUILDERS, KBIT_LORABENCH, TORCH_DTYPES, Built, Wrap,  # noqa: F401
                                build_lorabench, build_peft, expected_library_warnings)
from lorabench.measure.steps import Step, forward_with_loss, stepper
from lorabench.estimator.memory import step_parts
from lorabench.estimator.setup import DEFAULT_IMPL, IMPLS, PHASES, QUANTIZED, TrainingSetup
from lorabench.methods import Method
from lorabench.render.formats import flops_text
from lorabench.models.spec import ModelSpec


def _timed_step(step: Step, ids: torch.Tensor, timer: PhaseTimer) -> Dict[str, float]:
    """Milliseconds per phase of one step (micro-batches summed), and of the whole."""
    step(ids, lambda phase: timer.start() if phase == "start" else timer.mark(phase))
    return timer.finish()


def _memory_step(built: Built, step: Step, ids: torch.Tensor, probe: MemoryProbe,
                 settle: Optional[Callable[[MemoryProbe], None]] = None) -> Dict[str, int]:
    """One step with the memory read at the phase boundaries: the peak of each phase (the largest over the
    micro-batches), what the first forward left alive, the gradients as the last backward left them and the
    optimizer states after its step. settle(probe) runs at each boundary before the reading."""
    read: Dict[str, int] = {}

    def mark(phase: str) -> None:
        if settle is not None:
            settle(probe)
        if phase == "start":
            if probe.cuda:
                torch.cuda.synchronize()
            read["start"] = probe.current()
        else:
            read[f"{phase}_peak"] = max(read.get(f"{phase}_peak", 0), probe.peak())
        if phase == "forward" and "after_forward" not in read:
            read["after_forward"] = probe.current()
        elif phase == "backward":
            params = [p for group in built.optimizer.param_groups for p in group["params"]]
            read["grads"] = storage_bytes(p.grad for p in params)
        elif phase == "optimizer":
            read["states"] = storage_bytes(t for s in built.optimizer.state.values() for t in s.values()
                                           if isinstance(t, torch.Tensor))
        probe.reset_peak()

    step(ids, mark)
    return {
        "measured_weights_bytes": storage_bytes(built.base_tensors),
        "measured_adapter_bytes": storage_bytes(built.adapter_tensors),
        "measured_gradients_bytes": read["grads"],
        "measured_optimizer_bytes": read["states"],
        "measured_method_state_bytes": storage_bytes(built.step_state()),
        "measured_persistent_bytes": read["start"],
        "measured_activations_bytes": read["after_forward"] - read["start"],
        **{f"measured_{phase}_peak_bytes": read[f"{phase}_peak"] for phase in PHASES},
        "measured_peak_bytes": max(read[f"{phase}_peak"] for phase in PHASES),
    }


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


@dataclass
class RankHooks:
    """What one data-parallel rank adds to measure_case (lorabench.measure.distributed_worker).

    Attributes:
        wrap: the strategy, applied to the built model before its optimizer is made (lorabench.measure.distributed).
        around_memory_step: a context manager entered around the step whose memory is read (CommCounter).
        settle: called with the probe at each phase boundary before it is read (lorabench.measure.distributed.settle).
        data_seed: the seed of this rank's batch.
        inspect: called with the Built after the measured step; what it returns joins the measured fields.
    """

    wrap: Optional[Wrap] = None
    around_memory_step: object = None
    settle: Optional[Callable[[MemoryProbe], None]] = None
    data_seed: Optional[int] = None
    inspect: Optional[Callable[[Built], Dict]] = None


def measure_case(case: Case, device: torch.device, steps: int = 5, warmup: int = 2, impl: str = DEFAULT_IMPL,
                 seed: int = 0, hooks: RankHooks = RankHooks()) -> Dict:
    """Build, warm up, measure memory per phase, then time `steps` steps. Returns the measured fields.
    hooks: what a data-parallel rank adds (RankHooks).

    Raises:
        LorabenchError: bad arguments, or an implementation that cannot build this case.
        torch.cuda.OutOfMemoryError (or RuntimeError out of memory): the case does not fit.
    """
    spec, setup = case.spec, case.setup
    if warmup < 1:
        raise LorabenchError("--warmup must be at least 1: the first step creates the optimizer states.")
    setup = setup.for_spec(spec)
    cuda = device.type == "cuda"
    tracker = None if cuda else LiveTensorTracker(device.type)
    built = None
    close = None
    try:
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
        with tracker if tracker is not None else contextlib.nullcontext():
            probe = MemoryProbe(device, tracker)
            built = BUILDERS[impl](replace(case, setup=setup), device, seed, hooks.wrap)
            if tracker is not None:  # tensors a checkpoint load made outside torch's dispatcher
                tracker.track(built.base_tensors + built.adapter_tensors)
            built = forward_with_loss(built, spec, setup, device, impl)
            g = torch.Generator().manual_seed(seed if hooks.data_seed is None else hooks.data_seed)
            batch = {k: t.to(device) for k, t in batch_tensors(setup, spec.vocab_size, g).items()}
            ids = batch.pop("input_ids")
            built.inputs.update(batch)
            step, close = stepper(built, setup, device)
            for _ in range(warmup):
                step(ids, lambda phase: None)
            host = host_memory(tracker.as_host) if tracker is not None else contextlib.nullcontext()
            with hooks.around_memory_step or contextlib.nullcontext(), host:
                rec = _memory_step(built, step, ids, probe, hooks.settle)
            if tracker is not None:  # host copies (measure.offload), not on the device
                rec["measured_host_bytes"] = tracker.host_peak_bytes
            if hooks.inspect is not None:
                rec.update(hooks.inspect(built))
        if cuda:
            rec["measured_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
            rec["measured_device_bytes"] = nvml_process_bytes(device)
        timer = PhaseTimer(device)
        # on the CPU outside the tracker: it would slow every op
        samples = [_timed_step(step, ids, timer) for _ in range(steps)]
        for phase in PHASES + ("step",):
            stats = summarize([s[phase] for s in samples])
            rec[f"measured_{phase}_ms"] = stats["median"]
            rec[f"measured_{phase}_ms_iqr"] = stats["iqr"]
        rec["measured_step_ms_min"], rec["measured_step_ms_max"] = stats["min"], stats["max"]
        return rec
    finally:
        if close is not None:
            close()
        del built
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def catalog_gpu(device_name: str) -> Optional[GPU]:
    """The catalog entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    name = device_name.upper().replace(" ", "")
    order = [("H200", "H200"), ("H100PCIE", "H100-PCIe"), ("H100", "H100-80GB"), ("A10080GB", "A100-80GB"),
             ("A100", "A100-40GB"), ("L40S", "L40S"), ("L4", "L4"), ("4090", "RTX-4090"), ("3090", "RTX-3090")]
    for key, gpu in order:
        if key in name:
            return GPUS[gpu]
    return None


def _estimate_fields(case: Case, gpu: Optional[GPU]) -> Dict:
    row = memory_rows(case.spec, [case.method], [case.rank], case.targets, case.setup, gpu)[0]  # full ignores the rank
    parts = step_parts(case)
    # What is alive when forward returns: the saved activations and the logits/loss tensors.
    row["estimated_after_forward_bytes"] = parts.act.after_forward_bytes
    return row


def bench_case(case: Case, *, device: torch.device, layers: Optional[int] = None, steps: int = 5, warmup: int = 2,
               impl: str = DEFAULT_IMPL, tolerance_pct: float = 5.0, gpu: Optional[GPU] = None,
               matmul_flops: Optional[float] = None, info: Optional[Dict] = None) -> Dict:
    """One row: the estimate for the model as built, what was measured, the error and the verdict."""
    spec, setup = case.spec, case.setup
    full_spec = spec
    cut = spec.with_layers(layers) if layers and layers < spec.num_layers else spec
    setup = replace(setup, device=device.type, impl=impl)
    case = replace(case, spec=cut, setup=setup)
    row = _estimate_fields(case, gpu)
    row.update({"model": full_spec.name, "layers": cut.num_layers, "full_layers": full_spec.num_layers,
                "impl": impl, "status": "ok", "error": None, "tolerance_pct": tolerance_pct,
                "steps": steps, "warmup": warmup})
    row.update(info or {})
    targets = tuple(row["targets"].split(",")) if row["targets"] else None
    try:
        row.update(measure_case(replace(case, targets=targets), device, steps, warmup, impl))
    except LorabenchError as exc:
        row.update({"status": "skipped", "error": str(exc)})
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_oom(exc):
            raise
        row.update({"status": "oom", "error": str(exc).splitlines()[0][:200]})
    cap = row.get("device_memory_bytes")
    row["estimated_fits"] = None if cap is None else row["device_bytes"] <= cap
    measured = row.get("measured_peak_bytes")
    row["peak_error_pct"] = error_pct(row["peak_bytes"], measured)
    row["activations_error_pct"] = error_pct(row["estimated_after_forward_bytes"],
                                              row.get("measured_activations_bytes"))
    # NVML sees the whole process: the estimate's peak + CUDA context, against allocated + the allocator's
    # cached blocks + context (so fragmentation shows here, not in peak_error_pct)
    row["device_error_pct"] = error_pct(row["device_bytes"], row.get("measured_device_bytes"))
    row["within_tolerance"] = (None if row["peak_error_pct"] is None
                               else abs(row["peak_error_pct"]) <= tolerance_pct)
    step_ms = row.get("measured_step_ms")
    # The time model for the device measured: the catalog GPU found, or the CPU at its measured matmul ceiling.
    model = (device_for_gpu(gpu) if device.type == "cuda" and gpu is not None
             else cpu_device(row["matmul_bf16_tflops"] * 1e12, row["matmul_fp32_tflops"] * 1e12)
             if device.type == "cpu" and row.get("matmul_bf16_tflops") else None)
    if model is not None and row["status"] == "ok":
        est = estimate_step_time(replace(case, targets=targets or None), model)
        row["estimated_step_ms"] = est.step_ms
        row["step_error_pct"] = None if not step_ms else 100.0 * (est.step_ms - step_ms) / step_ms
    if step_ms:
        row["measured_tokens_per_s"] = setup.tokens * setup.grad_accum / (step_ms / 1e3)
        row["achieved_tflops"] = row["step_flops"] / (step_ms / 1e3) / 1e12
        row["matmul_tflops"] = None if matmul_flops is None else matmul_flops / 1e12
        row["fraction_of_matmul"] = None if matmul_flops is None else row["achieved_tflops"] * 1e12 / matmul_flops
        peak = gpu.bf16_flops if gpu is not None and (setup.dtype != "fp32" or setup.autocast) else None
        row["catalog_tflops"] = None if peak is None else peak / 1e12
        row["mfu_measured"] = None if peak is None else row["achieved_tflops"] * 1e12 / peak
    if cut is not full_spec:
        full = _estimate_fields(replace(case, spec=full_spec, targets=targets), gpu)
        row["full_peak_bytes"] = full["peak_bytes"]
        row["full_step_flops"] = full["step_flops"]
        if measured is not None:
            # measured at N layers + the estimator's per-layer terms for the L - N layers not built
            row["full_projected_peak_bytes"] = measured + full["peak_bytes"] - row["peak_bytes"]
        if step_ms:
            row["full_projected_step_ms"] = step_ms * full["step_flops"] / row["step_flops"]
    return row


def _preload(impl: str, quantized: bool = False) -> None:
    """Import now what the cases import later. A Ctrl-C that lands inside an import (torch's, transformers'
    lazy model modules) can leave a module half-initialised: the next use then fails oddly or aborts the
    process. Run under signals_deferred, the signal takes effect once the imports are whole."""
    import torch.utils.benchmark  # noqa: F401  (the matmul ceiling)
    import tqdm.auto  # noqa: F401

    # bitsandbytes (imported by transformers and PEFT where installed) fetches a CPU 4-bit kernel from the Hub
    # at import and, offline, logs its fallback to its own kernel: nothing a reader of a benchmark acts on
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    import lorabench.nn.adapters  # noqa: F401
    import lorabench.nn.model  # noqa: F401
    import lorabench.nn.optim  # noqa: F401
    if quantized:
        with contextlib.suppress(ImportError):  # (the builders say so, per case)
            import bitsandbytes  # noqa: F401
    if impl == "peft":
        try:
            import peft
            import peft.optimizers  # noqa: F401
            import transformers
        except ImportError:
            return  # build_peft says so, per case
        for name in ("LlamaConfig", "LlamaForCausalLM", "Qwen2Config", "Qwen2ForCausalLM"):
            getattr(transformers, name)  # transformers imports a model's module on first access
        peft.get_peft_model, peft.LoraConfig, peft.VeraConfig  # noqa: B018


def bench_device(device: Optional[str] = None) -> torch.device:
    """The device bench runs on: the one asked for, else CUDA where there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cpu_dtype(setup: TrainingSetup, dtype_given: bool, device: Optional[str] = None
              ) -> Tuple[TrainingSetup, Optional[str]]:
    """The setup bench runs on `device` (bench_device), and a note. Where it is a CPU that multiplies bf16
    slower than fp32 (no AVX-512 BF16, no AMX: torch falls back to a scalar loop, seen at 0.29 GFLOP/s against
    17.5 for fp32), a bf16 weight dtype that was not asked for becomes fp32; one that was asked for stays, with
    a note on why it is slow."""
    if bench_device(device).type != "cpu" or not setup.uses_bf16:
        return setup, None
    rates = cpu_matmul_rates()
    bf16, fp32 = rates["bf16"], rates["fp32"]
    if bf16 >= fp32:
        return setup, None
    why = (f"this CPU multiplies bf16 at {flops_text(bf16, 2)} against {flops_text(fp32, 2)} for fp32 (it has no "
           "AVX-512 BF16 or AMX)")
    if dtype_given or setup.dtype != "bf16" or setup.adapter_dtype == "bf16":
        return setup, f"{why}: expect bf16 steps about {fp32 / bf16:,.0f}x slower than fp32 ones."
    return replace(setup, dtype="fp32"), f"{why}: measuring with --dtype fp32 (give --dtype bf16 to insist)."


def run_bench(spec: ModelSpec, methods: Sequence[Method], ranks: Sequence[int], targets,
              setup: TrainingSetup, *, layers: Optional[int] = None, steps: int = 5, warmup: int = 2,
              impl: str = DEFAULT_IMPL, tolerance_pct: float = 5.0, progress: bool = True,
              gpu: Optional[GPU] = None, device: Optional[str] = None,
              on_row: Optional[Callable[[Dict], None]] = None) -> List[Dict]:
    """Measure every (method, rank) on this machine; one row each (see bench_case).

    A case that runs out of memory gives a row with status "oom" and the sweep goes on.

    Raises:
        LorabenchError: bad options (steps, warmup, impl, CUDA asked for and absent).
    """
    if impl not in IMPLS:
        raise LorabenchError(f"unknown implementation '{impl}'; choose from {', '.join(sorted(IMPLS))}.")
    if steps < 1:
        raise LorabenchError(f"--steps must be at least 1, got {steps}.")
    if warmup < 1:
        raise LorabenchError("--warmup must be at least 1: the first step creates the optimizer states.")
    setup = setup.for_spec(spec)  # "auto" attention: the family's
    if setup.kbit_prepare and impl == "lorabench":
        raise LorabenchError(KBIT_LORABENCH)
    if spec.single_matrix:
        raise LorabenchError("bench builds a model; a bare --d matrix has no forward pass to run.")
    with signals.signals_deferred():
        _preload(impl, setup.dtype in QUANTIZED)
    dev = bench_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LorabenchError("--device cuda: no CUDA device is available here; use --device cpu.")
    if dev.type not in ("cuda", "cpu"):
        raise LorabenchError(f"unsupported device '{dev.type}'; use cuda or cpu.")
    setup = replace(setup, device=dev.type)
    setup.validate()
    info = {"lorabench_version": __version__, **device_info(dev)}  # every row says what wrote it
    if gpu is None and dev.type == "cuda":
        gpu = catalog_gpu(info["device_name"])
    info["gpu"] = gpu.name if gpu else None
    # the products' dtype: the autocast dtype, bf16 for quantized bases (their compute dtype); its ceiling is
    # what the step's FLOP/s are compared with. On the CPU both bf16's and fp32's are measured: the time model
    # takes each product at its own dtype's (compute.cpu_device).
    compute = setup.autocast or (setup.dtype if setup.dtype in TORCH_DTYPES else "bf16")
    info["matmul_dtype"] = compute
    if dev.type == "cpu":
        rates = cpu_matmul_rates()
        info["matmul_bf16_tflops"], info["matmul_fp32_tflops"] = rates["bf16"] / 1e12, rates["fp32"] / 1e12
        matmul = rates.get(compute) or matmul_flops_per_s(dev, TORCH_DTYPES[compute])
    else:
        matmul = matmul_flops_per_s(dev, TORCH_DTYPES[compute])
    warm_cuda_libraries(dev)
    cases = [(m, r) for m in methods for r in (ranks if m.uses_rank else [None])]
    rows = []
    from tqdm.auto import tqdm

    bar = tqdm(cases, desc="bench", unit="case", file=sys.stderr, leave=False,
               disable=None if progress else True)  # None: only on a terminal
    # where stderr is a file (a log, CI), a line per case instead of the bar: a long run shows it is alive
    lines = progress and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    started = time.monotonic()
    for i, (method, rank) in enumerate(bar, 1):
        name = f"{method.name}" + (f" r={rank}" if rank else "")
        bar.set_postfix_str(name)
        if lines:
            print(f"lorabench: bench: {spec.name} {name} ({i} of {len(cases)}) ...", file=sys.stderr, flush=True)
        took = time.monotonic()
        with expected_library_warnings():
            row = bench_case(Case(spec, method, rank, targets, setup), device=dev, layers=layers, steps=steps,
                             warmup=warmup, impl=impl, tolerance_pct=tolerance_pct, gpu=gpu,
                             matmul_flops=matmul, info=info)
        if lines:
            now = time.monotonic()
            left = (now - started) / i * (len(cases) - i)
            print(f"lorabench: bench: {spec.name} {name}: {row['status']} in {now - took:,.1f} s"
                  + (f"; about {left:,.0f} s left" if i < len(cases) else ""), file=sys.stderr, flush=True)
        rows.append(row)
        if on_row:
            on_row(row)
    return rows


__all__ = ["run_bench", "bench_case", "measure_case", "build_lorabench", "build_peft", "catalog_gpu", "IMPLS"]
