"""The GPU catalog against datasheet figures written out here with their sources."""

import pytest

from lorabench.errors import LorabenchError
from lorabench.gpus import GPUS, NODES, PRICES, MiB, get_gpu, node_of

# (name, bf16 or fp16 dense TFLOP/s, fp32 TFLOP/s, memory GB/s, interconnect GB/s, MiB the driver reports)
DATASHEETS = [
    ("H100-80GB", 989.4, 67, 3350, 900, 81559),    # NVIDIA H100 datasheet, SXM5 (1,979 with sparsity)
    ("A100-80GB", 312, 19.5, 2039, 600, 81920),    # NVIDIA A100 datasheet, SXM4 80GB (624 with sparsity)
    ("B200", 2250, 80, 8000, 1800, 183359),        # NVIDIA HGX B200: 4.5 PFLOPS bf16 with sparsity per GPU
    ("MI300X", 1307.4, 163.4, 5300, 896, 196288),  # AMD MI300X datasheet: 2,614.9 with sparsity
    ("V100-32GB", 125, 15.7, 900, 300, 32768),     # NVIDIA V100 datasheet, SXM2: fp16 tensor, no bf16
    ("T4", 65, 8.1, 320, 32, 15360),               # NVIDIA T4 datasheet: fp16 tensor, no bf16; PCIe Gen3
    ("L40", 181.05, 90.5, 864, 64, 48 * 1024),     # NVIDIA L40 datasheet: 362.1 with sparsity; 48 GB
    ("RTX-A6000", 154.8, 38.7, 768, 64, 49140),    # NVIDIA RTX A6000 datasheet: 309.7 with sparsity
    ("A10G", 125, 31.2, 600, 64, 23028),           # the A10's datasheet (NVIDIA publishes none for the A10G)
]


@pytest.mark.parametrize("name, bf16, fp32, gb_s, link, mib", DATASHEETS)
def test_datasheet_figures(name, bf16, fp32, gb_s, link, mib):
    g = GPUS[name]
    assert g.bf16_flops == pytest.approx(bf16 * 1e12)
    assert g.fp32_flops == pytest.approx(fp32 * 1e12)
    assert g.bandwidth_bytes_s == pytest.approx(gb_s * 1e9)
    assert g.interconnect_bytes_s == pytest.approx(link * 1e9)
    assert g.memory_bytes == mib * MiB


def test_every_card_has_every_figure_and_a_source():
    for g in GPUS.values():
        assert g.memory_bytes > 0 and g.bf16_flops > g.fp32_flops > 0 and g.bandwidth_bytes_s > 0
        assert g.interconnect and g.interconnect_bytes_s > 0 and g.source


@pytest.mark.parametrize("typed, name", [("A6000", "RTX-A6000"), ("rtx_a6000", "RTX-A6000"), ("t4", "T4"),
                                         ("a10g", "A10G"), ("mi300x", "MI300X"), ("V100-SXM2-32GB", "V100-32GB"),
                                         ("b200", "B200"), ("l40", "L40")])
def test_names_and_aliases_resolve(typed, name):
    assert get_gpu(typed).name == name


def test_unknown_gpu_suggests_near_names():
    with pytest.raises(LorabenchError, match="Did you mean"):
        get_gpu("H10-80GB")


def test_prices_are_dated_and_sourced_for_catalog_cards_only():
    assert set(PRICES) <= set(GPUS)
    for price in PRICES.values():
        assert 0 < price.usd_per_gpu_hour < 50
        assert "read 2026-" in price.source


# (name, GPUs per server, network GB/s per GPU both ways): one InfiniBand adapter per GPU in the DGX systems,
# 200 Gb/s HDR (A100) or 400 Gb/s NDR (H100, H200, B200) = 25 or 50 GB/s each way; DGX-1: 4 x 100 Gb/s EDR
# for 8 V100s = 6.25 GB/s each way.
SERVERS = [("A100-80GB", 8, 50), ("H100-80GB", 8, 100), ("H200", 8, 100), ("B200", 8, 100), ("V100-32GB", 8, 12.5)]


@pytest.mark.parametrize("name, per_node, net", SERVERS)
def test_servers_and_networks(name, per_node, net):
    node = node_of(GPUS[name])
    assert node.gpus == per_node and node.network_bytes_s == pytest.approx(net * 1e9) and node.source


def test_pcie_cards_have_no_network():
    assert set(NODES) <= set(GPUS)
    assert node_of(GPUS["RTX-4090"]).network_bytes_s == 0 and node_of(GPUS["RTX-4090"]).gpus == 8
