"""`lorabench bench --nproc N --sharding ddp|fsdp`: real steps on 2 CPU processes under torchrun (gloo), each
rank's live-tensor tracker against the estimate for that rank, its DTensor shards against the estimator's
padded shards, and the collectives torch dispatched against lorabench.estimator.comms.

tiny-llama (d=256, ffn=688, 4 layers, vocab 4096, untied head), batch 2 x 64 per process, bf16 base, the plain
loop; steady state (a step after two warm-up steps). Each case is one torchrun launch of a few seconds.
"""

import json
import re
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner

from lorabench.estimator.case import Case
from lorabench.measure.bench import run_bench
from lorabench.measure.builders import expected_library_warnings
from lorabench.cli import cli
from lorabench.estimator.comms import comm_volume
from lorabench.measure.distributed import decoder_layers
from lorabench.errors import LorabenchError
from lorabench.measure.launch import run_distributed_bench
from lorabench.measure.probes import LiveTensorTracker
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.estimator.sharding import Parallel, plan_step, rank_memory
from lorabench.models.presets import from_name

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available():
    pytest.skip("torch without torch.distributed", allow_module_level=True)

TINY = from_name("tiny-llama")
SETUP = TrainingSetup(batch_size=2, seq_len=64, loop="plain")
TOLERANCE_PCT = 2.0


def _bench(methods, sharding, impl, nproc=2, spec=TINY, **kw):
    return run_distributed_bench(spec, [METHODS[m] for m in methods], [8], None, SETUP, nproc=nproc,
                                 sharding=sharding, impl=impl, steps=1, warmup=2, progress=False, device="cpu",
                                 **kw)


@pytest.fixture(scope="module")
def fsdp_rows():
    pytest.importorskip("peft")
    return _bench(("full", "lora", "dora"), "fsdp", "peft")


@pytest.fixture(scope="module")
def ddp_rows():
    return _bench(("full", "lora", "lora-fa"), "ddp", "lorabench")


@pytest.mark.parametrize("which", ["fsdp_rows", "ddp_rows"])
def test_every_rank_within_2pct_of_its_estimate(which, request):
    rows = request.getfixturevalue(which)
    assert len(rows) == 3 * 2 and sorted({r["gpu_rank"] for r in rows}) == [0, 1]
    for r in rows:
        assert r["status"] == "ok", (r["method"], r["gpu_rank"], r["error"])
        assert abs(r["peak_error_pct"]) <= TOLERANCE_PCT, (r["method"], r["gpu_rank"], r["peak_error_pct"])
        assert r["nproc"] == r["gpus"] == 2 and r["largest_rank_error_pct"] is not None
    for method in {r["method"] for r in rows}:
        mine = [r for r in rows if r["method"] == method]
        assert abs(mine[0]["largest_rank_error_pct"]) == max(abs(r["peak_error_pct"]) for r in mine)


@pytest.mark.parametrize("which", ["fsdp_rows", "ddp_rows"])
def test_collectives_torch_dispatched_are_what_comms_estimates(which, request):
    """Bytes each rank sends per step, from the c10d ops torch dispatched (all-gather outputs, reduce-scatter
    inputs, all-reduced tensors, with ring algorithms), equal lorabench.estimator.comms.comm_volume."""
    for r in request.getfixturevalue(which):
        for kind in ("all_gather", "reduce_scatter", "all_reduce"):
            assert r[f"measured_comm_{kind}_bytes"] == r[f"comm_{kind}_bytes"], (r["method"], kind)


def test_fsdp_by_hand(fsdp_rows):
    """LoRA on q and v under fsdp over 2: the frozen bf16 base is all-gathered (root once, each layer twice) and
    never reduce-scattered; each rank's shard of every tensor is half of it (every dim 0 is even)."""
    lora = next(r for r in fsdp_rows if r["method"] == "lora" and r["gpu_rank"] == 1)
    layer = 2 * (256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 688 * 256 + 2 * 256) + 4 * 7168  # bf16 + fp32 adapters
    root = 2 * (2 * 4096 * 256 + 256)
    assert lora["measured_all_gather_buffer_bytes"] == root + 2 * 4 * layer
    assert lora["measured_all_gather_calls"] == 1 + 2 * 4 and lora["measured_reduce_scatter_calls"] == 4
    assert lora["measured_param_shard_bytes"] == (root + 4 * layer) // 2
    assert lora["measured_gradients_bytes"] == 4 * 4 * 7168 // 2  # the adapters' fp32 shards


@pytest.mark.parametrize("sharding", ["fsdp", "zero2"])
def test_short_sequences_count_gloos_landing_copy(sharding):
    """At 32 tokens on 2 layers the forward peak is the first layer's all-gather, where gloo receives into a flat
    tensor of its own before copying it out (ProcessGroupGloo's AsyncAllgatherWork): one layer's parameters more
    than NCCL holds. Without that copy, fsdp read -10.0% and zero2 -5.2% here (issue 21)."""
    setup = TrainingSetup(batch_size=1, seq_len=32, loop="trainer")
    # Now and then (1 run in 6 alone, on the code before issue 22 as after, more often inside the whole suite)
    # rank 0's measured backward peak of the lora case holds 1,347,584 bytes more than in every other run, the
    # estimate and rank 1 unchanged: a moment of the CPU/gloo path that depends on timing. A real miss misses
    # every time; a case measured three times and never within 0.5% fails.
    for _ in range(3):
        rows = run_distributed_bench(TINY, [METHODS["full"], METHODS["lora"]], [8], None, setup, nproc=2,
                                     sharding=sharding, impl="peft", steps=1, warmup=1, progress=False,
                                     device="cpu", layers=2)
        assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
        misses = [(r["method"], r["gpu_rank"], phase, r[f"{phase}_peak_bytes"], r[f"measured_{phase}_peak_bytes"])
                  for r in rows for phase in ("forward", "backward", "optimizer")
                  if abs(r[f"{phase}_peak_bytes"] - r[f"measured_{phase}_peak_bytes"])
                  > 0.005 * r[f"measured_{phase}_peak_bytes"]]
        if not misses:
            break
    assert not misses, misses
    layer = 2 * (256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 688 * 256 + 2 * 256)  # one bf16 decoder layer
    for r in rows:
        # the copy is what was missing: without it the estimate is a layer under
        assert r["measured_forward_peak_bytes"] - (r["forward_peak_bytes"] - layer) > 0.9 * layer


def test_ddp_all_reduces_the_trainable_gradients(ddp_rows):
    """DDP keeps whole replicas and all-reduces the trainable gradients once per step: 2 (N - 1) / N of them."""
    for r in ddp_rows:
        assert r["measured_all_reduce_buffer_bytes"] == r["gradients_bytes"] == r["measured_gradients_bytes"]
        assert r["measured_all_gather_calls"] == r["measured_reduce_scatter_calls"] == 0
        assert r["measured_param_shard_bytes"] == r["weights_bytes"] + r["adapter_bytes"]


def test_shards_are_the_estimators_padding_included():
    """dim 0 odd (vocab 4097, ffn 689) over 2 ranks: torch.chunk gives rank 0 ceil(dim0 / 2) rows and rank 1 one
    fewer, and FSDP2 pads rank 1's to rank 0's. Each rank stores the padded shard (parameters and gradients,
    read off the DTensors' local storages); its optimizer states are for its own rows only."""
    odd = replace(TINY, name="tiny-llama-odd", vocab_size=4097, intermediate_size=689)
    rows = _bench(("full",), "fsdp", "lorabench", spec=odd)
    plan = plan_step(Case(odd, METHODS["full"], setup=replace(SETUP, device="cpu", impl="lorabench")))
    layer = 2 * (128 * 256 + 2 * 64 * 256 + 128 * 256 + 2 * 345 * 256 + 128 * 689 + 2 * 128)  # rank 0's rows
    root = 2 * (2 * 2049 * 256 + 128)
    for r in rows:
        rm = rank_memory(plan, Parallel(2, "fsdp"), r["gpu_rank"])
        assert r["status"] == "ok" and abs(r["peak_error_pct"]) <= TOLERANCE_PCT, r["peak_error_pct"]
        assert r["measured_param_shard_bytes"] == rm.weights_bytes + rm.adapter_bytes == 4 * layer + root
        assert r["measured_gradients_bytes"] == rm.gradients_bytes == 4 * layer + root
        # AdamW keeps a 4-byte step count per tensor besides exp_avg and exp_avg_sq (not in the estimate)
        steps = 4 * (r["measured_optimizer_tensors"] // 3)
        assert r["measured_optimizer_bytes"] - steps == rm.optimizer_bytes
    own = [r["measured_optimizer_bytes"] for r in rows]
    # rank 1 has one row fewer of each odd tensor: vocab 2048 of 2049 (embed, head), ffn 344 of 345 (gate, up
    # per layer), 688 of 689 is even (down: [256, 689] shards dim 0 = 256)
    assert own[0] - own[1] == 2 * 2 * (2 * 256 + 4 * 2 * 256)


def test_nproc_1_is_bench_exactly():
    """--nproc 1 (sharding none) runs the same case under torchrun: the same estimate, field for field, as bench
    without --nproc, and the same measurement."""
    one = _bench(("lora",), "none", "lorabench", nproc=1)[0]
    here = run_bench(TINY, [METHODS["lora"]], [8], None, SETUP, steps=1, warmup=2, impl="lorabench",
                     progress=False, device="cpu")[0]
    for key in ("peak_bytes", "forward_peak_bytes", "backward_peak_bytes", "optimizer_peak_bytes", "weights_bytes",
                "adapter_bytes", "gradients_bytes", "optimizer_bytes", "estimated_after_forward_bytes", "device_bytes"):
        assert one[key] == here[key], key
    assert one["status"] == "ok" and one["comm_bytes"] == one["measured_comm_bytes"] == 0
    assert abs(one["measured_peak_bytes"] - here["measured_peak_bytes"]) <= 0.001 * here["measured_peak_bytes"]


def test_a_failing_rank_gives_a_row_and_the_others_are_stopped(monkeypatch):
    monkeypatch.setenv("LORABENCH_FAULT", "1:raise")
    started = time.monotonic()
    rows = _bench(("lora",), "fsdp", "lorabench", timeout_s=120)
    assert time.monotonic() - started < 60
    assert [r["status"] for r in rows] == ["stopped", "failed"]
    assert "fails on purpose" in rows[1]["error"] and "rank 1 failed" in rows[0]["error"]
    assert rows[0]["peak_error_pct"] is None and rows[0]["peak_bytes"] > 0  # the estimate is still there


def test_a_killed_rank_is_named_and_bench_exits_1(monkeypatch):
    """Issue 21, finding 10b: SIGKILL to rank 1 gave both rows `failed: "error_file: <N/A>"` and exit code 0."""
    monkeypatch.setenv("LORABENCH_FAULT", "1:kill")
    res = CliRunner().invoke(cli, ["bench", "-m", "tiny-llama", "--device", "cpu", "--impl", "lorabench", "--method",
                                   "lora", "--layers", "1", "-b", "1", "-s", "32", "--steps", "1", "--warmup", "1",
                                   "--nproc", "2", "--sharding", "fsdp", "--no-progress", "-f", "json"])
    assert res.exit_code == 1, res.output
    rows = json.loads(res.stdout)
    assert [r["status"] for r in rows] == ["stopped", "failed"]
    assert rows[1]["error"] == "rank 1 was killed by SIGKILL (exit code -9) before it wrote its row"
    assert rows[0]["error"] == "stopped by torchrun when rank 1 failed: it was killed by SIGKILL (exit code -9)"
    assert res.stderr.startswith("lorabench: 1 of 2 row(s) failed (lora: rank 1 was killed by SIGKILL")


def test_a_hung_rank_is_stopped_at_the_timeout(monkeypatch):
    monkeypatch.setenv("LORABENCH_FAULT", "1:hang")
    started = time.monotonic()
    rows = _bench(("lora",), "fsdp", "lorabench", timeout_s=8)
    assert time.monotonic() - started < 8 + 15  # the timeout, then SIGTERM and at most the grace before SIGKILL
    assert [r["status"] for r in rows] == ["timeout", "timeout"] and "--timeout 8 s" in rows[0]["error"]


def test_cli_nproc_2_fsdp_prints_a_row_per_rank_and_the_largest_error():
    res = CliRunner().invoke(cli, ["bench", "-m", "tiny-llama", "--device", "cpu", "--impl", "lorabench",
                                   "--method", "lora", "-b", "2", "-s", "64", "--loop", "plain", "--steps", "1",
                                   "--nproc", "2", "--sharding", "fsdp", "--no-progress", "--check"])
    assert res.exit_code == 0, res.output
    assert "2 processes, sharding fsdp" in res.output
    assert re.search(r"lora r=8: largest rank error [+-]0\.\d\d% \(rank [01] of 2\)", res.output), res.output


@pytest.mark.parametrize("args, msg", [(("--sharding", "fsdp"), "only apply with --nproc"),
                                       (("--timeout", "5"), "only apply with --nproc"),
                                       (("--nproc", "2"), "needs --sharding"),
                                       (("--nproc", "0"), "--nproc"),
                                       (("--nproc", "2", "--sharding", "zero3"), "--sharding")])
def test_cli_bad_distributed_options_exit_2_in_one_line(args, msg):
    res = CliRunner().invoke(cli, ["bench", "-m", "tiny-llama", "--device", "cpu", *args])
    assert res.exit_code == 2 and msg in res.output, res.output


def test_refusals_are_one_line():
    for setup, msg in ((replace(SETUP, loss="chunked"), "--loss chunked"), (replace(SETUP, dtype="nf4"), "--dtype nf4")):
        with pytest.raises(LorabenchError, match=msg):
            run_distributed_bench(TINY, [METHODS["lora"]], [8], None, setup, nproc=2, sharding="fsdp",
                                  progress=False, device="cpu")


def test_decoder_layers_of_either_implementation():
    from lorabench.nn.model import build_model

    model = build_model(replace(TINY, num_layers=2), device="meta")
    assert decoder_layers(model) == list(model.layers)
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   vocab_size=128)
    hf = transformers.LlamaForCausalLM(cfg)
    with expected_library_warnings():
        wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    assert decoder_layers(wrapped) == list(hf.model.layers)


def test_tracker_sees_storages_resized_outside_the_dispatcher():
    """FSDP2 frees and re-allocates its unsharded parameters with UntypedStorage.resize_, which no
    TorchDispatchMode sees; the tracker wraps it while active."""
    original = torch.UntypedStorage.resize_
    with LiveTensorTracker() as tracker:
        t = torch.empty(1000)
        t.untyped_storage().resize_(0)
        assert tracker.current_bytes == 0
        t.untyped_storage().resize_(4000)
        assert tracker.current_bytes == tracker.peak_bytes == 4000
    assert torch.UntypedStorage.resize_ is original  # put back on exit


def test_comm_volume_for_the_tested_cases_by_hand():
    """The estimate the collectives are compared with, written out: fsdp over 2 sends half of each all-gather
    (root once, layers twice) and of each reduce-scatter; ddp sends the trainable gradients once (2 (N-1)/N)."""
    plan = plan_step(Case(TINY, METHODS["full"], setup=replace(SETUP, device="cpu")))
    whole = 2 * 4_999_424  # bf16
    layer = 2 * (256 * 256 + 2 * 128 * 256 + 256 * 256 + 3 * 688 * 256 + 2 * 256)
    v = comm_volume(plan, Parallel(2, "fsdp"))
    assert v.all_gather_bytes == (whole + 4 * layer) // 2 and v.reduce_scatter_bytes == whole // 2
    assert comm_volume(plan, Parallel(2, "ddp")).all_reduce_bytes == whole


@pytest.mark.cuda
def test_nproc_1_fsdp_on_cuda_smoke():
    """FSDP2 on one GPU under torchrun (NCCL, the allocator's peak): it runs, reports, and lands near the
    estimate (world size 1: each group's unsharded parameters are copies of its shards, nothing all-gathered)."""
    rows = run_distributed_bench(TINY, [METHODS["full"], METHODS["lora"]], [8], None,
                                 TrainingSetup(batch_size=2, seq_len=256), nproc=1, sharding="fsdp", impl="lorabench",
                                 steps=2, warmup=2, progress=False, device="cuda")
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert abs(r["peak_error_pct"]) < 5.0, (r["method"], r["peak_error_pct"])
        assert r["measured_comm_bytes"] == r["comm_bytes"] == 0
