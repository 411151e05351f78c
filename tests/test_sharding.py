"""Past one GPU: one GPU's bytes under ddp, zero2 and fsdp, and the bytes it sends, written out by hand for
tiny-llama (d=256, ffn=688, 4 layers, 8 heads and 4 kv heads of 32, vocab 4096, untied head).

Its tensors (dim 0 x the rest): per layer q [256, 256], k and v [128, 256], o [256, 256], gate and up
[688, 256], down [256, 688], two norms [256]; the root: embed [4096, 256], final norm [256], lm_head
[4096, 256]. Over 2 GPUs every dim 0 splits evenly; over 3 none does: FSDP2 pads each to 3 ceil(dim0 / 3)
rows (256 -> 258, 128 -> 129, 688 -> 690, 4096 -> 4098).
"""

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.estimator.case import Case
from lorabench.cli import cli
from lorabench.estimator.comms import comm_volume, parallel_step_time, ring_link
from lorabench.estimator.compute import device_for_gpu, estimate_step_time
from lorabench.errors import LorabenchError
from lorabench.gpus import get_gpu
from lorabench.estimator.fsdp_memory import shard_rows
from lorabench.estimator.layout import model_layout
from lorabench.estimator.params import count_base_params
from lorabench.estimator.memory import estimate_from_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.sharding import Parallel, fewest_gpus, fit_on_gpu, plan_need_bytes, plan_step, rank_memory
from lorabench.models.presets import PRESETS, from_name

TINY = from_name("tiny-llama")
FULL, LORA = METHODS["full"], METHODS["lora"]
SETUP = TrainingSetup(seq_len=64)

# Elements per layer and in the root, whole: q + k + v + o + gate + up + down + norms.
LAYER = 256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 688 * 256 + 2 * 256  # 725,504
ROOT = 2 * 4096 * 256 + 256  # 2,097,408
# Rank 0's chunk over 3 GPUs (every GPU stores this much: the others are padded to it).
LAYER_3 = 86 * 256 + 2 * 43 * 256 + 86 * 256 + 2 * 230 * 256 + 86 * 688 + 2 * 86  # 243,148
ROOT_3 = 2 * 1366 * 256 + 86  # 699,478
# Rank 2's own rows over 3 GPUs: what is left after two full chunks (256 - 172 = 84, 128 - 86 = 42, ...).
LAYER_3_LAST = 84 * 256 + 2 * 42 * 256 + 84 * 256 + 2 * 228 * 256 + 84 * 688 + 2 * 84  # 239,208
ROOT_3_LAST = 2 * 1364 * 256 + 84  # 698,452


def test_the_tensors_are_the_model():
    assert count_base_params(TINY) == 4 * LAYER + ROOT  # the published count, 4,999,424
    layout = model_layout(Case(TINY, FULL, setup=SETUP))
    assert sum(t.numel for t in layout.layer) == LAYER and sum(t.numel for t in layout.root) == ROOT
    # FSDP2's rows per GPU over 3: rank 0's chunk and rank 2's rest, tensor by tensor
    for tensors, first, last in ((layout.layer, LAYER_3, LAYER_3_LAST), (layout.root, ROOT_3, ROOT_3_LAST)):
        assert sum(shard_rows(t.dim0, 3, 0) * t.rest for t in tensors) == first
        assert sum(shard_rows(t.dim0, 3, 2) * t.rest for t in tensors) == last


def test_one_gpu_is_the_single_gpu_estimate_exactly():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    est = estimate_from_parts(plan.parts)
    for p in (Parallel(), Parallel(1, "fsdp"), Parallel(1, "zero2")):
        rm = rank_memory(plan, p)
        for key in ("weights_bytes", "adapter_bytes", "gradients_bytes", "optimizer_bytes", "master_bytes"):
            assert getattr(rm, key) == getattr(est, key), (p, key)
    rm = rank_memory(plan, Parallel())
    assert (rm.peak_bytes, rm.peak_phase, rm.device_bytes) == (est.peak_bytes, est.peak_phase, est.device_bytes)


def test_full_fine_tuning_over_3_gpus_by_hand():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    rm = rank_memory(plan, Parallel(3, "fsdp"))
    chunk = 4 * LAYER_3 + ROOT_3  # 1,672,070 elements, bf16
    assert rm.weights_bytes == rm.gradients_bytes == 2 * chunk == 3_344_140
    assert rm.optimizer_bytes == 2 * 2 * chunk  # exp_avg and exp_avg_sq, bf16, of rank 0's own elements
    assert rm.optimizer_temp_bytes == 2 * chunk  # foreach AdamW's sqrt of exp_avg_sq
    # gathered, padded: the root (R) and a layer (Y); at most when the first layer's all-gather lands, beside the
    # root's parameters and the root's all-gather output, which FSDP2 frees only after the next copy-out
    root, layer = 2 * 3 * ROOT_3, 2 * 3 * LAYER_3
    assert rm.gather_bytes == 2 * root + layer == 9_852_624
    g = rm.held.gathered
    assert (g.forward_end_bytes, g.after_forward_bytes, g.layer_forward_bytes) == (root + layer, root, root + 2 * layer)
    assert (g.backward_start_bytes, g.layer_backward_bytes) == (root + layer, root + 2 * layer)
    # the root's gradients at its post-backward, unsharded (autograd's) and padded (the reduce-scatter input)
    assert rm.reduce_scatter_bytes == 2 * (ROOT + 3 * ROOT_3) == 8_391_684
    last = rank_memory(plan, Parallel(3, "fsdp"), gpu_rank=2)
    assert last.weights_bytes == rm.weights_bytes  # padded: every GPU stores a full chunk
    assert last.optimizer_bytes == 2 * 2 * (4 * LAYER_3_LAST + ROOT_3_LAST) == 6_621_136 < rm.optimizer_bytes
    # the phases, as memory.StepParts.phase_peaks writes them, with rank 0's share
    act, head, persistent = plan.parts.act, plan.parts.head_grad_bytes, 2 * chunk + 4 * chunk
    layer_grads, shard, rs_in = 2 * LAYER, 2 * LAYER_3, 2 * 3 * LAYER_3
    assert rm.forward_peak_bytes == persistent + max(act.saved_bytes + max(
        root + layer + act.logits_forward_bytes, root + 2 * layer + act.layer_forward_bytes), 2 * root + layer)
    # The end of backward. The first layers back-propagating: the root's parameters and early gradients (head,
    # final norm), the layer's parameters and gradients, the next layer's reduce-scatter input still kept, the
    # later layers' shards; the second layer also the first's prefetched all-gather and saved activations.
    early = head + 2 * 256
    computing = layer + max(act.recompute_bytes + act.transient_bytes, layer_grads + act.transient_bytes)
    first = computing + rs_in + 3 * shard
    second = computing + layer + rs_in + 2 * shard + (act.saved_bytes - act.final_norm_bytes) // 4
    # The first layer's reduce-scatter: its input, then its output beside its last gradient (a norm's)
    reduce = 3 * shard + rs_in + max(layer_grads, 2 * 256 + shard)
    # The root's post-backward: its parameters freed, the layers' shards, its input, then its output beside
    # its last gradient, the head's
    root_end = 4 * shard + 2 * 3 * ROOT_3 + max(2 * ROOT, head + 2 * ROOT_3)
    end = max(root + early + max(first, second, reduce), root_end)
    assert rm.backward_peak_bytes == persistent + max(
        root + layer + act.saved_bytes + act.logits_backward_bytes,
        root + 2 * layer + act.saved_bytes - act.final_norm_bytes + act.logits_held_bytes + head + layer_grads
        + act.transient_bytes,
        end + act.logits_held_bytes)
    assert rm.optimizer_peak_bytes == persistent + 2 * chunk + act.logits_held_bytes + 2 * chunk


def test_gloo_copies_its_reduce_scatter_input_and_one_gpu_gathers_no_buffer():
    """On the CPU, gloo runs a reduce-scatter as an all-reduce of a copy of its input (ProcessGroupGloo::
    reduce_scatter_tensor_coalesced): the root's reduce-scatter, the end of a checkpointed backward, holds its
    input twice. On one GPU FSDP2 all-gathers nothing: each group's unsharded parameters are copies of its
    shards, no flat output beside."""
    ckpt = dict(batch_size=2, seq_len=64, grad_checkpointing=True)
    cpu = rank_memory(plan_step(Case(TINY, FULL, setup=TrainingSetup(**ckpt, device="cpu"))), Parallel(2, "fsdp"))
    gpu = rank_memory(plan_step(Case(TINY, FULL, setup=TrainingSetup(**ckpt))), Parallel(2, "fsdp"))
    # the layers' shards (bf16 halves), the root's input (2 x its bf16 shard), then its output, its last gradient
    # (the head's) and, on the CPU, the copy
    root_end_cpu = 4 * LAYER + 2 * ROOT + max(2 * ROOT, 2 * 4096 * 256 + ROOT + 2 * ROOT)
    root_end_gpu = 4 * LAYER + 2 * ROOT + max(2 * ROOT, 2 * 4096 * 256 + ROOT)
    assert cpu.held.end_grads_bytes == root_end_cpu == 15_486_208  # measured so: tests/test_distributed.py
    assert root_end_gpu < gpu.held.end_grads_bytes < root_end_cpu  # on a GPU the first layers' end is the larger
    one = rank_memory(plan_step(Case(TINY, FULL, setup=SETUP)), Parallel(1, "fsdp")).held.gathered
    root, layer = 2 * ROOT, 2 * LAYER
    assert (one.forward_end_bytes, one.layer_forward_bytes, one.first_layer_bytes) == (root, root + layer, root + layer)
    assert (one.backward_start_bytes, one.layer_backward_bytes) == (root, root + layer)


def test_zero2_and_ddp_over_3_gpus_by_hand():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    z2 = rank_memory(plan, Parallel(3, "zero2"))
    assert z2.weights_bytes == 2 * (4 * LAYER_3 + ROOT_3)
    # every layer kept from its forward to its backward, and at the end of forward the last one's all-gather
    # output besides
    every = 2 * 3 * (4 * LAYER_3 + ROOT_3)
    g = z2.held.gathered
    assert z2.gather_bytes == g.layer_forward_bytes == g.forward_end_bytes == every + 2 * 3 * LAYER_3
    assert g.backward_start_bytes == g.layer_backward_bytes == every
    ddp = rank_memory(plan, Parallel(3, "ddp"))
    whole = estimate_from_parts(plan.parts)
    assert ddp.weights_bytes == 2 * 4_999_424 and ddp.bucket_bytes == 2 * 4_999_424  # a second gradient copy
    assert ddp.optimizer_peak_bytes == whole.optimizer_peak_bytes + ddp.bucket_bytes


def test_frozen_base_is_sharded_and_gathered_but_never_reduce_scattered():
    plan = plan_step(Case(TINY, LORA, 8, setup=SETUP))
    rm = rank_memory(plan, Parallel(3, "fsdp"))
    # fp32 adapters on q and v: A [8, 256] (3 rows of 3), B_q [256, 8] (86), B_v [128, 8] (43)
    adapter_3 = 3 * 256 + 86 * 8 + 3 * 256 + 43 * 8  # 2,568 per layer
    adapter = 8 * 256 + 256 * 8 + 8 * 256 + 128 * 8  # 7,168 per layer, whole
    assert rm.weights_bytes == 2 * (4 * LAYER_3 + ROOT_3) and rm.adapter_bytes == 4 * 4 * adapter_3
    assert rm.gradients_bytes == 4 * 4 * adapter_3 and rm.optimizer_bytes == 2 * 4 * 4 * adapter_3
    last = rank_memory(plan, Parallel(3, "fsdp"), gpu_rank=2)  # A: 2 rows left, B_q 84, B_v 42
    assert last.optimizer_bytes == 2 * 4 * 4 * (2 * 256 + 84 * 8 + 2 * 256 + 42 * 8)
    assert rm.reduce_scatter_bytes == 4 * (adapter + 3 * adapter_3)  # a layer's adapter gradients, twice
    vol = comm_volume(plan, Parallel(3, "fsdp"))
    # each GPU sends 2 of 3 chunks: the frozen base (and adapters) twice per layer, the root once
    assert vol.all_gather_bytes == 2 * (2 * ROOT_3 + 2 * 4 * (2 * LAYER_3 + 4 * adapter_3)) == 10_743_000
    assert vol.reduce_scatter_bytes == 2 * 4 * 4 * adapter_3 and vol.all_reduce_bytes == 0
    # DDP all-reduces only the adapters' gradients: 2 (N - 1) / N of them
    assert comm_volume(plan, Parallel(3, "ddp")).all_reduce_bytes == 2 * 2 * 4 * 4 * adapter // 3


def test_nf4_codes_are_sharded_and_their_constants_replicated():
    plan = plan_step(Case(TINY, LORA, 8, setup=TrainingSetup(seq_len=64, dtype="nf4")))
    # packed codes [numel / 2, 1] per projection: q, o 32,768 rows; k, v 16,384; gate, up, down 88,064
    codes_3 = 2 * 10_923 + 2 * 5_462 + 3 * 29_355
    # constants per projection: absmax per 64 weights + fp32 absmax per 256 blocks + code books and offset
    consts = 2 * (1024 + 4 * 4 + 1092) + 2 * (512 + 4 * 2 + 1092) + 3 * (2752 + 4 * 11 + 1092)
    assert rank_memory(plan, Parallel(3, "fsdp")).weights_bytes == 4 * (codes_3 + consts + 2 * 86 * 2) + 2 * ROOT_3


def test_full_fine_tuning_communication_by_hand():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    fsdp = comm_volume(plan, Parallel(3, "fsdp"))
    assert fsdp.all_gather_bytes == 2 * 2 * (ROOT_3 + 2 * 4 * LAYER_3) == 10_578_648
    assert fsdp.reduce_scatter_bytes == 2 * 2 * (ROOT_3 + 4 * LAYER_3) == 6_688_280
    zero2 = comm_volume(plan, Parallel(3, "zero2"))  # every group gathered once
    assert zero2.all_gather_bytes == zero2.reduce_scatter_bytes == 6_688_280
    assert comm_volume(plan, Parallel(3, "ddp")).all_reduce_bytes == 2 * 2 * (2 * 4_999_424) // 3 == 13_331_797
    assert comm_volume(plan, Parallel(1, "fsdp")).total_bytes == 0
    # every micro-batch communicates
    accum = plan_step(Case(TINY, FULL, setup=TrainingSetup(seq_len=64, grad_accum=4)))
    assert comm_volume(accum, Parallel(3, "fsdp")).total_bytes == 4 * fsdp.total_bytes
    # over 2 GPUs nothing is padded: ZeRO-3's 3 Psi (N - 1) / N, less the root's backward gather
    two = comm_volume(plan, Parallel(2, "fsdp"))
    assert two.total_bytes == 3 * 2 * 4_999_424 // 2 - 2 * ROOT // 2


def test_step_time_with_and_without_overlap_by_hand():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    h100 = get_gpu("H100-80GB")
    step = estimate_step_time(Case(TINY, FULL, None, (), SETUP), device_for_gpu(h100))
    vol = comm_volume(plan, Parallel(8, "fsdp"))
    t = parallel_step_time(step, vol, Parallel(8, "fsdp"), h100)
    assert t.link == "NVLink 4" and t.link_bytes_s == 450e9  # 900 GB/s both ways
    comm = 1e3 * vol.total_bytes / 450e9
    assert t.comm_ms == pytest.approx(comm)
    compute, opt = step.forward_ms + step.backward_ms, step.optimizer_ms / 8
    assert t.step_ms_no_overlap == pytest.approx(compute + comm + opt)
    assert t.step_ms_overlap == pytest.approx(max(compute, comm) + opt)
    # past 8 GPUs the ring crosses servers: one NDR adapter per GPU, 50 GB/s each way
    assert ring_link(h100, 16).bytes_s == 50e9 and ring_link(h100, 16).across_nodes
    assert ring_link(get_gpu("RTX-4090"), 2).bytes_s == 32e9 and ring_link(get_gpu("RTX-4090"), 16) is None


def test_cpu_offload_moves_shards_and_optimizer_to_the_host():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    chunk = 4 * LAYER_3 + ROOT_3
    off = rank_memory(plan, Parallel(3, "fsdp", cpu_offload=True))
    assert off.weights_bytes == off.gradients_bytes == off.optimizer_bytes == off.optimizer_temp_bytes == 0
    assert off.cpu_offload_bytes == 2 * chunk + 2 * chunk + 4 * chunk + 2 * chunk  # params, grads, states, temp
    assert off.gather_bytes == rank_memory(plan, Parallel(3, "fsdp")).gather_bytes  # computing still gathers
    one = rank_memory(plan, Parallel(1, "none", cpu_offload=True))  # ZeRO-Offload's split on one GPU
    whole = estimate_from_parts(plan.parts)
    assert one.optimizer_bytes == 0 and one.weights_bytes == whole.weights_bytes
    assert one.cpu_offload_bytes == whole.optimizer_bytes + 2 * 4_999_424 + 2 * 4_999_424  # + grads, + temp


def test_rank_0_holds_the_most():
    plan = plan_step(Case(TINY, LORA, 8, setup=SETUP))
    for s in ("zero2", "fsdp"):
        ranks = [asdict(rank_memory(plan, Parallel(3, s), r)) for r in range(3)]
        for key, value in ranks[0].items():
            if key.endswith("_bytes"):
                assert all(r[key] <= value for r in ranks), (s, key)


def test_gpus_needed_per_strategy():
    big = PRESETS["llama-3-70b"]
    plan = plan_step(Case(big, FULL, setup=TrainingSetup(grad_checkpointing=True)))
    a100 = get_gpu("A100-80GB")
    fit = fit_on_gpu(plan, a100)
    assert fit.gpus_needed == fit.gpus_needed_fsdp and fit.gpus_needed_ddp is None
    assert fit.gpus_needed_zero2 is None  # every GPU gathers all 141 GB of bf16 weights
    n = fit.gpus_needed_fsdp
    assert plan_need_bytes(plan, Parallel(n, "fsdp")) <= a100.memory_bytes
    assert plan_need_bytes(plan, Parallel(n - 1, "fsdp")) > a100.memory_bytes
    # QLoRA of a 70B model on 2 RTX 4090s: the shards do not fit beside the gathered layers; offloaded, they do
    qlora = plan_step(Case(big, LORA, 8, setup=TrainingSetup(dtype="nf4", grad_checkpointing=True)))
    rtx = get_gpu("RTX-4090").memory_bytes
    assert fewest_gpus(qlora, "fsdp", rtx) > 2
    # offloaded, one GPU is enough: fully sharded on itself, FSDP2's CPUOffloadPolicy keeps the nf4 shards on
    # the host and brings each layer over as it computes (a whole step on one GPU keeps them all there)
    assert plan_need_bytes(qlora, Parallel(1, "fsdp", True)) <= rtx < plan_need_bytes(qlora, Parallel(1, "none", True))
    assert fewest_gpus(qlora, "fsdp", rtx, cpu_offload=True) == 1
    assert fewest_gpus(plan_step(Case(TINY, LORA, 8, setup=SETUP)), "ddp", rtx) == 1


def test_bad_parallel_settings():
    plan = plan_step(Case(TINY, FULL, setup=SETUP))
    for p, msg in ((Parallel(2), "needs --sharding"), (Parallel(0, "fsdp"), "GPUs must be"),
                   (Parallel(2, "zero3"), "unknown sharding")):
        with pytest.raises(LorabenchError, match=msg):
            rank_memory(plan, p)
    with pytest.raises(LorabenchError, match="gpu rank"):
        rank_memory(plan, Parallel(2, "fsdp"), gpu_rank=2)


def run(*args):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "100"})


def test_cli_gpus_1_is_the_default_and_fields_are_one_gpus():
    base = ("memory", "-m", "tiny-llama", "--method", "full,lora", "-s", "64", "--gpu", "A100-80GB", "-f", "json")
    assert run(*base).stdout == run(*base, "--gpus", "1", "--sharding", "none").stdout
    rows = json.loads(run(*base, "--gpus", "3", "--sharding", "fsdp").stdout)
    rm = rank_memory(plan_step(Case(TINY, FULL, setup=SETUP)), Parallel(3, "fsdp"))
    full = rows[0]
    assert (full["gpus"], full["sharding"], full["cpu_offload"]) == (3, "fsdp", False)
    assert full["peak_bytes"] == rm.peak_bytes and full["weights_bytes"] == 3_344_140
    assert full["gather_bytes"] == 9_852_624 and full["comm_all_gather_bytes"] == 10_578_648
    for key in ("gpus_needed_ddp", "gpus_needed_zero2", "gpus_needed_fsdp", "comm_ms", "step_ms_overlap",
                "step_ms_no_overlap", "link", "cpu_offload_bytes", "bucket_bytes", "reduce_scatter_bytes"):
        assert key in full
    text = run(*base[:-2], "--gpus", "3", "--sharding", "fsdp").stdout.splitlines()
    assert text[0].startswith("full on 3 x A100-80GB (80.00 GiB each; fsdp): fits")


@pytest.mark.parametrize("args, msg", [(("--gpus", "2"), "needs --sharding"), (("--gpus", "0"), "--gpus"),
                                       (("--sharding", "zero3"), "--sharding"), (("--gpus", "1.5"), "--gpus")])
def test_cli_bad_options_exit_2_in_one_line(args, msg):
    for command in ("memory", "fit"):
        res = run(command, "-m", "tiny-llama", "--gpu", "A100-80GB", *args)
        assert res.exit_code == 2 and msg in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_fit_answers_on_several_gpus_and_suggests_offload():
    res = run("fit", "-m", "llama-3-70b", "--gpu", "RTX-4090", "--gpus", "2", "--sharding", "fsdp", "--method", "lora",
              "--dtype", "nf4", "--grad-checkpointing", "--cpu-offload", "-f", "json")
    row = json.loads(res.stdout)["limits"][0]
    assert row["fits"] and (row["gpus"], row["sharding"], row["cpu_offload"]) == (2, "fsdp", True)
    mem = json.loads(run("memory", "-m", "llama-3-70b", "--gpu", "RTX-4090", "--gpus", "2", "--sharding", "fsdp",
                         "--method", "lora", "--dtype", "nf4", "--grad-checkpointing", "-f", "json").stdout)[0]
    assert not mem["fits"] and mem["fix"]["args"] == ["--cpu-offload"]


def test_the_committed_multi_gpu_report_is_what_the_estimator_says():
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("multi_gpu_revisit", repo / "benchmarks" / "multi_gpu_revisit.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    committed = json.loads((repo / "reports" / "multi-gpu" / "results.json").read_text())
    fresh = json.loads(json.dumps({"strategies": script.strategy_rows(), "rtx4090": script.rtx4090_rows()}))
    assert committed["strategies"] == fresh["strategies"] and committed["rtx4090"] == fresh["rtx4090"], \
        "regenerate: python benchmarks/multi_gpu_revisit.py --write"
    qlora_2x4090 = {(r["cpu_offload"], r["loss"]): r for r in committed["rtx4090"]}
    assert not qlora_2x4090[False, "standard"]["fits"] and qlora_2x4090[True, "standard"]["fits"]
