"""A vision-language step traced with its images (lorabench.measure.images): per family, the traced step against the
real CPU step with the same inputs, to the byte in every phase; the image tokens against each processor's rule
written out here (and against the image processor's own output where one builds without the Hub); the CLI's and
the API's options and refusals."""

import json
import os
from dataclasses import replace

import pytest
from click.testing import CliRunner

import lorabench
from lorabench.cli import cli
from lorabench.errors import LorabenchError
from lorabench.estimator.images import ImageInputs, image_inputs
from lorabench.estimator.setup import PHASES, TrainingSetup
from lorabench.estimator.tuner import method_tuner
from lorabench.measure import tracecache
from lorabench.measure.traced import Model, trace_model, trace_once
from lorabench.methods import METHODS
from lorabench.models.raw import RawModel, canonical

TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
            num_hidden_layers=2)
TOWER = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4)
QWEN_IDS = dict(image_token_id=1000, vision_start_token_id=1001, vision_end_token_id=1002, video_token_id=1003)
SETUP = TrainingSetup(batch_size=2, seq_len=64, device="cpu", impl="peft")
INTS = ("measured_weights_bytes", "measured_adapter_bytes", "measured_gradients_bytes", "measured_optimizer_bytes",
        "measured_activations_bytes", "trainable_params", "total_params", "flops") + tuple(
            f"measured_{p}_peak_bytes" for p in PHASES)

# model_type: (config, --image-size or None, image tokens per image by the processor's rule, by hand)
FAMILIES = {
    # CLIP 64 / 16 = 4 x 4 patches + CLS; "default" drops the CLS token: 16
    "llava": (dict(model_type="llava", text_config=dict(model_type="llama", **TEXT), image_token_index=1000,
                   vision_config=dict(model_type="clip_vision_model", image_size=64, patch_size=16,
                                      num_hidden_layers=2, **TOWER)), None, 16),
    # smart_resize(56, 56, factor 14 x 2) = 56 x 56: a 4 x 4 grid, merged 2 x 2: 4
    "qwen2_5_vl": (dict(model_type="qwen2_5_vl", **QWEN_IDS,
                        text_config=dict(model_type="qwen2_5_vl_text",
                                         rope_scaling=dict(type="mrope", mrope_section=[4, 6, 6]), **TEXT),
                        vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                           out_hidden_size=128, patch_size=14, spatial_merge_size=2,
                                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])),
                   (56, 56), 4),
    # smart_resize(70, 50, factor 16 x 2): round(70 / 32) x 32 = 64, round(50 / 32) x 32 = 64; 4 x 4 / 2^2 = 4
    "qwen3_vl": (dict(model_type="qwen3_vl", **QWEN_IDS,
                      text_config=dict(model_type="qwen3_vl_text", head_dim=32, **TEXT, rope_scaling=dict(
                          rope_type="default", mrope_section=[4, 6, 6], mrope_interleaved=True)),
                      vision_config=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4,
                                         out_hidden_size=128, patch_size=16, spatial_merge_size=2,
                                         temporal_patch_size=2, num_position_embeddings=16,
                                         deepstack_visual_indexes=[0])), (70, 50), 4),
    # mm_tokens_per_image: SigLIP's 4 x 4 patches average-pooled to 2 x 2
    "gemma3": (dict(model_type="gemma3", mm_tokens_per_image=4, image_token_index=1000, boi_token_index=1001,
                    eoi_token_index=1002, text_config=dict(model_type="gemma3_text", head_dim=32, sliding_window=16,
                                                           **TEXT),
                    vision_config=dict(model_type="siglip_vision_model", image_size=64, patch_size=16,
                                       num_hidden_layers=1, **TOWER)), None, 4),
    # a tile of 56 / 14 = 4 x 4 patches; pixel shuffle 0.5: 16 // round(1 / 0.25) = 4
    "llama4": (dict(model_type="llama4", image_token_index=1000, boi_token_index=1001, eoi_token_index=1002,
                    text_config=dict(model_type="llama4_text", head_dim=32, intermediate_size_mlp=256,
                                     num_local_experts=2, num_experts_per_tok=1, attention_chunk_size=32, **TEXT),
                    vision_config=dict(model_type="llama4_vision_model", image_size=56, patch_size=14,
                                       hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                       num_hidden_layers=1, vision_output_dim=128, projector_input_dim=128,
                                       projector_output_dim=128)), (56, 56), 4),
    # (64 / 16)^2 / scale_factor^2 = 16 / 4 = 4
    "idefics3": (dict(model_type="idefics3", scale_factor=2, image_token_id=1000,
                      text_config=dict(model_type="llama", **TEXT),
                      vision_config=dict(image_size=64, patch_size=16, num_hidden_layers=1, **TOWER)), None, 4),
    "smolvlm": (dict(model_type="smolvlm", scale_factor=2, image_token_id=1000,
                     text_config=dict(model_type="llama", **TEXT),
                     vision_config=dict(image_size=64, patch_size=16, num_hidden_layers=1, **TOWER)), None, 4),
}
FULL = bool(os.environ.get("LORABENCH_FULL_GRID"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Real steps of models this small run faster on one intra-op thread (tests/test_traced_families.py)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORABENCH_CACHE_DIR", str(tmp_path / "traces"))


def family(model_type):
    config, size, tokens = FAMILIES[model_type]
    return RawModel(model_type, canonical(config)), ImageInputs(2, *(size or (None, None))), tokens


def held_to_the_real_step(model_type, setup, within=0):
    model, images, tokens = family(model_type)
    tuner = method_tuner(METHODS["lora"], 8, model_type, "q_proj,v_proj", setup)
    traced = trace_model(model, tuner, setup, images=images)
    real = trace_once(Model(model, setup, "cpu", images), None, tuner, setup, real=True)
    for k in INTS:
        assert abs(traced[k] - real[k]) <= within, (k, traced[k], real[k])
    # transformers' own check (image tokens in input_ids == image features) ran on the real step with these ids
    assert traced["image_tokens"] == 2 * tokens and traced["images"] == 2
    assert "traced with 2 image(s) per sequence" in " ".join(traced["notes"])
    return traced


@pytest.mark.parametrize("model_type", [t for t in FAMILIES if FULL or t != "smolvlm"])  # SmolVLM: Idefics3's code
def test_the_traced_step_with_images_is_the_real_step_to_the_byte(model_type):
    held_to_the_real_step(model_type, SETUP)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "gemma3", "idefics3"] + (
    ["llava", "qwen3_vl", "llama4", "smolvlm"] if FULL else []))
def test_checkpointed_plain_loop_with_images_is_the_real_step(model_type):
    # Qwen2.5-VL here: the real step holds 48 bytes more in its forward (small int64 index tensors around its
    # M-RoPE index, which the trace runs on the held values: get_rope_index); not tracked down further
    held_to_the_real_step(model_type, replace(SETUP, grad_checkpointing=True, loop="plain"),
                          within=64 if model_type == "qwen2_5_vl" else 0)


def test_the_images_add_the_towers_activations_and_the_depth_sum_holds():
    # 6 text layers traced from cuts of 2 and 3 (the tower whole in each): the whole 6-layer trace's bytes
    config, _, _ = FAMILIES["llava"]
    deep = dict(config, text_config=dict(config["text_config"], num_hidden_layers=6))
    model, images = RawModel("llava", canonical(deep)), ImageInputs(1)
    tuner = method_tuner(METHODS["lora"], 8, "llava", "q_proj,v_proj", SETUP)
    summed = trace_model(model, tuner, SETUP, images=images)
    whole = trace_once(Model(model, SETUP, images=images), None, tuner, SETUP)
    assert max(summed["layers_traced"]) < 6
    assert {k: summed[k] for k in INTS} == {k: whole[k] for k in INTS}
    text = trace_model(model, tuner, SETUP)
    assert summed["measured_activations_bytes"] > text["measured_activations_bytes"]
    assert summed["flops"] > text["flops"]


def test_qwen_image_tokens_are_the_image_processors():
    # Qwen2VLImageProcessor (its PIL backend: no torchvision) resizes and patches the image; its grid's
    # t x h x w / merge^2 is the count the trace puts into input_ids
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    for model_type, (h, w) in (("qwen3_vl", (70, 50)), ("qwen2_5_vl", (56, 56)), ("qwen2_5_vl", (300, 200))):
        config, _, _ = FAMILIES[model_type]
        v = config["vision_config"]
        processor = Qwen2VLImageProcessorPil(patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                             temporal_patch_size=v["temporal_patch_size"])
        grid = processor(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0].tolist()
        model = RawModel(model_type, canonical(config))
        plan = Model(model, replace(SETUP, seq_len=128), images=ImageInputs(1, h, w)).images
        assert (plan.height, plan.width) == (grid[1] * v["patch_size"], grid[2] * v["patch_size"])
        assert plan.tokens == grid[0] * grid[1] * grid[2] // v["spatial_merge_size"] ** 2
    # 300 x 200 by hand: round(300 / 28) x 28 = 308, round(200 / 28) x 28 = 196; 22 x 14 patches / 4 = 77
    assert plan.tokens == 77 and (plan.height, plan.width) == (308, 196)


def test_idefics3_image_tokens_and_pixels_are_the_image_processors():
    # one tile, no splitting: the processor's pixel_values [1, 1, 3, 64, 64] and mask; (64 / 16)^2 / 2^2 tokens
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 64},
                                          max_image_size={"longest_edge": 64})
    out = processor(images=[[Image.new("RGB", (64, 64))]], return_tensors="pt")
    model, _, tokens = family("idefics3")
    plan = Model(model, SETUP, images=ImageInputs(1)).images
    given = plan.batch(1, 64)
    assert given["pixel_values"].shape == out["pixel_values"].shape
    assert given["pixel_attention_mask"].shape == out["pixel_attention_mask"].shape
    assert plan.tokens == tokens == (64 // 16) ** 2 // 2 ** 2


def test_the_image_tokens_sit_in_the_ids_as_the_processor_puts_them():
    model, _, _ = family("qwen2_5_vl")
    plan = Model(model, SETUP, images=ImageInputs(2, 56, 56)).images
    given = plan.batch(2, 64)
    row = [1001] + [1000] * 4 + [1002]
    assert given["input_ids"][0].tolist() == row * 2 + [0] * 52
    assert given["mm_token_type_ids"][1].tolist() == [int(t == 1000) for t in row * 2] + [0] * 52
    assert given["image_grid_thw"].tolist() == [[1, 4, 4]] * 4  # 2 rows x 2 images
    assert tuple(given["pixel_values"].shape) == (4 * 16, 3 * 2 * 14 * 14)


def test_the_cli_gives_the_image_fields(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(FAMILIES["qwen2_5_vl"][0]))
    args = ["memory", "--config", str(folder), "--method", "lora", "-t", "q_proj,v_proj", "-s", "64"]
    res = CliRunner().invoke(cli, args + ["--images", "2", "--image-size", "56x56", "-f", "json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)[0]
    assert (row["images"], row["image_size"], row["image_tokens"], row["engine"]) == (2, "56x56", 8, "trace")
    text = json.loads(CliRunner().invoke(cli, args + ["-f", "json"]).stdout)[0]
    assert (text["images"], text["image_size"], text["image_tokens"]) == (0, None, 0)
    assert text["peak_bytes"] != row["peak_bytes"]
    assert any("traced on text alone" in n for n in text["notes"])
    api = lorabench.estimate(config=str(folder), method="lora", targets="q_proj,v_proj", seq_len=64, images=2,
                             image_size=(56, 56))[0]
    assert api["peak_bytes"] == row["peak_bytes"] and api["trace_cached"]


@pytest.mark.parametrize("extra, said", [
    (["--images", "2", "--image-size", "56"], "--image-size must be HEIGHTxWIDTH"),
    (["--image-size", "56x56"], "give --images too"),
    (["--images", "-1"], "--images"),
    (["--images", "1"], "keeps each image's own resolution: give --image-size"),
    (["--images", "9", "--image-size", "112x112"], "more than --seq-len 64"),
    (["--images", "1", "--image-size", "56x56", "--gpus", "2", "--sharding", "fsdp"], "sharded step with images"),
])
def test_bad_image_options_are_one_line_and_exit_2(tmp_path, extra, said):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(FAMILIES["qwen2_5_vl"][0]))
    res = CliRunner().invoke(cli, ["memory", "--config", str(folder), "--method", "lora", "-t", "q_proj,v_proj",
                                   "-s", "64"] + extra)
    assert res.exit_code == 2 and said in res.output, res.output
    assert "Traceback" not in res.output


def test_images_on_a_text_model_or_a_fixed_size_tower_are_refused():
    res = CliRunner().invoke(cli, ["memory", "-m", "llama-3-8b", "--method", "lora", "--images", "1"])
    assert res.exit_code == 2 and "llama-3-8b is a text-only model" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(cli, ["memory", "-m", "llama-3-8b", "--images", "1", "--engine", "analytic"])
    assert res.exit_code == 2 and "--images is traced: give --engine auto or --engine trace" in res.output
    with pytest.raises(LorabenchError, match="resizes every image to its tower's 64x64"):
        Model(family("llava")[0], SETUP, images=ImageInputs(1, 32, 32))
    with pytest.raises(LorabenchError, match="images"):
        image_inputs(True, None)


def test_the_cache_keys_the_images():
    model, images, _ = family("llava")
    tuner = method_tuner(METHODS["lora"], 8, "llava", "q_proj,v_proj", SETUP)
    text = tracecache.trace_key(model, tuner, SETUP)
    assert text == tracecache.trace_key(model, tuner, SETUP, images=ImageInputs())
    assert len({text, tracecache.trace_key(model, tuner, SETUP, images=images),
                tracecache.trace_key(model, tuner, SETUP, images=ImageInputs(1))}) == 3


@pytest.mark.skipif(not FULL, reason="the whole grid: LORABENCH_FULL_GRID=1 (a traced fit: 15 s)")
def test_fit_with_images_holds_for_real_steps_either_side(tmp_path):
    # LLaVA, 2 images of 16 tokens in each sequence: the traced largest batch fits a real CPU step with the same
    # images and one more does not; the longest sequence keeps the images' tokens
    from lorabench.estimator.traced_rows import required_bytes

    model, images, tokens = family("llava")
    setup = replace(SETUP, batch_size=1, grad_checkpointing=True)  # two savers left: four combinations
    tuner = method_tuner(METHODS["lora"], 8, "llava", "q_proj,v_proj", setup)
    cpu = Model(model, setup, "cpu", images)

    def need(batch):
        return required_bytes(trace_once(cpu, None, tuner, replace(setup, batch_size=batch), real=True), setup)

    capacity = need(1) + (need(2) - need(1)) * 5 // 2  # 3 fit, 4 do not
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(model.config))
    got = lorabench.fit(config=str(folder), method="lora", rank=8, targets="q_proj,v_proj", images=2,
                        gpu_memory=capacity / 2 ** 30, headroom=0, device="cpu", batch_size=1, seq_len=64,
                        impl="peft", grad_checkpointing=True)
    limits = got["limits"][0]
    assert (limits["images"], limits["image_tokens"]) == (2, 2 * tokens)
    b = limits["max_batch_size"]
    assert need(b) <= int(capacity / 2 ** 30 * 2 ** 30) < need(b + 1)
    assert limits["max_seq_len"] > 2 * tokens
