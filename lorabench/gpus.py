"""GPU catalog: memory and peak dense bf16 throughput. Pure Python.

memory_bytes is the total the driver reports (nvidia-smi's "MiB" total), not the marketing size.
Peak rates are the vendors' datasheet dense (no 2:4 sparsity) bf16 tensor-core figures.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict

from lorabench.errors import LorabenchError

MiB = 1024 ** 2
GiB = 1024 ** 3


@dataclass(frozen=True)
class GPU:
    """One GPU model.

    Attributes:
        name: catalog name.
        memory_bytes: device memory as the driver reports it.
        bf16_flops: datasheet peak dense bf16 FLOP/s.
        bandwidth_bytes_s: datasheet memory bandwidth.
        source: where the figures come from.
    """

    name: str
    memory_bytes: int
    bf16_flops: float
    bandwidth_bytes_s: float
    source: str


GPUS: Dict[str, GPU] = {g.name: g for g in (
    GPU("A100-40GB", 40960 * MiB, 312e12, 1555e9, "NVIDIA A100 datasheet (SXM4)"),
    GPU("A100-80GB", 81920 * MiB, 312e12, 2039e9, "NVIDIA A100 datasheet (SXM4)"),
    GPU("H100-80GB", 81559 * MiB, 989.4e12, 3350e9, "NVIDIA H100 datasheet (SXM5); 81559 MiB read by nvidia-smi"),
    GPU("H100-PCIe", 81559 * MiB, 756.5e12, 2000e9, "NVIDIA H100 datasheet (PCIe)"),
    GPU("H200", 143771 * MiB, 989.4e12, 4800e9, "NVIDIA H200 datasheet (SXM); 143771 MiB read by nvidia-smi"),
    GPU("L4", 23034 * MiB, 121e12, 300e9, "NVIDIA L4 datasheet"),
    GPU("L40S", 46068 * MiB, 362.05e12, 864e9, "NVIDIA L40S datasheet"),
    GPU("RTX-4090", 24564 * MiB, 165.2e12, 1008e9, "NVIDIA Ada whitepaper (fp32 accumulate)"),
    GPU("RTX-3090", 24576 * MiB, 71e12, 936e9, "NVIDIA Ampere GA102 whitepaper (fp32 accumulate)"),
)}


def get_gpu(name: str) -> GPU:
    """The catalog GPU called name (case-insensitive; '-' and '_' optional).

    Raises:
        LorabenchError: no such GPU; the message suggests near names.
    """
    def norm(s: str) -> str:
        return s.lower().replace("-", "").replace("_", "").replace(" ", "")

    by_norm = {norm(k): v for k, v in GPUS.items()}
    if norm(name) in by_norm:
        return by_norm[norm(name)]
    near = difflib.get_close_matches(name.upper(), GPUS, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise LorabenchError(f"unknown GPU '{name}'.{hint} Run 'lorabench gpus' for the list.")
