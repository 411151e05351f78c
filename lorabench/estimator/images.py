"""The image inputs of a traced vision-language step (`--images N --image-size HxW`): how many images each sequence
carries and at what size. Kept apart from TrainingSetup, which the analytic engine reads: a text-only step has
no images, and its answers do not change. Pure Python; the tracing engine turns these into the family's inputs
(lorabench.measure.images).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple

from lorabench.errors import LorabenchError
from lorabench.spelling import option

MAX_IMAGES = 1024  # per sequence
MAX_IMAGE_SIDE = 1 << 16  # pixels
_SIZE_RE = re.compile(r"\s*([0-9]+)\s*[xX]\s*([0-9]+)\s*")


def parse_image_size(text: str) -> Tuple[int, int]:
    """(height, width) from 'HxW' (e.g. 448x448).

    Raises:
        LorabenchError: not two positive integers joined by 'x', or a side past MAX_IMAGE_SIDE.
    """
    match = _SIZE_RE.fullmatch(str(text))
    if not match or len(match.group(1)) > 6 or len(match.group(2)) > 6:
        raise LorabenchError(f"{option('image_size')} must be HEIGHTxWIDTH in pixels (e.g. 448x448), "
                             f"got {str(text)[:24]!r}.")
    h, w = int(match.group(1)), int(match.group(2))
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
        raise LorabenchError(f"{option('image_size')}: each side must be from 1 to {MAX_IMAGE_SIDE:,} pixels, "
                             f"got {h}x{w}.")
    return h, w


@dataclass(frozen=True)
class ImageInputs:
    """count images in every sequence, each height x width pixels (None: the size the family's processor gives
    every image, from the config)."""

    count: int = 0
    height: Optional[int] = None
    width: Optional[int] = None

    @property
    def size(self) -> Optional[Tuple[int, int]]:
        return None if self.height is None else (self.height, self.width)

    def validate(self) -> None:
        """Raises LorabenchError: a count out of range, or a size without images."""
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 0 <= self.count <= MAX_IMAGES:
            raise LorabenchError(f"{option('images')} must be an integer from 0 to {MAX_IMAGES:,}, "
                                 f"got {self.count!r}.")
        if self.size is not None and self.count == 0:
            raise LorabenchError(f"{option('image_size')} sizes the images of {option('images')} N; give "
                                 f"{option('images')} too.")


def image_inputs(images, image_size) -> ImageInputs:
    """ImageInputs from the API's or CLI's values: images (an int, None: 0) and image_size ('HxW', (h, w), or
    None), validated."""
    size = None
    if image_size is not None:
        size = tuple(image_size) if isinstance(image_size, (tuple, list)) else parse_image_size(image_size)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_IMAGE_SIDE
                                     for v in size):
            raise LorabenchError(f"{option('image_size')} must be HEIGHTxWIDTH in pixels, got {image_size!r}.")
    out = ImageInputs(0 if images is None else images, *(size or (None, None)))
    out.validate()
    return out


__all__ = ["MAX_IMAGES", "ImageInputs", "parse_image_size", "image_inputs"]
