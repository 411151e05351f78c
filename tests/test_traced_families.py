"""The tracing engine (lorabench.measure.traced) across the model types transformers builds and lorabench has no
description of (and Qwen2-MoE, which it has): each small config built by transformers on the meta device and traced, its parameter counts held
to transformers' own build and PEFT's own count, its per-phase peaks held to the same step run on real CPU tensors
(measure.traced.trace_once(real=True): random weights, the live-tensor tracker). docs/coverage.md
(scripts/coverage.py) lists every model type of transformers' mappings; this file holds the engine to the real
libraries on 41 of them.

The default run steps LoRA (bf16, batch 2 x 32) on every type, and under activation checkpointing on one type of
each structure (CHECKPOINTED_DEFAULT); LORABENCH_FULL_GRID=1 checkpoints every type and adds full fine-tuning, DoRA
and IA3 (read from an adapter_config.json, as --peft-config reads it).
"""

import functools
import json
import os
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lorabench.errors import LorabenchError  # noqa: E402
from lorabench.estimator.setup import PHASES, TrainingSetup  # noqa: E402
from lorabench.estimator.tuner import file_tuner, method_tuner  # noqa: E402
from lorabench.measure.hfbuild import expected_library_warnings  # noqa: E402
from lorabench.measure.traced import count_model, Model, trace_model, trace_once  # noqa: E402
from lorabench.methods import METHODS  # noqa: E402
from lorabench.models.raw import RawModel, canonical  # noqa: E402

FULL_GRID = os.environ.get("LORABENCH_FULL_GRID") == "1"
SETUP = TrainingSetup(batch_size=2, seq_len=32, device="cpu", impl="peft", dtype="bf16", grad_checkpointing=False)
RANK = 8
TOLERANCE = 0.01  # of the real step's peak, per phase

# The small shape every config starts from: 2 decoder layers (traced whole: MAX_WHOLE is 4), so each test steps
# the model once on fake tensors and once on real ones in well under a second.
SMALL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
             num_hidden_layers=2)
SLIDING = dict(sliding_window=16, layer_types=["sliding_attention", "full_attention"])  # both kinds, one layer each
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)
MLA = dict(kv_lora_rank=64, q_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
           num_key_value_heads=4)  # multi-head latent attention: as many key-value heads as heads
QV = "q_proj,v_proj"

# model_type -> (its small config, the attention projections as PEFT names them)
CONFIGS = {
    "apertus": (SMALL, QV),
    "bitnet": (SMALL, QV),
    "cohere": (SMALL, QV),
    "cohere2": (dict(SMALL, head_dim=64, **SLIDING), QV),
    "deepseek_v2": (dict(SMALL, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                         n_shared_experts=1, first_k_dense_replace=1, **MLA), "q_b_proj,kv_b_proj"),
    "deepseek_v3": (dict(SMALL, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                         n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, **MLA),
                    "q_b_proj,kv_b_proj"),
    "ernie4_5": (dict(SMALL, head_dim=64), QV),
    "exaone4": (dict(SMALL, **SLIDING), QV),
    "falcon": (dict(hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, vocab_size=1024, num_hidden_layers=2),
               "query_key_value"),
    "falcon_h1": (dict(SMALL, head_dim=64, mamba_d_ssm=512, mamba_n_heads=8, mamba_d_head=64, mamba_d_state=16,
                       mamba_chunk_size=16), QV),
    "gemma": (dict(SMALL, head_dim=64), QV),
    "gemma3n_text": (dict(SMALL, head_dim=64, intermediate_size=[512, 512], num_kv_shared_layers=0,
                          vocab_size_per_layer_input=1024, hidden_size_per_layer_input=64, laurel_rank=16,
                          activation_sparsity_pattern=[0.95, 0.0], **SLIDING), QV),
    "gemma4_text": (dict(SMALL, head_dim=64, vocab_size_per_layer_input=1024, hidden_size_per_layer_input=64,
                         per_layer_config={"1": {"head_dim": 128}}, **SLIDING), QV),
    "glm4": (dict(SMALL, pad_token_id=0), QV),  # the class's pad_token_id lies past a small vocabulary
    "glm4_moe": (dict(SMALL, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, n_shared_experts=1,
                      first_k_dense_replace=1, n_group=1, topk_group=1), QV),
    "gpt_neox": (dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, vocab_size=1024,
                      num_hidden_layers=2), "query_key_value"),
    "gpt_oss": (dict(SMALL, head_dim=64, **EXPERTS, **SLIDING), QV),
    "granite": (SMALL, QV),
    "granitemoe": (dict(SMALL, **EXPERTS), QV),
    "granitemoehybrid": (dict(SMALL, shared_intermediate_size=512, layer_types=["mamba", "attention"],
                              mamba_n_heads=8, mamba_d_head=64, mamba_d_state=16, mamba_chunk_size=16, **EXPERTS),
                         QV),
    "helium": (dict(SMALL, head_dim=64), QV),
    "hunyuan_v1_dense": (dict(SMALL, head_dim=64), QV),
    "hunyuan_v1_moe": (dict(SMALL, head_dim=64, num_experts=4, moe_topk=2), QV),
    "jamba": (dict(SMALL, num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                   expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16, mamba_dt_rank=16,
                   use_mamba_kernels=False), QV),
    "lfm2": (dict(SMALL, layer_types=["conv", "full_attention"], full_attn_idxs=[1]), QV),
    "llama4_text": (dict(SMALL, head_dim=64, intermediate_size_mlp=512, attention_chunk_size=16, **EXPERTS), QV),
    "mamba": (dict(hidden_size=256, state_size=16, num_hidden_layers=2, vocab_size=1024, time_step_rank=16,
                   use_associative_scan=False),
              "in_proj,x_proj"),
    "minicpm3": (dict(SMALL, **MLA), "q_b_proj,kv_b_proj"),
    "minimax": (dict(SMALL, head_dim=64, block_size=16, layer_types=["linear_attention", "full_attention"],
                     **EXPERTS), QV),
    "nemotron": (dict(SMALL, head_dim=64), QV),
    "olmo": (SMALL, QV),
    "olmo3": (dict(SMALL, **SLIDING), QV),
    "olmoe": (dict(SMALL, num_experts=4, num_experts_per_tok=2), QV),
    "phi": (SMALL, QV),
    "phimoe": (dict(SMALL, **EXPERTS), QV),
    "qwen2_moe": (dict(SMALL, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                       shared_expert_intermediate_size=256), QV),
    "qwen3_next": (dict(SMALL, head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                        linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256,
                        shared_expert_intermediate_size=256, layer_types=["linear_attention", "full_attention"]),
                   QV),
    "seed_oss": (dict(SMALL, head_dim=64), QV),
    "smollm3": (dict(SMALL, no_rope_layer_interval=2, pad_token_id=0), QV),
    "stablelm": (SMALL, QV),
    "starcoder2": (SMALL, QV),
}
# The step's LoRA targets where PEFT's all-linear cannot step the model (see REFUSED): the attention and MLP
# projections by name.
STEP_TARGETS = {
    "falcon_h1": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "llama4_text": "q_proj,k_proj,v_proj,o_proj",
    "mamba": "in_proj,x_proj,dt_proj",
    "phimoe": "q_proj,k_proj,v_proj,o_proj",
}
# PEFT cannot put DoRA on fused experts (all-linear reaches them through lora.ParamWrapper, which refuses
# use_dora): DoRA goes on these types' attention projections.
FUSED_EXPERTS = {"deepseek_v2", "deepseek_v3", "glm4_moe", "hunyuan_v1_moe", "minimax", "olmoe", "qwen3_next"}
# What the engine does not trace yet, and why: held as strict xfails (each raising what it raises today), so a
# library or engine change that makes one traceable says so here. name -> (model_type, config (None: CONFIGS'),
# method, targets, the exception, why). DBRX, which runs each expert on the tokens routed to it, is traced with its
# routing given (tests/test_traced.py).
MAMBA_PEFT = "PEFT refuses LoRA on a Mamba mixer's out_proj and conv1d"
ROUTER_PEFT = "PEFT's all-linear wraps {}, an nn.Linear whose forward returns a tuple, and PEFT's forward fails"
REFUSED = {
    "jetmoe": ("jetmoe", dict(SMALL, kv_channels=64, **EXPERTS), "lora", "all-linear", LorabenchError,
               "JetMoE's router reads the experts' loads with .tolist() (aten._local_scalar_dense)"),
    "llama4_text all-linear": ("llama4_text", None, "lora", "all-linear", LorabenchError,
                               ROUTER_PEFT.format("Llama4Router")),
    "phimoe all-linear": ("phimoe", None, "lora", "all-linear", LorabenchError, ROUTER_PEFT.format("PhimoeRouter")),
    "falcon_h1 all-linear": ("falcon_h1", None, "lora", "all-linear", LorabenchError, MAMBA_PEFT),
    "mamba all-linear": ("mamba", None, "lora", "all-linear", LorabenchError, MAMBA_PEFT),
    "olmoe dora all-linear": ("olmoe", None, "dora", "all-linear", LorabenchError,
                              "PEFT's lora.ParamWrapper (LoRA on fused experts) does not take use_dora"),
}
# The types whose traced peaks equal the real step's to the byte, held to that; any other is held to TOLERANCE.
# All 41 are byte-exact in every phase (transformers 5.25, PEFT 0.21.2, torch 2.13 CPU): LoRA on all-linear and
# on the attention projections, and in the full grid full fine-tuning, DoRA and IA3, each with and without
# activation checkpointing (328 steps).
EXACT = set(CONFIGS)
# Types whose real CPU step is slow: Mamba's mixer without its CUDA kernels scans the 32 tokens one by one
# (about 8 s a step on 2 cores), so its real-step comparison runs in the full grid only.
SLOW_REAL = {"mamba"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Steps of models this small run faster on one intra-op thread: a second thread costs more than it saves,
    and waits on the first where another process holds a core (4x slower on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def raw(model_type: str) -> RawModel:
    cfg, _ = CONFIGS[model_type]
    return RawModel(model_type, canonical(dict(cfg, model_type=model_type)))


def setup_for(gc: bool) -> TrainingSetup:
    return replace(SETUP, grad_checkpointing=gc)


def lora(model_type: str, targets: str, setup: TrainingSetup):
    return method_tuner(METHODS["lora"], RANK, model_type, targets, setup)


@functools.lru_cache(maxsize=None)
def traced(model_type: str, method: str, targets, gc: bool):
    """trace_model's answer, kept: the count tests and the peak tests share each trace."""
    setup = setup_for(gc)
    tuner = method_tuner(METHODS[method], RANK if METHODS[method].uses_rank else None, model_type, targets, setup)
    with expected_library_warnings():
        return trace_model(raw(model_type), tuner, setup)


def meta_model(model_type: str):
    """transformers' own build of the config, on the meta device."""
    config = transformers.AutoConfig.for_model(**raw(model_type).config)
    with torch.device("meta"), expected_library_warnings():
        return transformers.AutoModelForCausalLM.from_config(config)


def step_targets(model_type: str) -> str:
    return STEP_TARGETS.get(model_type, "all-linear")


def peft_targets(targets: str):
    return targets if targets == "all-linear" else targets.split(",")


def assert_peaks(traced_step, real_step, exact: bool):
    for phase in PHASES:
        key = f"measured_{phase}_peak_bytes"
        got, want = traced_step[key], real_step[key]
        assert (got == want) if exact else abs(got - want) <= TOLERANCE * want, (phase, got, want)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_total_params_are_transformers_own(model_type):
    # full fine-tuning: every parameter of the built model, tied ones once
    model = meta_model(model_type)
    want = sum(p.numel() for p in model.parameters())
    got = traced(model_type, "full", None, False)
    assert got["total_params"] == got["trainable_params"] == want


def lora_targets(model_type: str, gc: bool) -> str:
    """The LoRA targets of each default-suite step: all-linear (or the step's named targets) without
    checkpointing, the attention projections with it; the count tests share those two traces."""
    return CONFIGS[model_type][1] if gc else step_targets(model_type)


@pytest.mark.parametrize("model_type, gc", [(t, gc) for t in sorted(CONFIGS) for gc in (False, True)])
def test_lora_trainable_params_are_pefts_own(model_type, gc):
    # LoRA r=8 on all-linear (or the step's named targets) and on the attention projections alone; the engine's
    # counts (measure.traced.count_model: its build at full depth, no step) against PEFT's on transformers' build
    targets = lora_targets(model_type, gc)
    with expected_library_warnings():
        model = peft.get_peft_model(meta_model(model_type), peft.LoraConfig(r=RANK, target_modules=peft_targets(
            targets)))
    want, total = model.get_nb_trainable_parameters()
    setup = setup_for(gc)
    with expected_library_warnings():
        got = count_model(raw(model_type), lora(model_type, targets, setup), setup)
    assert (got["trainable_params"], got["total_params"]) == (want, total)


# The checkpointed real steps of the default run: one type of each structure (hybrid attention and recurrence,
# linear attention, experts, latent attention, sliding windows, Mamba-style mixers); every type in the full grid
CHECKPOINTED_DEFAULT = {"deepseek_v3", "falcon_h1", "gpt_oss", "granitemoehybrid", "lfm2", "olmoe", "qwen3_next",
                        "cohere2"}


def _grid(model_type, *rest):
    """A parameter set, in the full grid only where the real step is slow (or, checkpointed, not one of the
    default run's)."""
    slow = model_type in SLOW_REAL or (rest and rest[0] is True and model_type not in CHECKPOINTED_DEFAULT)
    return pytest.param(model_type, *rest, marks=[pytest.mark.slow, pytest.mark.skipif(
        not FULL_GRID, reason="a slow real step: LORABENCH_FULL_GRID=1")] if slow else [])


@pytest.mark.parametrize("model_type, gc", [_grid(t, gc) for t in sorted(CONFIGS) for gc in (False, True)])
def test_traced_lora_peaks_are_the_real_cpu_steps(model_type, gc):
    setup, targets = setup_for(gc), lora_targets(model_type, gc)
    got = traced(model_type, "lora", targets, gc)
    with expected_library_warnings():
        real = trace_once(Model(raw(model_type), setup, "cpu"), None, lora(model_type, targets, setup), setup,
                          real=True)
    assert_peaks(got, real, model_type in EXACT)


def grid_tuner(model_type: str, method: str, setup: TrainingSetup):
    """Full fine-tuning, or DoRA r=8 where LoRA steps (its attention projections on fused experts)."""
    if method == "full":
        return method_tuner(METHODS["full"], None, model_type, None, setup)
    targets = CONFIGS[model_type][1] if model_type in FUSED_EXPERTS else step_targets(model_type)
    return method_tuner(METHODS[method], RANK, model_type, targets, setup)


def _ia3_file(tmp_path, model_type: str) -> str:
    # IA3 on the attention projections (no feed-forward module), as PEFT saves its adapter_config.json
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "IA3", "task_type": "CAUSAL_LM", "feedforward_modules": [],
                                "target_modules": CONFIGS[model_type][1].split(",")}))
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not FULL_GRID, reason="the full grid: LORABENCH_FULL_GRID=1")
@pytest.mark.parametrize("model_type, method, gc", [(t, m, gc) for t in sorted(CONFIGS)
                                                    for m in ("full", "dora", "ia3") for gc in (False, True)])
def test_traced_peaks_are_the_real_cpu_steps_for_every_method(model_type, method, gc, tmp_path):
    setup = setup_for(gc)
    tuner = file_tuner(_ia3_file(tmp_path, model_type)) if method == "ia3" else grid_tuner(model_type, method, setup)
    with expected_library_warnings():
        got = trace_model(raw(model_type), tuner, setup)
        real = trace_once(Model(raw(model_type), setup, "cpu"), None, tuner, setup, real=True)
    assert_peaks(got, real, model_type in EXACT)


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.xfail(raises=exc, strict=True, reason=why))
                                  for name, (*_, exc, why) in REFUSED.items()])
def test_what_is_not_traced_yet(name):
    model_type, cfg, method, targets, _, _ = REFUSED[name]
    model = raw(model_type) if cfg is None else RawModel(model_type, canonical(dict(cfg, model_type=model_type)))
    with expected_library_warnings():
        trace_model(model, method_tuner(METHODS[method], RANK, model_type, targets, SETUP), SETUP)


def test_a_step_that_reads_its_data_is_refused_in_one_line():
    # fake tensors hold no values: an op whose output depends on them is the engine's refusal, not a crash
    model_type, cfg, _, targets, _, _ = REFUSED["jetmoe"]
    with pytest.raises(LorabenchError, match=r"^jetmoe cannot be traced: .*aten\._local_scalar_dense[^\n]*$"):
        trace_model(RawModel(model_type, canonical(dict(cfg, model_type=model_type))),
                    lora(model_type, targets, SETUP), SETUP)
