"""`lorabench fit` for traced models (lorabench.measure.tracefit): the search (estimator.fit.largest_within) against
brute force; a traced model's limits held to real CPU steps either side of each one; a described model's traced
limits against the analytic model's; the CLI and the API."""

import json
import os
from dataclasses import replace

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import lorabench
from lorabench.cli import cli
from lorabench.estimator.search import largest_within
from lorabench.estimator.setup import TrainingSetup
from lorabench.estimator.traced_rows import required_bytes
from lorabench.estimator.tuner import method_tuner
from lorabench.measure.traced import Model, trace_once
from lorabench.methods import METHODS
from lorabench.models.raw import RawModel, canonical

SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
GRANITE = dict(model_type="granite", num_hidden_layers=2, **SMALL)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE_DIR", str(tmp_path / "traces"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=60), st.integers(-10, 1500), st.integers(1, 60))
def test_the_search_finds_what_brute_force_finds_for_any_nondecreasing_need(steps, capacity, start):
    need = [sum(steps[:i + 1]) for i in range(len(steps))]  # need(n) = need[n - 1], n in [1, len]
    want = max((n for n in range(1, len(need) + 1) if need[n - 1] <= capacity), default=None)
    assert largest_within(lambda n: need[n - 1], capacity, 1, len(need), start=min(start, len(need))) == want


@pytest.mark.parametrize("a, b, c", [(1000, 37, 0), (5 << 20, 3 << 10, 0), (1 << 30, 1 << 20, 1 << 8), (7, 0, 1)])
def test_a_nearly_affine_need_takes_a_few_calls(a, b, c):
    # an affine need (a batch's) takes 4 calls: the start, one more for a slope, the line's answer, one past it
    # (5 with the check of this test's own capacity);
    # a convex one (eager attention's s^2 scores) a few more
    calls = []

    def need(n):
        calls.append(n)
        return a + b * n + c * n * n

    capacity = need(3000) + b // 2  # 3,000 fits, 3,001 not (a need that does not grow: every n up to the bound)
    got = largest_within(need, capacity, 1, 1 << 24, start=512)
    assert got == (3000 if b or c else 1 << 24)
    assert len(set(calls)) <= (5 if c == 0 else 12)


def _folder(tmp_path, config):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _real_need(model, tuner, setup, allowance):
    """What a real CPU step (the live-tensor tracker on real tensors) needs, as fit counts it."""
    got = trace_once(model, None, tuner, setup, real=True)
    return required_bytes(got, setup) + int(allowance * required_bytes(got, setup, runtime=False))


def test_a_traced_models_limits_hold_for_real_steps_either_side(tmp_path):
    # granite has no description: its limits come from traces alone; real CPU steps at each limit fit and one
    # more does not
    setup = TrainingSetup(batch_size=1, seq_len=64, device="cpu", impl="peft")
    allowance = 0.05
    kw = dict(config=_folder(tmp_path, GRANITE), method="lora", rank=8, targets="all-linear", device="cpu",
              batch_size=1, seq_len=64, headroom=100 * allowance, impl="peft")
    model = Model(RawModel("granite", canonical(GRANITE)), setup, "cpu")
    tuner = method_tuner(METHODS["lora"], 8, "granite", "all-linear", setup)
    capacity_gib = 1.5 * _real_need(model, tuner, setup, allowance) / 2 ** 30
    limits = lorabench.fit(gpu_memory=capacity_gib, **kw)["limits"][0]
    capacity = int(capacity_gib * 2 ** 30)
    assert limits["engine"] == "trace" and limits["fits"]
    b, s, r = limits["max_batch_size"], limits["max_seq_len"], limits["max_rank"]
    assert b > 1 and s > 64 and r is not None
    for varied, at in (({"batch_size": b}, {"batch_size": b + 1}), ({"seq_len": s}, {"seq_len": s + 1})):
        assert _real_need(model, tuner, replace(setup, **varied), allowance) <= capacity
        assert _real_need(model, tuner, replace(setup, **at), allowance) > capacity
    at_rank = lambda n: method_tuner(METHODS["lora"], n, "granite", "all-linear", setup)  # noqa: E731
    if r < 128:  # the narrowest side of a projection granite's LoRA adapts (256 x 128 k and v): the largest searched
        assert _real_need(model, at_rank(r), setup, allowance) <= capacity < _real_need(model, at_rank(r + 1), setup,
                                                                                       allowance)


@pytest.mark.skipif(not os.environ.get("LORABENCH_FULL_GRID"), reason="the whole grid: LORABENCH_FULL_GRID=1 (15 s)")
def test_a_described_models_traced_limits_are_the_analytic_models():
    # tiny-llama, held to real steps elsewhere by the analytic model: the same limits from traces (checkpointed:
    # two savers left, four combinations)
    kw = dict(model="tiny-llama", method="lora", rank=8, targets="all-linear", gpu_memory=3, seq_len=512,
              grad_checkpointing=True)
    traced, analytic = (lorabench.fit(engine=e, **kw) for e in ("trace", "analytic"))
    for t, a in zip(traced["limits"], analytic["limits"]):
        assert (t["engine"], a["engine"]) == ("trace", "analytic")
        assert (t["method"], t["fits"], t["max_batch_size"], t["max_rank"]) == \
            (a["method"], a["fits"], a["max_batch_size"], a["max_rank"])
        assert abs(t["max_seq_len"] - a["max_seq_len"]) <= 0.001 * a["max_seq_len"]
    # the savers, where both have them (the fused loss is not traced: Liger's Triton kernels)
    analytic_knobs = {(k["method"], k["change"]): k for k in analytic["knobs"]}
    shared = [k for k in traced["knobs"] if (k["method"], k["change"]) in analytic_knobs]
    assert len(shared) == len(traced["knobs"]) == 4  # 2 savers (8-bit AdamW, nf4), 4 combinations
    for k in shared:
        a = analytic_knobs[k["method"], k["change"]]
        assert k["fits"] == a["fits"] and abs(k["required_bytes"] - a["required_bytes"]) <= 0.01 * a["required_bytes"]


def test_fit_traces_a_model_without_a_description_from_the_cli(tmp_path):
    folder = _folder(tmp_path, GRANITE)
    args = ["fit", "--config", folder, "--gpu-memory", "1", "--method", "lora", "-t", "all-linear", "-s", "128"]
    res = CliRunner().invoke(cli, args + ["-f", "json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    assert got["limits"][0]["engine"] == "trace" and got["limits"][0]["max_batch_size"] > 1
    assert {k["change"] for k in got["knobs"]} >= {"as given", "checkpointing", "8-bit AdamW", "nf4 base (QLoRA)"}
    table = CliRunner().invoke(cli, args)  # from the cache
    assert table.exit_code == 0 and "model on one 1 GiB GPU" in table.output.splitlines()[0]
    assert "each limit found by traces and checked by them" in table.output
    # the analytic engine refuses it in one line; a PEFT config and --method together are bad input
    for bad in (["--engine", "analytic"], ["--peft-config", folder]):
        res = CliRunner().invoke(cli, args + bad)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


def test_a_peft_config_is_fitted_without_a_rank_search(tmp_path):
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({
        "peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj"],
        "feedforward_modules": ["down_proj"]}))
    got = lorabench.fit(config=_folder(tmp_path, GRANITE), peft_config=str(ia3), gpu_memory=1, seq_len=128)
    limits = got["limits"][0]
    assert limits["method"] == "ia3" and limits["max_rank"] is None and limits["max_batch_size"] > 1
    assert any("no rank is searched" in n for n in limits["notes"])


def test_a_traced_no_gets_the_analytic_models_fix():
    # tiny-llama, 8 x 16,384 tokens on a T4 (CPU kernels: the chunked loss is a saver): both engines fix it with
    # checkpointing, or else the chunked loss, needing within 1.5% of each other (the traced fix from traces)
    kw = dict(model="tiny-llama", method="lora", targets="all-linear", gpu="T4", seq_len=16384, batch_size=8,
              device="cpu")
    traced, analytic = (lorabench.estimate(engine=e, **kw)[0] for e in ("trace", "analytic"))
    assert not traced["fits"] and not analytic["fits"]
    for key in ("fix", "fix_alternative"):
        assert traced[key]["kinds"] == analytic[key]["kinds"] and traced[key]["args"] == analytic[key]["args"]
        assert abs(traced[key]["required_bytes"] - analytic[key]["required_bytes"]) <= 0.015 * traced[key][
            "required_bytes"]
    assert any("a 'no' is fixed by traces" in n for n in traced["notes"])


def test_a_sharded_step_refuses_what_it_cannot_trace_in_one_line(tmp_path):
    folder = _folder(tmp_path, GRANITE)
    for bad in (["--optimizer", "adamw-8bit"], ["--dtype", "nf4"]):
        res = CliRunner().invoke(cli, ["memory", "--config", folder, "--gpus", "2", "--sharding", "fsdp", "-t",
                                       "all-linear", "--method", "lora"] + bad)
        assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output


@pytest.mark.skipif(not os.environ.get("LORABENCH_FULL_GRID"), reason="the whole grid: LORABENCH_FULL_GRID=1")
def test_a_sharded_traced_fit_leaves_out_the_savers_it_cannot_trace(tmp_path):
    # rank 0 of 2 under FSDP: bitsandbytes' 8-bit step and a quantized base are not traced there, so the savers
    # are checkpointing alone, and the notes say why
    folder = _folder(tmp_path, GRANITE)
    got = lorabench.fit(config=folder, method="lora", targets="all-linear", gpus=2, sharding="fsdp", gpu_memory=1,
                        seq_len=128)
    assert [k["change"] for k in got["knobs"]] == ["as given", "checkpointing"]
    limits = got["limits"][0]
    assert limits["sharding"] == "fsdp" and limits["max_batch_size"] > 1
    assert any("rank 0 of 2 under fsdp" in n for n in limits["notes"])
    assert any("8-bit AdamW and an nf4 base are not among the savers under fsdp" in n for n in limits["notes"])
