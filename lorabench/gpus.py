"""GPU catalog: memory, peak rates, memory bandwidth, interconnect, and an on-demand price. Pure Python.

memory_bytes is the total the driver reports (nvidia-smi's "MiB" total, rocm-smi's bytes) where it was found;
otherwise the datasheet size, and the entry's source says so. Peak rates are the vendors' datasheet dense (no
2:4 sparsity) bf16 tensor figures with fp32 accumulation, and the fp32 figure of the ordinary (non-tensor)
cores, which is what torch's fp32 matrix products run on (TF32 is off for them by default). Interconnect
bandwidth is GPU to GPU, per GPU, both directions together, as vendors quote NVLink.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Dict, Optional

from lorabench.errors import LorabenchError

MiB = 1024 ** 2
GiB = 1024 ** 3


@dataclass(frozen=True)
class GPU:
    """One GPU model.

    Attributes:
        name: catalog name.
        memory_bytes: device memory as the driver reports it (or the datasheet size; see source).
        bf16_flops: datasheet peak dense bf16 FLOP/s (fp16 where the card has no bf16: V100, T4).
        bandwidth_bytes_s: datasheet memory bandwidth.
        source: where the figures come from.
        fp32_flops: datasheet peak fp32 FLOP/s of the non-tensor cores.
        interconnect: the GPU-to-GPU link, e.g. "NVLink 4", "PCIe Gen4 x16".
        interconnect_bytes_s: that link's bandwidth per GPU, both directions.
        has_bf16: the card computes in bf16 (NVIDIA from Ampere, compute capability 8.0, on; AMD CDNA 3). Volta
            and Turing have none: torch refuses or emulates bf16 there, so a bf16 step is not run on them.
    """

    name: str
    memory_bytes: int
    bf16_flops: float
    bandwidth_bytes_s: float
    source: str
    fp32_flops: float
    interconnect: str
    interconnect_bytes_s: float
    has_bf16: bool = True

    @property
    def host_link_bytes_s(self) -> float:
        """The link to host memory, one direction (what an offloaded activation crosses each way): PCIe x16 of the
        GPU's generation (HOST_LINK_GB_S)."""
        return HOST_LINK_GB_S[self.name] * 1e9


# PCIe x16 to the host, one direction (PCI-SIG: Gen3 15.75, Gen4 31.5, Gen5 63 GB/s): the generation each card (or,
# for SXM/OAM modules, its baseboard's host link) runs at, from the datasheets of the parts and the HGX boards.
HOST_LINK_GB_S: Dict[str, float] = {
    "A100-40GB": 31.5, "A100-80GB": 31.5, "H100-80GB": 63.0, "H100-PCIe": 63.0, "H200": 63.0, "B200": 63.0,
    "MI300X": 63.0, "V100-32GB": 15.75, "V100-16GB": 15.75, "L4": 31.5, "L40": 31.5, "L40S": 31.5, "A10G": 31.5,
    "T4": 15.75, "RTX-A6000": 31.5, "RTX-4090": 31.5, "RTX-3090": 31.5,
}


def _gpu(name: str, mib: int, bf16_tflops: float, fp32_tflops: float, gb_s: float, link: str, link_gb_s: float,
         source: str, has_bf16: bool = True) -> GPU:
    return GPU(name, mib * MiB, bf16_tflops * 1e12, gb_s * 1e9, source, fp32_tflops * 1e12, link, link_gb_s * 1e9,
               has_bf16)


# PCIe x16, both directions: Gen3 32 GB/s, Gen4 64 GB/s, Gen5 128 GB/s (PCI-SIG).
GPUS: Dict[str, GPU] = {g.name: g for g in (
    _gpu("A100-40GB", 40960, 312, 19.5, 1555, "NVLink 3", 600,
         "NVIDIA A100 datasheet (SXM4 40GB); 40960 MiB read by nvidia-smi"),
    _gpu("A100-80GB", 81920, 312, 19.5, 2039, "NVLink 3", 600,
         "NVIDIA A100 datasheet (SXM4 80GB); 81920 MiB read by nvidia-smi"),
    _gpu("H100-80GB", 81559, 989.4, 67, 3350, "NVLink 4", 900,
         "NVIDIA H100 datasheet (SXM5); 81559 MiB read by nvidia-smi"),
    _gpu("H100-PCIe", 81559, 756.5, 51, 2000, "PCIe Gen5 x16", 128,
         "NVIDIA H100 datasheet (PCIe; an NVLink bridge pairs two at 600 GB/s); memory as the SXM5's"),
    _gpu("H200", 143771, 989.4, 67, 4800, "NVLink 4", 900,
         "NVIDIA H200 datasheet (SXM); 143771 MiB read by nvidia-smi"),
    _gpu("B200", 183359, 2250, 80, 8000, "NVLink 5", 1800,
         "NVIDIA HGX B200 datasheet (per GPU, 1,000 W); 183359 MiB read by nvidia-smi"),
    _gpu("MI300X", 196288, 1307.4, 163.4, 5300, "Infinity Fabric", 896,
         "AMD Instinct MI300X datasheet (7 Infinity Fabric links x 128 GB/s); 205,822,885,888 bytes read by "
         "rocm-smi"),
    _gpu("V100-32GB", 32768, 125, 15.7, 900, "NVLink 2", 300,
         "NVIDIA V100 datasheet (SXM2 32GB); no bf16: the fp16 tensor peak; 32768 MiB read by nvidia-smi", False),
    _gpu("V100-16GB", 16384, 125, 15.7, 900, "NVLink 2", 300,
         "NVIDIA V100 datasheet (SXM2 16GB); no bf16: the fp16 tensor peak; 16384 MiB read by nvidia-smi", False),
    _gpu("L4", 23034, 121, 30.3, 300, "PCIe Gen4 x16", 64,
         "NVIDIA L4 datasheet; 23034 MiB read by nvidia-smi"),
    _gpu("L40", 48 * 1024, 181.05, 90.5, 864, "PCIe Gen4 x16", 64,
         "NVIDIA L40 datasheet; memory: the datasheet's 48 GB (the driver shows less with ECC on: 46068 MiB "
         "on the L40S)"),
    _gpu("L40S", 46068, 362.05, 91.6, 864, "PCIe Gen4 x16", 64,
         "NVIDIA L40S datasheet; 46068 MiB read by nvidia-smi"),
    _gpu("A10G", 23028, 125, 31.2, 600, "PCIe Gen4 x16", 64,
         "AWS g5's A10G, for which NVIDIA publishes no datasheet: the A10 datasheet's rates (same GA102, "
         "24 GB, 600 GB/s), an upper bound on tensor throughput; 23028 MiB read by nvidia-smi"),
    _gpu("T4", 15360, 65, 8.1, 320, "PCIe Gen3 x16", 32,
         "NVIDIA T4 datasheet; no bf16: the fp16 tensor peak; 15360 MiB read by nvidia-smi", False),
    _gpu("RTX-A6000", 49140, 154.8, 38.7, 768, "PCIe Gen4 x16", 64,
         "NVIDIA RTX A6000 datasheet and Ampere GA102 whitepaper (an NVLink bridge pairs two at 112.5 GB/s); "
         "49140 MiB read by nvidia-smi"),
    _gpu("RTX-4090", 24564, 165.2, 82.6, 1008, "PCIe Gen4 x16", 64,
         "NVIDIA Ada whitepaper (fp32 accumulate); 24564 MiB read by nvidia-smi"),
    _gpu("RTX-3090", 24576, 71, 35.6, 936, "PCIe Gen4 x16", 64,
         "NVIDIA Ampere GA102 whitepaper (fp32 accumulate; an NVLink bridge pairs two at 112.5 GB/s)"),
)}

@dataclass(frozen=True)
class Node:
    """The server a GPU comes in, for rings over more GPUs than one holds.

    Attributes:
        gpus: GPUs one server joins on the interconnect (NVLink / NVSwitch / Infinity Fabric).
        network: the link between servers, per GPU: one InfiniBand adapter each in these systems (rail-optimised:
            NCCL runs one ring per adapter, so a ring across servers goes at one adapter's rate per GPU).
        network_bytes_s: that link's bandwidth per GPU, both directions together (as interconnect_bytes_s).
        source: where the figures come from.
    """

    gpus: int
    network: str
    network_bytes_s: float
    source: str


# InfiniBand per direction: HDR 200 Gb/s = 25 GB/s, NDR 400 Gb/s = 50 GB/s, EDR 100 Gb/s = 12.5 GB/s.
_DGX_H100 = ("NVIDIA DGX H100/H200 datasheet: 8 GPUs on NVSwitch; 8 single-port ConnectX-7 VPI, 400 Gb/s "
             "InfiniBand, one per GPU")
NODES: Dict[str, Node] = {
    "A100-40GB": Node(8, "InfiniBand HDR", 50e9, "NVIDIA DGX A100 datasheet: 8 GPUs on NVSwitch; 8 single-port "
                                                 "ConnectX-6 VPI, 200 Gb/s HDR InfiniBand, one per GPU"),
    "A100-80GB": Node(8, "InfiniBand HDR", 50e9, "NVIDIA DGX A100 datasheet: 8 GPUs on NVSwitch; 8 single-port "
                                                 "ConnectX-6 VPI, 200 Gb/s HDR InfiniBand, one per GPU"),
    "H100-80GB": Node(8, "InfiniBand NDR", 100e9, _DGX_H100),
    "H200": Node(8, "InfiniBand NDR", 100e9, _DGX_H100),
    "B200": Node(8, "InfiniBand NDR", 100e9, "NVIDIA DGX B200 datasheet: 8 GPUs on NVLink 5; 8 single-port "
                                             "ConnectX-7 VPI, up to 400 Gb/s InfiniBand, one per GPU"),
    "MI300X": Node(8, "InfiniBand NDR", 100e9, "AMD Instinct MI300X platform (8 GPUs on Infinity Fabric); Azure "
                                               "ND MI300X v5: 400 Gb/s InfiniBand per GPU"),
    "V100-32GB": Node(8, "InfiniBand EDR", 12.5e9, "NVIDIA DGX-1 (Volta) datasheet: 8 GPUs in an NVLink hybrid "
                                                   "cube mesh; 4 x 100 Gb/s EDR InfiniBand for 8 GPUs"),
    "V100-16GB": Node(8, "InfiniBand EDR", 12.5e9, "NVIDIA DGX-1 (Volta) datasheet: 8 GPUs in an NVLink hybrid "
                                                   "cube mesh; 4 x 100 Gb/s EDR InfiniBand for 8 GPUs"),
}
# PCIe cards come in servers of many shapes: up to 8 GPUs on one PCIe fabric is taken, with no network known.
PCIE_NODE = Node(8, "", 0.0, "assumed: up to 8 PCIe cards in one server; no network between servers known")


def node_of(gpu: GPU) -> Node:
    """The server `gpu` comes in (NODES), or PCIE_NODE."""
    return NODES.get(gpu.name, PCIE_NODE)


# Other names a user may type, lower-case without '-', '_' or spaces.
ALIASES = {"a6000": "RTX-A6000", "v100": "V100-32GB", "v100sxm232gb": "V100-32GB", "v100sxm216gb": "V100-16GB",
           "h100": "H100-80GB", "h100sxm": "H100-80GB", "a100": "A100-80GB"}


@dataclass(frozen=True)
class Price:
    """An on-demand price of one GPU-hour, as a cloud published it on a date."""

    usd_per_gpu_hour: float
    source: str


_RUNPOD = "RunPod Secure Cloud on-demand, runpod.io/pricing, read 2026-09-25 (tgarg01/silybench-data gpu_prices.csv)"
_LAMBDA = "Lambda on-demand, lambda.ai/instances, read 2026-09-20 (api-evangelist/lambda-labs pricing transcript)"
# The default --price per catalog GPU: one published on-demand offer each, single-GPU where one is listed.
# No dated published price was found here for the L4, L40, A10G, T4, V100-32GB, RTX-3090 or MI300X: they have
# none, and training cost needs --price for them.
PRICES: Dict[str, Price] = {
    "H100-80GB": Price(3.49, _RUNPOD + ", H100 SXM"),
    "H100-PCIe": Price(2.89, _RUNPOD + ", H100 PCIe"),
    "H200": Price(4.59, _RUNPOD + ", H200"),
    "B200": Price(6.79, _RUNPOD + ", B200"),
    "A100-80GB": Price(1.59, _RUNPOD + ", A100 SXM 80GB"),
    "A100-40GB": Price(1.99, _LAMBDA + ", 1x A100 SXM 40GB"),
    "L40S": Price(1.09, _RUNPOD + ", L40S"),
    "RTX-4090": Price(0.74, _RUNPOD + ", RTX 4090"),
    "RTX-A6000": Price(1.09, _LAMBDA + ", A6000 (4-GPU instance, per GPU)"),
    "V100-16GB": Price(0.79, _LAMBDA + ", Tesla V100 16GB (8-GPU instance, per GPU)"),
}


def _norm(s: str) -> str:
    """A GPU name as typed, compared: lower case without '-', '_', spaces and the vendors' words (NVIDIA GeForce
    RTX 4090 -> rtx4090)."""
    s = s.lower().replace("-", "").replace("_", "").replace(" ", "")
    for word in ("nvidia", "geforce", "tesla", "amd", "instinct"):
        s = s.replace(word, "")
    return s


def _by_norm() -> Dict[str, GPU]:
    """Every name a GPU answers to: its catalog name, that without the RTX of a card's name (4090, a6000), and
    ALIASES."""
    names = {_norm(k): v for k, v in GPUS.items()}
    names.update({n[3:]: v for n, v in list(names.items()) if n.startswith("rtx")})
    names.update({alias: GPUS[target] for alias, target in ALIASES.items()})
    return names


def get_gpu(name: str) -> GPU:
    """The catalog GPU called name (case-insensitive; '-', '_', spaces, NVIDIA/GeForce/Tesla optional; a card
    without its RTX: 4090; ALIASES such as A6000, and A100 for the A100-80GB: gpu_note says which was taken).

    Raises:
        LorabenchError: no such GPU; the message suggests near names.
    """
    found = _by_norm().get(_norm(name))
    if found is not None:
        return found
    near = difflib.get_close_matches(name.upper(), GPUS, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    raise LorabenchError(f"unknown GPU '{name}'.{hint} Run 'lorabench gpus' for the list.")


def gpu_note(name: str) -> Optional[str]:
    """A note when a name that several catalog GPUs share (a100, h100, v100) was taken as one of them."""
    key, gpu = _norm(name), get_gpu(name)
    others = [g for g in GPUS if g != gpu.name and _norm(g).startswith(key)]
    if key not in ALIASES or not others:
        return None
    return f"'{name}' taken as the {gpu.name}; the catalog also has the {', '.join(others)} (name it to choose)."
