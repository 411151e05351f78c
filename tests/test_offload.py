"""Offloaded gradient checkpointing (--offload checkpoints, issue 24): each checkpointed layer's input in pinned host
memory, as Unsloth's offloaded checkpointing and axolotl's activation_offloading: hidden_states keep it.

Measured on the CPU tracker with lorabench.measure.offload's autograd Function in transformers' checkpointed layers
(the host copies counted apart), against transformers + PEFT steady-state steps; and held to axolotl PR #3733's
published Qwen3-8B figures.
"""

import pytest

from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.hfconfig import from_hf_config
from lorabench.models.presets import PRESETS

QWEN3 = {"model_type": "qwen3", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 4096,
         "tie_word_embeddings": False}
GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 4096,
          "query_pre_attn_scalar": 64, "sliding_window": 16}
FAMILIES = {"llama": lambda: PRESETS["tiny-llama"], "qwen3": lambda: from_hf_config(QWEN3, name="qwen3"),
            "gemma3": lambda: from_hf_config(GEMMA3, name="gemma3")}


def _bench(spec, methods=("lora", "full"), **setup):
    pytest.importorskip("peft")
    from lorabench.measure.bench import run_bench

    setup = TrainingSetup(**{"batch_size": 4, "seq_len": 64, "dtype": "bf16", "device": "cpu",
                             "grad_checkpointing": True, **setup})
    rows = run_bench(spec, [METHODS[m] for m in methods], [8], "all-linear", setup, steps=1, warmup=1, impl="peft",
                     progress=False, device="cpu")
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("loop", ["trainer", "plain"])
def test_offloaded_checkpoints_within_0_1pct_of_transformers_peft(family, loop):
    spec = FAMILIES[family]()
    for r in _bench(spec, offload="checkpoints", loop=loop):
        assert abs(r["peak_error_pct"]) < 0.1, (family, loop, r["method"], r["peak_error_pct"])
        # every layer's input, bf16: layers x 4 x 64 tokens x d x 2 bytes
        assert r["measured_host_bytes"] == r["offload_host_bytes"] == spec.num_layers * 4 * 64 * 256 * 2


def test_the_device_keeps_one_input_where_autograd_holds_a_leaf_measured():
    # LoRA on frozen embeddings: transformers' enable_input_require_grads makes the embeddings' output a leaf that
    # requires a gradient, which autograd's AccumulateGrad node holds through backward: of tiny-llama's 4 layer
    # inputs (4 x 64 tokens x 256 x 2 bytes each) 3 leave the device
    spec = PRESETS["tiny-llama"]
    kept, offloaded = (_bench(spec, methods=("lora",), offload=o)[0] for o in ("none", "checkpoints"))
    assert kept["measured_peak_bytes"] - offloaded["measured_peak_bytes"] == 3 * 4 * 64 * 256 * 2
    assert kept["peak_bytes"] - offloaded["peak_bytes"] == 3 * 4 * 64 * 256 * 2


def test_axolotl_3733_qwen3_8b_offload_saving():
    # axolotl PR #3733 (Qwen3-8B full-parameter, one GPU, bf16): GC-only 63.3 GB and hidden_states 58.9 GB at 16k
    # tokens, 73.1 and 64.3 GB at 32k. The saving is every layer input but the one recomputed: 35 x tokens x 4096 x
    # 2 bytes, 4.38 GiB at 16k and 8.75 GiB at 32k, against the published 4.4 and 8.8 (reported as GB; read as GiB,
    # torch's max_memory_allocated / 2**30: within 1%).
    import lorabench

    for seq, published in ((16384, 63.3 - 58.9), (32768, 73.1 - 64.3)):
        rows = [lorabench.estimate(model="qwen3-8b", method="full", seq_len=seq, grad_checkpointing=True,
                                   optimizer="adamw-8bit", offload=o)[0] for o in ("none", "checkpoints")]
        saving = (rows[0]["peak_bytes"] - rows[1]["peak_bytes"]) / 2 ** 30
        assert saving == pytest.approx(36 * seq * 4096 * 2 / 2 ** 30)  # (full training: no leaf is kept)
        assert saving == pytest.approx(published, rel=0.03)
    # the totals depend on the optimizer and loss the PR does not state: with 8-bit AdamW and transformers' loss the
    # 16k pair is within 0.5% (63.58 and 59.08 GiB); at 32k that loss alone would exceed the published totals
    row = lorabench.estimate(model="qwen3-8b", method="full", seq_len=16384, grad_checkpointing=True,
                             optimizer="adamw-8bit", offload="checkpoints")[0]
    assert row["peak_bytes"] / 2 ** 30 == pytest.approx(58.9, rel=0.005)


def test_the_copies_cross_the_host_link_by_hand():
    # H100 SXM: PCIe Gen5 x16 to the host, 63 GB/s a direction, 80% of it reached (compute.HOST_LINK_EFFICIENCY);
    # Qwen3-8B at 16k tokens: each of 36 layer inputs (16,384 x 4,096 x 2 bytes) to the host and back
    import lorabench

    rows = [lorabench.estimate(model="qwen3-8b", method="lora", seq_len=16384, grad_checkpointing=True, gpu="H100-80GB",
                               offload=o)[0] for o in ("none", "checkpoints")]
    moved = 2 * 36 * 16384 * 4096 * 2
    assert rows[1]["step_ms"] - rows[0]["step_ms"] == pytest.approx(1e3 * moved / (0.8 * 63e9), rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--offload", "checkpoints"], "add --grad-checkpointing"),
    (["--offload", "checkpoints", "--grad-checkpointing", "--impl", "lorabench"], "give --impl peft"),
    (["--offload", "everything"], "Invalid value for '--offload'"),
])
def test_bad_offload_is_one_line(args, message):
    from click.testing import CliRunner

    from lorabench.cli import cli

    result = CliRunner().invoke(cli, ["memory", "-m", "tiny-llama", *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_fit_offers_offloaded_checkpoints():
    import lorabench

    answer = lorabench.fit(model="llama-3-8b", method="lora", gpu="RTX-4090", seq_len=8192)
    knobs = {k["change"]: k for k in answer["knobs"]}
    assert "offloaded checkpoints" in knobs
    # the inputs off the device: 31 of 32 layers' 8,192 x 4,096 x 2 bytes more to spare than checkpointing alone
    gained = knobs["offloaded checkpoints"]["spare_bytes"] - knobs["checkpointing"]["spare_bytes"]
    assert gained == pytest.approx(31 * 8192 * 4096 * 2, rel=0.08)  # (less the allocator's share of the peak)


def test_fit_finds_the_longest_context_with_each_saver():
    # the knob's longest context fits by `memory` with those savers, and one token more does not
    import lorabench

    answer = lorabench.fit(model="llama-3-8b", method="lora", gpu="RTX-4090", seq_len=8192)
    knob = next(k for k in answer["knobs"] if k["change"] == "fused loss + offloaded checkpoints")
    n = knob["max_seq_len"]
    assert n > next(k for k in answer["knobs"] if k["change"] == "checkpointing + fused loss")["max_seq_len"]
    for seq, fits in ((n, True), (n + 1, False)):
        row = lorabench.estimate(model="llama-3-8b", method="lora", gpu="RTX-4090", seq_len=seq, loss="fused-linear",
                                 grad_checkpointing=True, offload="checkpoints")[0]
        assert row["fits"] is fits, seq


def test_offloaded_checkpoints_on_a_kbit_prepared_qlora_base_measured():
    # peft.prepare_model_for_kbit_training turns checkpointing on itself; the offload goes on top of it. Its fp32
    # residual stream makes each layer input 4 bytes an element: 4 layers x 2 x 64 tokens x 256 x 4 bytes
    pytest.importorskip("bitsandbytes")
    r = _bench(PRESETS["tiny-llama"], methods=("lora",), batch_size=2, dtype="nf4", kbit_prepare=True,
               offload="checkpoints")[0]
    assert abs(r["peak_error_pct"]) < 0.1, r["peak_error_pct"]
    assert r["measured_host_bytes"] == r["offload_host_bytes"] == 4 * 2 * 64 * 256 * 4
