"""Batches as users make them (issue 24): padded, packed and padding-free rows.

Held to transformers + PEFT steps on the CPU live-tensor tracker (steady state: after a warm-up step) for a Llama, a
Qwen2 and a Gemma 3 model, and to hand calculations written out from torch's and transformers' sources:
- torch's SDPA turns a bool mask into an additive one in q's dtype, per call (attention.cpp,
  convert_boolean_attn_mask), which the kernel that takes it keeps; CUDA's memory-efficient kernel pads its last
  dimension to a multiple of 8 (preprocess_mask);
- transformers' SDPA path turns off grouped-query attention once a mask exists (use_gqa_in_sdpa) and copies k and
  v with repeat_kv, a view when there is one kv head;
- transformers reads packed examples from position_ids only without a cache (_preprocess_mask_arguments).
"""

import json
import math

import pytest

from lorabench.errors import LorabenchError
from lorabench.estimator.batches import Lengths, keys_attended, read_lengths
from lorabench.estimator.case import Case
from lorabench.estimator.memory import estimate_memory
from lorabench.estimator.params import count_params
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.hfconfig import from_hf_config
from lorabench.models.presets import PRESETS

# ---------------------------------------------------------------------------------------------------------------
# The examples' lengths


def test_expected_longest_equals_every_draw_enumerated():
    import itertools

    values = [3, 3, 5, 9, 9, 9, 20]
    lengths = Lengths.of(values)
    for rows in (1, 2, 3):
        draws = list(itertools.product(values, repeat=rows))
        assert lengths.expected_longest(rows) == pytest.approx(sum(max(d) for d in draws) / len(draws))


def test_typical_padded_batch_by_hand():
    # lengths 100, 200, 300, 2048 (F = 1/4, 2/4, 3/4, 1); the longest of 2 draws:
    # 100 (1/16) + 200 (4/16 - 1/16) + 300 (9/16 - 4/16) + 2048 (1 - 9/16) = 6.25 + 37.5 + 93.75 + 896 = 1,033.5
    import lorabench

    row = lorabench.estimate(model="llama-3-8b", method="lora", batch_size=2, padding="longest",
                             lengths=[100, 200, 300, 2048])[0]
    assert row["seq_len"] == 2048  # the file's longest, when seq_len is not given
    assert row["typical_seq_len"] == 1034
    assert row["mean_len"] == 662.0
    assert row["real_tokens_per_step"] == 2 * 662
    assert row["padding_pct"] == pytest.approx(100 * (1 - 1324 / 2068), abs=0.01)


def test_lengths_are_capped_at_the_longest_allowed():
    lengths = Lengths.of([10, 50, 70]).capped(60)
    assert lengths.counts == ((10, 1), (50, 1), (60, 1)) and lengths.mean == 40 and lengths.longest == 60


def test_lengths_files(tmp_path):
    text = tmp_path / "lengths.txt"
    text.write_text("# token lengths\n12, 40\n40 7  # the last\n")
    assert read_lengths(str(text)).counts == ((7, 1), (12, 1), (40, 2))
    listed = tmp_path / "lengths.json"
    listed.write_text(json.dumps([5, 6]))
    assert read_lengths(str(listed)).mean == 5.5
    for body, message in (("", "no token lengths"), ("4 -1", "positive integer"), ("4 x", "'x' is not"),
                          ("[1.5]", "positive integer"), ('{"a": 1}', "is not a token length"),
                          ("[1,", "not a JSON list")):
        bad = tmp_path / "bad.txt"
        bad.write_text(body)
        with pytest.raises(LorabenchError, match=message):
            read_lengths(str(bad))


# ---------------------------------------------------------------------------------------------------------------
# Hand calculations


def _case(spec, method="lora", targets="all-linear", **setup):
    m = METHODS[method]
    return Case(spec, m, 8, count_params(spec, m, 8, targets).targets, TrainingSetup(**setup).for_spec(spec))


def test_mask_bytes_by_hand_llama_3_8b_on_cuda():
    # batch 4 x 4,097 tokens padded, bf16, 32 layers, q 4,096 wide, k and v 1,024 (8 kv heads of 32):
    # per layer the additive mask [4, 1, 4097, 4104] (4,097 keys padded to a multiple of 8) in bf16, and k and v
    # copied to q's width: 2 x 2 x (4096 - 1024) x 4 x 4097 bytes; and the int64 attention_mask [4, 4097]
    spec = PRESETS["llama-3-8b"]
    plain = estimate_memory(_case(spec, batch_size=4, seq_len=4097))
    padded = estimate_memory(_case(spec, batch_size=4, seq_len=4097, padding="longest",
                                   lengths=Lengths.summary(1000, 4097)))
    by_hand = 32 * (2 * 4 * 4097 * 4104 + 2 * 2 * (4096 - 1024) * 4 * 4097) + 8 * 4 * 4097
    assert padded.activations_bytes - plain.activations_bytes == by_hand


def test_one_kv_head_needs_no_copy_and_the_cpu_pads_no_keys():
    # Gemma 3 1B: 1 kv head (repeat_kv's reshape is a view); padded on the CPU: only the [B, 1, S, S] masks, in its
    # 26 layers (its sliding layers have one unpadded too: 512 > its window, so padding adds to its 4 global ones)
    spec = PRESETS["gemma-3-1b"]
    s = 2048
    assert spec.sliding_window < s
    plain = estimate_memory(_case(spec, batch_size=2, seq_len=s, device="cpu"))
    padded = estimate_memory(_case(spec, batch_size=2, seq_len=s, device="cpu", padding="max",
                                   lengths=Lengths.summary(700, s)))
    global_layers = spec.num_layers - spec.sliding_layers()
    assert padded.activations_bytes - plain.activations_bytes == global_layers * 2 * 2 * s * s + 8 * 2 * s


def test_attention_computes_every_key_under_a_mask():
    from lorabench.estimator.flops import estimate_flops
    from lorabench.estimator.stepwork import step_ops

    spec = PRESETS["llama-3-8b"]
    plain = _case(spec, batch_size=2, seq_len=4096)
    padded = _case(spec, batch_size=2, seq_len=4096, padding="max", lengths=Lengths.summary(900, 4096))
    # the model's work is the same (MFU is taken over it) ...
    assert estimate_flops(padded).forward_flops == estimate_flops(plain).forward_flops

    # ... but the kernel's is not: per token and layer 4 q_dim FLOPs a key, the causal half (2,048 keys) without a
    # mask, all 4,096 with one (is_causal is off once a mask is given)
    def kernel(case, phase):
        return sum(op.flops * op.runs for op in step_ops(case) if op.kind == "attention" and op.phase == phase)

    per_token = 32 * 4 * 4096 * (4096 - 2048)
    assert kernel(padded, "forward") - kernel(plain, "forward") == 2 * 4096 * per_token
    assert kernel(padded, "backward") - kernel(plain, "backward") == pytest.approx(2.5 * 2 * 4096 * per_token)


def test_packed_model_flops_attend_within_each_example():
    from lorabench.estimator.flops import estimate_flops

    # packed rows of 4,096 tokens of 512-token examples: each query's useful work is half its example, 256 keys,
    # not half the row (2,048): 32 layers x 4 x q_dim 4,096 FLOPs a key less per token
    spec = PRESETS["llama-3-8b"]
    plain = estimate_flops(_case(spec, batch_size=1, seq_len=4096))
    packed = estimate_flops(_case(spec, batch_size=1, seq_len=4096, packing=True, lengths=Lengths.summary(512, 4096)))
    assert plain.forward_flops - packed.forward_flops == 4096 * 32 * 4 * 4096 * (2048 - 256)


def test_padding_free_on_cuda_attends_within_each_example():
    # examples of 100 and 300 tokens: a query attends to half its own example on average,
    # E[l^2] / (2 E[l]) = (100^2 + 300^2) / 2 / (2 x 200) = 125 keys
    spec = PRESETS["llama-3-8b"]
    setup = TrainingSetup(batch_size=2, seq_len=300, padding_free=True, lengths=Lengths.of([100, 300]))
    assert keys_attended(spec, setup, False) == 125
    assert keys_attended(spec, TrainingSetup(batch_size=2, seq_len=300, padding_free=True, device="cpu",
                                             lengths=Lengths.of([100, 300])), False) == 600  # the CPU: a block mask


def test_cost_follows_the_real_tokens():
    import lorabench

    row = lorabench.estimate(model="llama-3.2-1b", method="lora", gpu="H100-80GB", batch_size=4, seq_len=2048,
                             padding="longest", mean_len=500, tokens=10 ** 8, grad_checkpointing=True)[0]
    assert row["real_tokens_per_step"] == 2000 and row["tokens_per_step"] == 8192
    assert row["train_steps"] == math.ceil(10 ** 8 / 2000)
    assert row["tokens_per_s"] == pytest.approx(2000 / (row["step_ms"] / 1e3))


# ---------------------------------------------------------------------------------------------------------------
# Measured: transformers + PEFT on the CPU tracker

QWEN2 = {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096, "tie_word_embeddings": False}
GEMMA3 = {"model_type": "gemma3_text", "hidden_size": 256, "intermediate_size": 640, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 4096,
          "query_pre_attn_scalar": 64, "sliding_window": 16}
FAMILIES = {"llama": lambda: PRESETS["tiny-llama"], "qwen2": lambda: from_hf_config(QWEN2, name="qwen2"),
            "gemma3": lambda: from_hf_config(GEMMA3, name="gemma3")}
BATCHES = {
    "unpadded": {},
    "padded": {"padding": "longest", "lengths": Lengths.summary(40, 64)},
    "padded-max-ckpt": {"padding": "max", "lengths": Lengths.summary(40, 64), "grad_checkpointing": True},
    "packed": {"packing": True, "lengths": Lengths.summary(20, 64)},
    "packed-plain-loop": {"packing": True, "lengths": Lengths.summary(20, 64), "loop": "plain"},
    "padding-free": {"padding_free": True},
}


def _bench(spec, methods=("lora", "full"), **setup):
    pytest.importorskip("peft")
    from lorabench.measure.bench import run_bench

    setup = TrainingSetup(**{"batch_size": 4, "seq_len": 64, "dtype": "bf16", "device": "cpu", **setup})
    rows = run_bench(spec, [METHODS[m] for m in methods], [8], "all-linear", setup, steps=1, warmup=1, impl="peft",
                     progress=False, device="cpu")
    assert all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_batches_within_1pct_of_transformers_peft(family, batch):
    for r in _bench(FAMILIES[family](), **BATCHES[batch]):
        assert abs(r["peak_error_pct"]) < 1.0, (family, batch, r["method"], r["peak_error_pct"])
        assert abs(r["peak_error_pct"]) < 0.1  # measured: within 0.03% on every case here


def test_padding_adds_the_masks_by_hand_measured():
    # tiny-llama (4 layers, q 256 wide, k and v 128), batch 4 x 64, bf16: padding adds per layer the additive mask
    # 2 x 4 x 64 x 64 and k, v copied to q's width, 2 x 2 x (256 - 128) x 4 x 64; and the int64 attention_mask,
    # made before the step: at the peak (backward's start) all of it is alive
    spec = PRESETS["tiny-llama"]
    plain = _bench(spec, methods=("lora",))[0]
    padded = _bench(spec, methods=("lora",), **BATCHES["padded"])[0]
    by_hand = 4 * (2 * 4 * 64 * 64 + 2 * 2 * (256 - 128) * 4 * 64) + 8 * 4 * 64
    assert padded["measured_peak_bytes"] - plain["measured_peak_bytes"] == by_hand


def test_a_kv_cache_leaves_packed_rows_unmasked_measured():
    # the plain loop keeps transformers' KV cache on, and transformers then reads no examples from position_ids:
    # packing adds only the int64 position_ids and rotary tables per row (cos and sin [4, 64, 32] in bf16 instead
    # of [1, 64, 32])
    spec = PRESETS["tiny-llama"]
    plain = _bench(spec, methods=("lora",), loop="plain")[0]
    packed = _bench(spec, methods=("lora",), **BATCHES["packed-plain-loop"])[0]
    assert packed["measured_peak_bytes"] - plain["measured_peak_bytes"] == 8 * 4 * 64 + 2 * 2 * 3 * 64 * 32
    assert any("attends across its examples" in n for n in packed["notes"])


def test_trace_equals_the_analytic_model_for_batches():
    pytest.importorskip("peft")
    from lorabench.measure.trace import trace_case

    spec = PRESETS["tiny-llama"]
    for batch in ("padded", "packed", "padding-free"):
        case = _case(spec, batch_size=4, seq_len=64, dtype="bf16", device="cpu", **BATCHES[batch])
        traced = trace_case(case)["measured_peak_bytes"]
        assert estimate_memory(case).peak_bytes == pytest.approx(traced, rel=1e-3), batch


# ---------------------------------------------------------------------------------------------------------------
# The CLI


def _cli(*args):
    from click.testing import CliRunner

    from lorabench.cli import cli

    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("args, message", [
    (["--mean-len", "10"], "give --padding longest, --packing or --padding-free"),
    (["--packing", "--padding", "max"], "--packing leaves no padding"),
    (["--padding", "max", "--lengths", "/nonexistent/lengths.txt"], "cannot read lengths file"),
    (["--padding", "max", "--mean-len", "5000"], "at most the longest"),
    (["--padding", "max", "--mean-len", "5", "--lengths", "/dev/null"], "not both"),
    (["--padding-free", "--impl", "lorabench"], "take no attention mask"),
    (["--padding", "widest"], "Invalid value for '--padding'"),
])
def test_bad_batches_are_one_line(args, message):
    result = _cli("memory", "-m", "tiny-llama", *args)
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_lengths_file_on_the_command_line(tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("100\n300\n")
    result = _cli("memory", "-m", "tiny-llama", "--method", "lora", "-b", "2", "--padding", "longest", "--lengths",
                  str(path), "-f", "json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.output)[0]
    assert (row["seq_len"], row["mean_len"], row["padding"]) == (300, 200, "longest")
    # two draws: 100 (1/4) and 300 (3/4): 250 expected
    assert row["typical_seq_len"] == 250
    text = _cli("memory", "-m", "tiny-llama", "--method", "lora", "-b", "2", "--padding", "longest", "--lengths",
                str(path)).output
    assert "padded to the batch's longest (typical batch 2 x 250" in text


def test_help_shows_the_batch_options():
    out = _cli("memory", "--help").output
    for flag in ("--padding", "--packing", "--padding-free", "--lengths", "--mean-len"):
        assert flag in out


def test_peft_lorafa_optimizer_keeps_less_as_estimated_measured():
    # PEFT's MetaMathQA loop on a small Llama: its own create_lorafa_optimizer (lora_A frozen), a right-padded batch,
    # out = model(**batch); out.loss.backward(). LoRA-FA keeps less exactly PEFT's fp32 casts of each layer's input
    # for lora_A of q and v: 4 layers x 2 x 512 tokens x 256 x 4 bytes; lorabench's estimate differs by the same
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_lorafa_optimizer

    from lorabench.measure.probes import LiveTensorTracker

    cfg = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
           "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096, "tie_word_embeddings": False}

    def measured(lorafa):
        torch.manual_seed(0)
        with LiveTensorTracker("cpu") as tracker:
            hf = transformers.AutoConfig.for_model(**{**cfg, "pad_token_id": 0})
            model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
            model = peft.get_peft_model(model, peft.LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"]))
            if lorafa:
                optimizer = create_lorafa_optimizer(model, r=32, lora_alpha=64, lr=1e-4)
            else:
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            ids = torch.randint(1, 4096, (4, 128))
            mask = torch.ones_like(ids)
            mask[1:, 100:] = 0
            model.train()
            for _ in range(2):  # the second step: the optimizer's states exist
                optimizer.zero_grad()
                start = tracker.current_bytes
                out = model(input_ids=ids, attention_mask=mask, labels=ids)
                kept = tracker.current_bytes - start
                tracker.reset_peak()
                out.loss.backward()
                peak = tracker.peak_bytes - start
                optimizer.step()
                del out
        return kept, peak

    lora, fa = measured(False), measured(True)
    by_hand = 4 * 2 * 4 * 128 * 256 * 4
    assert (lora[0] - fa[0], lora[1] - fa[1]) == (by_hand, by_hand)
    spec = from_hf_config(cfg, name="small-llama")
    rows = {m: estimate_memory(Case(spec, METHODS[m], 32, ("q", "v"), TrainingSetup(
        batch_size=4, seq_len=128, device="cpu", loop="plain", padding="longest", lengths=Lengths.summary(110, 128),
        alpha=64.0))) for m in ("lora", "lora-fa")}
    assert rows["lora"].activations_bytes - rows["lora-fa"].activations_bytes == by_hand
