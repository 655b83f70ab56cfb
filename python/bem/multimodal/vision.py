"""The vision side: input checks, the image-content digest (the KV key material of visual
blocks), a small patch encoder trained by bem, and LLaVA's ``mlp2x_gelu`` projector (Linear, GELU,
Linear) into the language model's width. One 32×32 image gives 8×8 = 64 visual tokens: exactly one
64-token routing chunk / KV block, placed before the text."""
from __future__ import annotations

import hashlib
import struct

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bem.modules.control import CHUNK_SIZE

IMAGE_CHANNELS = 3
IMAGE_SIZE = 32
PATCH = 4
NUM_VISUAL_TOKENS = (IMAGE_SIZE // PATCH) ** 2
assert NUM_VISUAL_TOKENS == CHUNK_SIZE   # the image is one whole chunk (one KV block)
_DIGEST_PERSON = b"bem.mm.image"


def check_images(images, batch: int | None = None, name: str = "images") -> torch.Tensor:
    """`images` as a (B, 3, 32, 32) floating tensor, or a clear error naming `name`: a torch
    tensor or numpy array of a floating dtype, values finite and in [0, 1]; a single (3, 32, 32)
    image is taken as a batch of one. batch: the number of rows it must have."""
    if isinstance(images, np.ndarray):
        if images.dtype.kind != "f":
            raise TypeError(f"{name}: expected floating pixels in [0, 1], got dtype {images.dtype}")
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name}: expected a (B, 3, 32, 32) float tensor, got "
                        f"{type(images).__name__}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"{name}: expected floating pixels in [0, 1], got dtype {images.dtype} "
                        f"(convert uint8 images with x.float() / 255)")
    if images.dim() == 3:
        images = images.unsqueeze(0)
    want = (IMAGE_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    if images.dim() != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"{name}: expected shape (B, {IMAGE_CHANNELS}, {IMAGE_SIZE}, "
                         f"{IMAGE_SIZE}), got {tuple(images.shape)}")
    if batch is not None and images.shape[0] != batch:
        raise ValueError(f"{name}: expected {batch} images (one per prompt), got "
                         f"{images.shape[0]}")
    if images.numel():
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name}: NaN or infinite pixels")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"{name}: expected pixel values in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return images


def image_digest(image: torch.Tensor) -> bytes:
    """16-byte blake2b digest of one image's content (shape and float32 pixel bytes): equal
    pixels give equal digests in every process; any changed pixel changes it."""
    img = check_images(image, 1, "image")[0]
    data = img.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    h = hashlib.blake2b(digest_size=16, person=_DIGEST_PERSON)
    h.update(struct.pack("<3q", *img.shape))
    h.update(data)
    return h.digest()


class VisionEncoder(nn.Module):
    """Patch encoder: non-overlapping 4×4 patches → width `d_vision` (a strided conv, i.e. a
    linear patch embedding), a learned position per patch, then one residual block of a 3×3
    depthwise conv (neighbouring patches) and a pointwise MLP.
    (B, 3, 32, 32) → (B, 64, d_vision)."""

    def __init__(self, d_vision: int = 32):
        super().__init__()
        if isinstance(d_vision, bool) or not isinstance(d_vision, int) or d_vision < 1:
            raise ValueError(f"VisionEncoder: d_vision: expected a positive int, got {d_vision!r}")
        self.d_vision = d_vision
        self.patch = nn.Conv2d(IMAGE_CHANNELS, d_vision, PATCH, stride=PATCH)
        self.position = nn.Parameter(torch.zeros(1, d_vision, IMAGE_SIZE // PATCH,
                                                 IMAGE_SIZE // PATCH))
        self.mix = nn.Conv2d(d_vision, d_vision, 3, padding=1, groups=d_vision)
        self.norm = nn.GroupNorm(1, d_vision)
        self.point = nn.Conv2d(d_vision, d_vision, 1)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images * 2.0 - 1.0) + self.position
        x = x + self.point(F.gelu(self.norm(self.mix(x))))
        return x.flatten(2).transpose(1, 2)          # (B, 64, d_vision), row-major patches


class Projector(nn.Module):
    """LLaVA's mlp2x_gelu: Linear(d_vision, d_model), GELU, Linear(d_model, d_model)."""

    def __init__(self, d_vision: int, d_model: int):
        super().__init__()
        self.fc1 = nn.Linear(d_vision, d_model)
        self.fc2 = nn.Linear(d_model, d_model)
        # Visual tokens start small (the LM's embedding scale), so the frozen base is not thrown
        # off by a loud prefix before stage 1 has taught the projector anything.
        nn.init.normal_(self.fc2.weight, std=0.02)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionTower(nn.Module):
    """Encoder + projector: (B, 3, 32, 32) pixels in [0, 1] → (B, 64, d_model) visual tokens."""

    def __init__(self, d_model: int, d_vision: int = 32):
        super().__init__()
        self.d_model, self.d_vision = d_model, d_vision
        self.encoder = VisionEncoder(d_vision)
        self.projector = Projector(d_vision, d_model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images)
        p = self.projector.fc1.weight
        return self.projector(self.encoder(images.to(p.device, p.dtype)))

    def flops_per_image(self) -> int:
        """Multiply-add FLOPs (×2) of one image through the encoder and projector."""
        n, dv, d = NUM_VISUAL_TOKENS, self.d_vision, self.d_model
        patch = 2 * n * dv * IMAGE_CHANNELS * PATCH * PATCH
        mix = 2 * n * dv * 9
        point = 2 * n * dv * dv
        proj = 2 * n * (dv * d + d * d)
        return patch + mix + point + proj
