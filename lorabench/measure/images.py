"""Image inputs for a traced vision-language step: per family, what its processor hands the model for `--images N`
images of H x W pixels in every sequence (pixel values, Qwen's patch grid, Idefics3's pixel mask, the token type
ids), how many image tokens each image puts into the language model's sequence, and how those tokens sit in
input_ids. A family is a row of RECIPES.

The image tokens are part of --seq-len: each row is [markers and image tokens of image 1, ..., of image N, text
tokens], the text tokens 0 as in a text-only trace, the labels the input ids (as the bench's are).

Fake tensors hold no values, and a vision-language step reads its inputs' values: transformers checks that the
image tokens in input_ids match the image features (a mask's sum), Qwen builds its patch windows, attention chunks
and M-RoPE positions from image_grid_thw (tolist, nonzero, repeat_interleave), Idefics3 drops all-zero (padding)
images and leaves out its tower's attention mask when every patch is real (masking_utils reads the mask unless it is
a fake tensor: is_tracing). The rule here (`held`): the inputs and the integer tensors made from nothing
(torch.arange, torch.full...) hold their values, as fake tensors carrying a constant (torch's own
FakeTensor.constant), and whatever is computed from such tensors alone is computed for real and held too; every
tensor that a weight touches stays a fake one. So transformers' checks run, on the real values, and the index
arithmetic is the real step's; masking_utils reads a held mask's values, as it reads a real one's. One function,
Qwen's get_rope_index (torch.tensor over a list of tensors, which fake tensors refuse), is run on the held values
and its outputs held. Nothing here changes what a step allocates: the same ops run, on the same shapes, and the
tracker counts them alike (tests/test_vlm_images.py holds each family to the real step).
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple
from unittest import mock

import torch
import torch.utils._pytree as pytree
from torch._subclasses import fake_tensor
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._mode_utils import no_dispatch
from torch.utils._python_dispatch import TorchDispatchMode

from lorabench.errors import LorabenchError
from lorabench.estimator.images import ImageInputs
from lorabench.spelling import option

# Qwen2VLImageProcessor's defaults (size shortest_edge / longest_edge, in pixels): the bounds smart_resize keeps
# an image's area within
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 56 * 56, 28 * 28 * 1280


def _side(value) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _fixed_size(name: str, tiled: bool = False):
    """The size rule of a tower that sees every image (or tile) at vision_config.image_size: that size, or a
    refusal of another."""
    def size(config, given: Optional[Tuple[int, int]]) -> Tuple[Tuple[int, int], str]:
        side = _side(config.vision_config.image_size)
        if given is not None and given != (side, side):
            what = (f"splits an image into tiles of its tower's {side}x{side} (vision_config.image_size), each "
                    f"an image here: count the tiles in {option('images')}" if tiled else
                    f"resizes every image to its tower's {side}x{side} (vision_config.image_size)")
            raise LorabenchError(f"{name}'s processor {what}; give {option('image_size')} {side}x{side} or leave "
                                 "it out.")
        return (side, side), f"{side}x{side}, the tower's vision_config.image_size, which the processor " + (
            "gives every tile (one image = one tile, as the processor makes it without image splitting)" if tiled
            else "resizes every image to")
    return size


def _qwen_size(config, given: Optional[Tuple[int, int]]) -> Tuple[Tuple[int, int], str]:
    """Qwen2.5-VL / Qwen3-VL keep each image's own resolution, resized by smart_resize to multiples of
    patch x merge within the image processor's default pixel bounds."""
    # the PIL image processor's copy: the torchvision one needs torchvision
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if given is None:
        raise LorabenchError(f"{config.model_type}'s processor keeps each image's own resolution: give "
                             f"{option('image_size')} HxW.")
    v = config.vision_config
    factor = v.patch_size * v.spatial_merge_size
    try:
        h, w = smart_resize(*given, factor=factor, min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    except ValueError as exc:
        raise LorabenchError(f"{option('image_size')} {given[0]}x{given[1]}: {exc}") from None
    return (h, w), (f"{h}x{w} ({given[0]}x{given[1]} as the image processor resizes it: smart_resize to multiples "
                    f"of patch {v.patch_size} x merge {v.spatial_merge_size}, within Qwen2VLImageProcessor's "
                    f"default {QWEN_MIN_PIXELS:,} to {QWEN_MAX_PIXELS:,} pixels)")


def _llava_tokens(config, h: int, w: int) -> int:
    # LlavaProcessor: (H / patch) x (W / patch) patches + the CLS token, which "default" drops
    p = _side(config.vision_config.patch_size)
    return (h // p) * (w // p) + (0 if config.vision_feature_select_strategy == "default" else 1)


def _qwen_tokens(config, h: int, w: int) -> int:
    # Qwen2VLImageProcessor: grid (1, H / patch, W / patch); the merger joins merge x merge patches into a token
    v = config.vision_config
    return (h // v.patch_size) * (w // v.patch_size) // v.spatial_merge_size ** 2


def _gemma3_tokens(config, h: int, w: int) -> int:
    return config.mm_tokens_per_image  # the tower's patches average-pooled to this many


def _llama4_tokens(config, h: int, w: int) -> int:
    # Llama4Processor: (H / patch) x (W / patch) // round(1 / pixel_shuffle_ratio^2) per tile
    v = config.vision_config
    p = _side(v.patch_size)
    return (h // p) * (w // p) // int(round(1.0 / v.pixel_shuffle_ratio ** 2))


def _idefics3_tokens(config, h: int, w: int) -> int:
    # Idefics3Processor: image_seq_len = (image_size / patch)^2 / scale_factor^2 (the connector's pixel shuffle)
    p = _side(config.vision_config.patch_size)
    return int(((h // p) * (w // p)) / config.scale_factor ** 2)


def _channels(config) -> int:
    v = config.vision_config
    return getattr(v, "num_channels", None) or getattr(v, "in_channels", None) or 3


def _images(config, batch: int, n: int, h: int, w: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    # [images of the batch, C, H, W]: every image of every row, as the processor stacks them
    return {"pixel_values": torch.ones((batch * n, _channels(config), h, w), dtype=dtype)}


def _qwen_images(config, batch: int, n: int, h: int, w: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    # the processor's flattened patches: [sum of t*h*w patches, C x temporal_patch x patch x patch], an image's
    # frame repeated temporal_patch times (grid t = 1)
    v = config.vision_config
    gh, gw = h // v.patch_size, w // v.patch_size
    patches = batch * n * gh * gw
    return {"pixel_values": torch.ones((patches, _channels(config) * v.temporal_patch_size * v.patch_size ** 2),
                                       dtype=dtype),
            "image_grid_thw": torch.tensor([[1, gh, gw]] * (batch * n))}


def _idefics3_images(config, batch: int, n: int, h: int, w: int, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    # [batch, images per row, C, H, W] and its pixel mask, every pixel real (no padding images)
    return {"pixel_values": torch.ones((batch, n, _channels(config), h, w), dtype=dtype),
            "pixel_attention_mask": torch.ones((batch, n, h, w), dtype=torch.bool)}


def _rope_index(module: str, cls: str) -> Callable[[], Tuple[type, str]]:
    return lambda: (getattr(importlib.import_module(module), cls), "get_rope_index")


@dataclass(frozen=True)
class Recipe:
    """What a family's processor gives the model for its images."""

    name: str
    size: Callable  # (config, (h, w) or None) -> ((h, w), how the size was found)
    tokens: Callable  # (config, h, w) -> image tokens per image
    pixels: Callable  # (config, batch, images per row, h, w, dtype) -> the image tensors
    markers: Tuple[Optional[str], Optional[str]] = (None, None)  # config keys of the tokens around an image
    token_types: Optional[str] = None  # the input marking image tokens 1, text 0, where the processor makes one
    on_values: Tuple[Callable[[], Tuple[type, str]], ...] = ()  # methods run on the held values


_QWEN25 = "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"
_QWEN3 = "transformers.models.qwen3_vl.modeling_qwen3_vl"
RECIPES: Dict[str, Recipe] = {
    "llava": Recipe("LLaVA", _fixed_size("LLaVA"), _llava_tokens, _images),
    "qwen2_5_vl": Recipe("Qwen2.5-VL", _qwen_size, _qwen_tokens, _qwen_images,
                         ("vision_start_token_id", "vision_end_token_id"), "mm_token_type_ids",
                         (_rope_index(_QWEN25, "Qwen2_5_VLModel"),)),
    "qwen3_vl": Recipe("Qwen3-VL", _qwen_size, _qwen_tokens, _qwen_images,
                       ("vision_start_token_id", "vision_end_token_id"), "mm_token_type_ids",
                       (_rope_index(_QWEN3, "Qwen3VLModel"),)),
    "gemma3": Recipe("Gemma 3", _fixed_size("Gemma 3"), _gemma3_tokens, _images,
                     ("boi_token_index", "eoi_token_index"), "token_type_ids"),
    "llama4": Recipe("Llama 4", _fixed_size("Llama 4", tiled=True), _llama4_tokens, _images,
                     ("boi_token_index", "eoi_token_index")),
    "idefics3": Recipe("Idefics3", _fixed_size("Idefics3", tiled=True), _idefics3_tokens, _idefics3_images),
    "smolvlm": Recipe("SmolVLM", _fixed_size("SmolVLM", tiled=True), _idefics3_tokens, _idefics3_images),
}


def _image_token(config) -> int:
    found = getattr(config, "image_token_id", None)
    return found if found is not None else config.image_token_index


@dataclass(frozen=True)
class ImagePlan:
    """count images of height x width in every row, each `tokens` image tokens (and the markers around it) of
    the seq_len tokens the language model sees."""

    model_type: str
    count: int
    height: int
    width: int
    tokens: int
    row: Tuple[int, ...]  # the token ids of the images' part of a row
    types: Tuple[int, ...]  # 1 at its image tokens
    note: str
    config: object = field(compare=False, repr=False, default=None)  # transformers' config of the model
    dtype: torch.dtype = torch.float32  # the pixel values', the model's

    def batch(self, batch: int, seq_len: int) -> Dict[str, torch.Tensor]:
        """The step's inputs as real CPU tensors: input_ids [batch, seq_len] and the family's image inputs."""
        recipe, config = RECIPES[self.model_type], self.config
        text = [0] * (seq_len - len(self.row))
        out = {"input_ids": torch.tensor([list(self.row) + text] * batch)}
        out.update(recipe.pixels(config, batch, self.count, self.height, self.width, self.dtype))
        if recipe.token_types:
            out[recipe.token_types] = torch.tensor([list(self.types) + text] * batch)
        return out


def plan_images(model, images: ImageInputs, seq_len: int) -> ImagePlan:
    """The image inputs of `images` for transformers' `model`.

    Raises:
        LorabenchError: a text-only model, a family without a recipe, a size its processor does not give, or
            more image tokens than seq_len holds.
    """
    config = model.config
    model_type = config.model_type
    if getattr(config, "vision_config", None) is None:
        raise LorabenchError(f"{option('images')}: {model_type} is a text-only model (its config has no "
                             "vision_config).")
    recipe = RECIPES.get(model_type)
    if recipe is None:
        raise LorabenchError(f"{option('images')}: the image inputs of {model_type} are not traced yet; traced: "
                             f"{', '.join(RECIPES)}.")
    (h, w), how = recipe.size(config, images.size)
    tokens = recipe.tokens(config, h, w)
    begin, end = (getattr(config, k) if k else None for k in recipe.markers)
    one = [t for t in (begin,) if t is not None] + [_image_token(config)] * tokens + [
        t for t in (end,) if t is not None]
    row = one * images.count
    if len(row) > seq_len:
        marked = f" and {len(row) - tokens * images.count} markers" if len(row) > tokens * images.count else ""
        raise LorabenchError(f"{images.count} image(s) of {h}x{w} put {tokens * images.count:,} image tokens"
                             f"{marked} into each sequence, more than {option('seq_len', seq_len)}: the image "
                             "tokens are part of the sequence the language model sees.")
    image_id = _image_token(config)
    note = (f"a vision-language model traced with {images.count} image(s) per sequence at {how}: {tokens:,} image "
            f"tokens each ({recipe.name}'s processor's count), {len(row):,} of the {seq_len:,} tokens with the "
            "markers around each image, the rest text; the pixel values in the model's dtype (as a script moves "
            "the processor's batch: .to(device, dtype)); the vision tower and projector run on them at full depth. "
            "Token ids, image grids and masks hold their values on the fake tensors (measure.images).")
    return ImagePlan(model_type, images.count, h, w, tokens, tuple(row), tuple(int(t == image_id) for t in row),
                     note, config, model.dtype)


class _Valued(TorchDispatchMode):
    """Integer and boolean tensors made from nothing (torch.arange, torch.full, torch.zeros with an integer
    dtype) made real and held as constants of the fake mode, so that what is computed from them alone is too."""

    def __init__(self, mode: FakeTensorMode):
        super().__init__()
        self.mode = mode

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not any(isinstance(a, torch.Tensor) for a in pytree.tree_leaves((args, kwargs))) and any(
                a.name == "device" for a in func._schema.arguments):
            with no_dispatch():
                shape = func(*args, **{**kwargs, "device": torch.device("meta")})
            if isinstance(shape, torch.Tensor) and not (shape.is_floating_point() or shape.is_complex()):
                with no_dispatch():
                    real = func(*args, **kwargs)
                if real.device.type == "cpu":
                    return self.mode.fake_tensor_converter.from_real_tensor(self.mode, real, make_constant=True)
        return func(*args, **kwargs)


def held_tensor(t: torch.Tensor, mode: Optional[FakeTensorMode]) -> torch.Tensor:
    """A copy of the real tensor t made inside the step (the tracker counts it, as it counts the token ids):
    under `mode`, a fake tensor holding t's values."""
    if mode is None:
        return t.clone()
    return mode.fake_tensor_converter.from_real_tensor(mode, t, make_constant=True).clone()


def _on_values(fn: Callable, mode: FakeTensorMode) -> Callable:
    """fn run on the values its fake arguments hold; its tensors given back as held fake tensors (copied inside
    the step, so that the tracker counts them)."""
    def run(*args, **kwargs):
        def value(t: FakeTensor) -> torch.Tensor:
            if t.constant is None:
                raise LorabenchError(f"{fn.__qualname__} reads a tensor whose values the trace does not hold.")
            return t.constant
        args, kwargs = pytree.tree_map_only(FakeTensor, value, (args, kwargs))
        with no_dispatch():
            out = fn(*args, **kwargs)
        return pytree.tree_map_only(torch.Tensor, lambda t: held_tensor(t, mode), out)
    return run


@contextlib.contextmanager
def holding(mode: FakeTensorMode):
    """Fake tensors that hold their values: any size of constant kept, integer tensors made from nothing held,
    and a mask that holds its values read by transformers as on real tensors. Enter it after the fake mode and
    before the tracker."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(fake_tensor, "CONSTANT_NUMEL_LIMIT", sys.maxsize))
        stack.enter_context(_Valued(mode))
        from transformers import masking_utils

        tracing = masking_utils.is_tracing

        def is_tracing(tensor=None) -> bool:  # a mask that holds its values is read, as on real tensors
            held_values = isinstance(tensor, FakeTensor) and tensor.constant is not None
            return tracing(None if held_values else tensor)

        stack.enter_context(mock.patch.object(masking_utils, "is_tracing", is_tracing))
        yield


@contextlib.contextmanager
def held(plan: Optional[ImagePlan], mode: Optional[FakeTensorMode]):
    """The rule of the module docstring while a step with `plan`'s images runs under `mode` (nothing on real
    tensors, nor without images). Enter it after the fake mode and before the tracker."""
    if plan is None or mode is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(holding(mode))
        for where in RECIPES[plan.model_type].on_values:
            cls, name = where()
            stack.enter_context(mock.patch.object(cls, name, _on_values(getattr(cls, name), mode)))
        yield


__all__ = ["RECIPES", "Recipe", "ImagePlan", "plan_images", "holding", "held", "held_tensor"]
