"""Verdicts, fixes and limits (lorabench.estimator.fit), and the answers `memory` and `fit` print first."""

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from lorabench.cli import cli
from lorabench.estimator.fit import Case, fits, fixes, limits, required_bytes, savers, smallest_gpu, spare_bytes
from lorabench.gpus import GPUS, get_gpu
from lorabench.estimator.memory import ALLOCATOR_ALLOWANCE, step_parts
from lorabench.estimator.setup import TrainingSetup
from lorabench.methods import METHODS
from lorabench.models.presets import PRESETS
from lorabench.render import flags

REPO = Path(__file__).resolve().parents[1]
LLAMA = PRESETS["llama-3-8b"]
GIB = 2 ** 30
# The question: LoRA r=16 on all linear layers of Llama-3-8B, 4096 tokens, an RTX 4090.
QUESTION = ("memory", "-m", "llama-3-8b", "--method", "lora", "-r", "16", "-t", "all-linear", "--gpu", "RTX-4090",
            "-s", "4096")


def run(*args, columns=80):
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": str(columns)})


def test_the_allowance_is_the_median_of_the_committed_h100_steps():
    ratios = []
    for path in sorted((REPO / "reports" / "gpu-sweep-h100").glob("bench_*.json")):
        for row in json.loads(path.read_text()):
            if row.get("measured_reserved_bytes") and row.get("measured_peak_bytes"):
                ratios.append(row["measured_reserved_bytes"] / row["measured_peak_bytes"] - 1)
    assert len(ratios) == 59
    assert statistics.median(ratios) == pytest.approx(ALLOCATOR_ALLOWANCE, abs=0.0005)


def test_the_question_is_answered_in_the_first_lines_at_80_columns():
    res = run(*QUESTION)
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].startswith("lora r=16 on one RTX-4090 (23.99 GiB): does NOT fit")
    head = " ".join(lines[:4])
    assert "activations 36.07 GiB alone exceed the GPU" in head and "Fits with" in head
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)


def test_the_suggested_change_run_as_the_next_command_fits():
    row = json.loads(run(*QUESTION, "-f", "json").stdout)[0]
    assert row["fits"] is False and row["spare_bytes"] < 0
    for fix in (row["fix"], row["fix_alternative"]):
        assert fix["args"], fix
        again = json.loads(run(*QUESTION, *fix["args"], "-f", "json").stdout)[0]
        assert again["fits"] is True and again["spare_bytes"] == fix["spare_bytes"] >= 0
    # and the printed sentence names exactly those options
    first = " ".join(run(*QUESTION).stdout.split())
    assert f"Fits with {' '.join(row['fix']['args'])} (" in first


def test_a_yes_says_how_close_it_is():
    # Llama-3-8B LoRA r=8 on q,v at 2048 tokens: 28.93 GiB peak + 0.69 runtime + 7.6% allowance of an A100-40GB.
    row = json.loads(run("memory", "--method", "lora", "--gpu", "A100-40GB", "-f", "json").stdout)[0]
    expected = 40 * GIB - row["peak_bytes"] - row["overhead_bytes"] - int(0.076 * row["peak_bytes"])
    assert row["fits"] and row["spare_bytes"] == expected
    assert run("memory", "--method", "lora", "--gpu", "A100-40GB").stdout.startswith(
        f"lora r=8 on one A100-40GB (40.00 GiB): fits, {expected / GIB:.2f} GiB spare")


def test_full_fine_tuning_of_8b_needs_more_than_an_80gb_card_by_hand():
    # Pure bf16 AdamW on 8,030,261,248 weights: weights, gradients (2 bytes each), exp_avg and exp_avg_sq
    # (4 bytes) and foreach AdamW's sqrt temporary (2 bytes) meet in the optimizer step: 10 bytes a weight,
    # 74.79 GiB; with the 0.69 GiB runtime and 7.6% of the peak for the allocator, more than 80 GiB.
    n = 8_030_261_248
    case = Case(LLAMA, METHODS["full"], None, None, TrainingSetup(batch_size=1, seq_len=1))
    assert required_bytes(case) >= 10 * n + 0.69 * GIB
    assert not fits(case, get_gpu("A100-80GB").memory_bytes)
    assert limits(case, get_gpu("A100-80GB").memory_bytes).max_seq_len is None
    # 8-bit AdamW (two uint8 states and a per-256 fp32 absmax: ~2.03 bytes) brings it to ~6 bytes a weight
    first = fixes(case, get_gpu("A100-80GB").memory_bytes)[0]
    assert first.changes == (("optimizer", "adamw-8bit"),) and first.steps == ("adamw-8bit",)
    assert flags.args(first.changes) == ["--optimizer", "adamw-8bit"]


@pytest.mark.parametrize("method, gpu", [("lora", "RTX-4090"), ("dora", "L4"), ("full", "H200")])
def test_limits_are_the_edge_of_fitting(method, gpu):
    cap = get_gpu(gpu).memory_bytes
    case = Case(LLAMA, METHODS[method], 16 if method != "full" else None, "all-linear",
                TrainingSetup(batch_size=2, seq_len=1024, grad_checkpointing=True))
    lim = limits(case, cap)

    def at(**change):
        from dataclasses import replace
        return replace(case, setup=replace(case.setup, **change))

    assert lim.max_seq_len is not None
    assert fits(at(seq_len=lim.max_seq_len), cap) and not fits(at(seq_len=lim.max_seq_len + 1), cap)
    if lim.max_batch_size is not None:
        assert fits(at(batch_size=lim.max_batch_size), cap) and not fits(at(batch_size=lim.max_batch_size + 1), cap)
    if method != "full" and lim.max_rank is not None:
        from dataclasses import replace
        assert fits(replace(case, rank=lim.max_rank), cap)
        assert lim.max_rank == 4096 or not fits(replace(case, rank=lim.max_rank + 1), cap)


def test_fixes_are_cheapest_first_and_all_fit():
    cap = get_gpu("A100-80GB").memory_bytes
    case = Case(LLAMA, METHODS["lora"], 16, "all-linear", TrainingSetup(batch_size=4, seq_len=4096))
    found = fixes(case, cap)
    assert found[0].changes == (("grad_checkpointing", True),)  # same result, no other change needed
    assert all(f.spare_bytes >= 0 and fits(f.case, cap) for f in found)
    kinds = [f.kinds[-1] for f in found]
    assert kinds.index("batch") > kinds.index("checkpointing")


def test_savers_apply_where_they_help():
    # LoRA on a bf16 base with AdamW on a GPU: checkpointing, Liger's fused loss, 8-bit AdamW, offloaded checkpoints
    # and an nf4 base, each extending every combination before it (2^5 = 32, the first as given), less the 8 that
    # add offloaded checkpoints to checkpointing: the same setup as without checkpointing's, which is kept
    case = Case(LLAMA, METHODS["lora"], 8, None, TrainingSetup())
    combos = [c.kinds for c in savers(case)]
    singles = ["checkpointing", "fused loss", "8-bit AdamW", "offloaded checkpoints", "nf4 base (QLoRA)"]
    assert len(combos) == 24 and combos[:5] == [(), ("checkpointing",), ("fused loss",),
                                                ("checkpointing", "fused loss"), ("8-bit AdamW",)]
    assert combos[-1] == tuple(s for s in singles if s != "checkpointing")
    assert not any("checkpointing" in c and "offloaded checkpoints" in c for c in combos)
    # full fine-tuning with checkpointing on: no nf4 (it writes W), checkpointing already on
    full = Case(LLAMA, METHODS["full"], None, None, TrainingSetup(grad_checkpointing=True))
    pairs = [(), ("fused loss",), ("8-bit AdamW",), ("fused loss", "8-bit AdamW")]
    assert [c.kinds for c in savers(full)] == pairs + [p + ("offloaded checkpoints",) for p in pairs]
    # autocast runs over fp32 weights: an nf4 base is no saver there (the setup would be refused)
    auto = Case(LLAMA, METHODS["lora"], 8, None, TrainingSetup(dtype="fp32", autocast="bf16",
                                                                 grad_checkpointing=True, optimizer="adamw-8bit"))
    assert [c.kinds for c in savers(auto)] == [(), ("fused loss",), ("offloaded checkpoints",),
                                               ("fused loss", "offloaded checkpoints")]
    # on a CPU, lorabench's chunked loss stands in for Liger's (Triton); Gemma 2's soft-capped logits take neither
    cpu = Case(LLAMA, METHODS["lora"], 8, None, TrainingSetup(device="cpu", grad_checkpointing=True, dtype="nf4",
                                                                optimizer="sgd"))
    assert [c.kinds for c in savers(cpu)] == [(), ("chunked loss",), ("offloaded checkpoints",),
                                              ("chunked loss", "offloaded checkpoints")]
    gemma = Case(PRESETS["gemma-2-2b"], METHODS["lora"], 8, None, TrainingSetup(
        device="cpu", grad_checkpointing=True, dtype="nf4", optimizer="sgd"))
    assert [c.kinds for c in savers(gemma)] == [(), ("offloaded checkpoints",)]


def test_fit_autocast_is_answered_for_adapters():
    # the nf4 saver used to be checked as if asked for under autocast: every adapter method exited 2
    res = run("fit", "--gpu", "H100-80GB", "-m", "llama-3-8b", "--method", "lora", "--autocast", "bf16", "-f", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["limits"][0]["fits"] and not any("nf4" in k["change"] for k in data["knobs"])


def test_fixes_keep_the_data_before_cutting_it():
    # Qwen2.5-72B, LoRA r=16 on all linear layers, nf4 base, 4,096 tokens, an RTX 4090: a sequence cut to a
    # useless length is no longer the answer; the verdict keeps the 4,096 tokens
    cap = get_gpu("RTX-4090").memory_bytes
    case = Case(PRESETS["qwen2.5-72b"], METHODS["lora"], 16, "all-linear", TrainingSetup(seq_len=4096, dtype="nf4"))
    found = fixes(case, cap)
    assert found and all(f.case.setup.seq_len == 4096 or 2 * f.case.setup.seq_len >= 4096 for f in found)
    assert all(fits(f.case, cap) for f in found)
    # a batch too big for the GPU becomes smaller micro-batches with accumulation: the same sequences a step
    big = Case(LLAMA, METHODS["lora"], 16, "all-linear", TrainingSetup(batch_size=8, seq_len=4096,
                                                                        grad_checkpointing=True))
    batch = next(f for f in fixes(big, cap) if f.kinds[-1] == "batch")
    s = batch.case.setup
    assert s.batch_size < 8 and s.batch_size * s.grad_accum == 8
    assert batch.changes[-2:] == (("batch_size", s.batch_size), ("grad_accum", s.grad_accum))
    assert flags.args(batch.changes)[-4:] == ["--batch-size", str(s.batch_size), "--grad-accum", str(s.grad_accum)]


def test_without_a_gpu_the_smallest_catalog_gpu_that_fits():
    parts = step_parts(Case(LLAMA, METHODS["lora"], 8, None, TrainingSetup()))
    need = max(parts.phase_peaks().values())
    need = need + parts.overhead_bytes + int(ALLOCATOR_ALLOWANCE * need)
    # a bf16 step: only GPUs with bf16 arithmetic (not the V100s or the T4)
    by_size = sorted((g.memory_bytes, g.name) for g in GPUS.values()
                     if g.memory_bytes >= need and g.name not in ("V100-32GB", "V100-16GB", "T4"))
    assert smallest_gpu(parts, bf16=True) == by_size[0][1] == "A100-40GB"
    assert smallest_gpu(parts) == "V100-32GB"  # fp16 and fp32 run on a V100
    res = run("memory", "--method", "lora")
    peak = max(parts.phase_peaks().values())
    assert res.stdout.splitlines()[0].startswith(f"lora r=8: peak {peak / 2**30:.2f} GiB in backward")
    assert f"fits one {by_size[0][1]}" in " ".join(res.stdout.split())


def test_wide_and_columns():
    narrow = run("memory", "--method", "lora,full", "--gpu", "A100-80GB").stdout
    wide = run("memory", "--method", "lora,full", "--gpu", "A100-80GB", "--wide").stdout
    def header(text):
        return next(line for line in text.splitlines() if line.startswith("method")).split()

    assert "optim" not in header(narrow) and "optim" in header(wide) and "not shown at 80 columns" in narrow
    picked = run("memory", "--method", "lora", "--columns", "method,peak_bytes,spare", "--gpu", "L4").stdout
    header = next(line for line in picked.splitlines() if line.startswith("method"))
    assert header.split() == ["method", "peak", "spare"]
    bad = run("memory", "--columns", "method,nope")
    assert bad.exit_code == 2 and "unknown column 'nope'" in bad.output


def test_headroom_decides_fits():
    args = ("memory", "--method", "lora", "--gpu", "A100-40GB", "-f", "json")
    zero = json.loads(run(*args, "--headroom", "0").stdout)[0]
    assert zero["allowance_bytes"] == 0 and zero["spare_bytes"] == 40 * GIB - zero["device_bytes"]
    assert json.loads(run(*args, "--headroom", "50").stdout)[0]["fits"] is False


def test_fit_command_json_and_table():
    res = run("fit", "-m", "llama-3-8b", "--gpu", "RTX-4090", "--method", "lora,full", "-r", "16", "-t", "all-linear",
              "-s", "4096", "-f", "json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    lora = next(r for r in data["limits"] if r["method"] == "lora")
    case = Case(LLAMA, METHODS["lora"], 16, "all-linear", TrainingSetup(seq_len=4096))
    lim = limits(case, get_gpu("RTX-4090").memory_bytes)
    assert (lora["max_batch_size"], lora["max_seq_len"], lora["max_rank"]) == (None, lim.max_seq_len, None)
    assert lora["spare_bytes"] == spare_bytes(case, get_gpu("RTX-4090").memory_bytes) < 0
    knob = next(k for k in data["knobs"] if k["method"] == "lora" and k["args"] == ["--grad-checkpointing",
                                                                                    "--dtype", "nf4"])
    again = json.loads(run(*QUESTION, *knob["args"], "-f", "json").stdout)[0]
    assert knob["fits"] and again["spare_bytes"] == knob["spare_bytes"]
    text = run("fit", "-m", "llama-3-8b", "--gpu", "RTX-4090", "--method", "all", "-r", "16", "-s", "4096").stdout
    assert all(len(line) <= 80 for line in text.splitlines()), max(text.splitlines(), key=len)
    assert "max batch" in text and "nf4" in text and "8bit" in text and "fused" in text and "all" in text


def test_fit_needs_one_gpu_and_a_gpu_memory_size_works():
    assert run("fit").exit_code == 2
    assert run("fit", "--gpu", "L4", "--gpu-memory", "24").exit_code == 2
    data = json.loads(run("fit", "--gpu-memory", "23.99", "--method", "lora", "-f", "json").stdout)
    assert data["limits"][0]["gpu_memory_bytes"] == int(23.99 * GIB)


def test_models_repeat_and_dropped_methods_are_named():
    res = run("params", "-m", "llama-3-8b", "-m", "mistral-7b", "--method", "lora", "-f", "json")
    assert [r["model"] for r in json.loads(res.stdout)] == ["llama-3-8b", "mistral-7b"]
    res = run("memory", "-m", "llama-3-8b", "-m", "mistral-7b", "--method", "lora")
    assert res.stdout.count("transformers + PEFT layers") == 2
    res = run("memory", "--method", "qlora")
    assert res.exit_code == 2 and "--method lora --dtype nf4" in res.output


def test_peft_module_names_are_targets():
    ours = json.loads(run("params", "--method", "lora", "-t", "q,v", "-f", "json").stdout)
    peft = json.loads(run("params", "--method", "lora", "-t", "q_proj,v_proj", "-f", "json").stdout)
    assert ours == peft


def test_every_command_defaults_to_peft_layers():
    from lorabench.cli import bench, memory, report
    for command in (memory, report, bench):
        impl = next(p for p in command.params if p.name == "impl")
        assert impl.default == "peft", command.name


def test_a_method_one_of_several_models_cannot_take_is_left_out_for_that_model():
    res = run("memory", "-m", "mixtral-8x7b", "-m", "llama-3-8b", "--method", "lora,dora", "-t", "all-linear",
              "-f", "json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [(r["model"], r["method"]) for r in rows] == [("mixtral-8x7b", "lora"), ("llama-3-8b", "lora"),
                                                         ("llama-3-8b", "dora")]
    assert "mixtral-8x7b: dora left out" in res.stderr
    alone = run("memory", "-m", "mixtral-8x7b", "--method", "lora,dora", "-t", "all-linear")
    assert alone.exit_code == 2 and "dora cannot adapt" in alone.output
