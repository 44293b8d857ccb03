"""Batched image augmentation with torch ops (no per-sample Python).

``RandomAffine`` follows Keras's ``ImageDataGenerator(shear_range, zoom_range, horizontal_flip)``
as seed 002 uses it, including Keras's units: ``shear_range`` is an angle in DEGREES (so seed
002's 0.2 is a barely visible 0.2°), ``zoom_range=z`` draws the x and y zoom independently from
[1-z, 1+z], and the border is filled with the nearest pixel (Keras's fill_mode="nearest").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class RandomAffine:
    shear_range: float = 0.0  # degrees, Keras's unit
    zoom_range: float = 0.0
    horizontal_flip: bool = False

    def __post_init__(self):
        if self.shear_range < 0 or not 0 <= self.zoom_range < 1:
            raise ValueError(f"expected shear_range >= 0 and 0 <= zoom_range < 1 "
                             f"(got shear_range={self.shear_range}, zoom_range={self.zoom_range})")

    @property
    def active(self) -> bool:
        return bool(self.shear_range or self.zoom_range or self.horizontal_flip)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: (N, C, H, W) -> augmented copy, same shape and dtype."""
        if x.dim() != 4:
            raise ValueError(f"augmentation expects (N, C, H, W) images (got shape {tuple(x.shape)})")
        if not self.active:
            return x
        n = x.shape[0]
        u = lambda: torch.rand(n, generator=generator, device="cpu").to(x.device, x.dtype)  # noqa: E731
        shear = (u() * 2 - 1) * math.radians(self.shear_range)
        zx = 1 + (u() * 2 - 1) * self.zoom_range
        zy = 1 + (u() * 2 - 1) * self.zoom_range
        flip = torch.where(u() < 0.5, -1.0, 1.0).to(x.dtype) if self.horizontal_flip else torch.ones_like(zx)
        # output pixel (x', y') samples input at A @ (x', y'): zoom, shear, then flip of the x axis
        theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
        theta[:, 0, 0] = zx * flip
        theta[:, 0, 1] = -torch.sin(shear) * zy
        theta[:, 1, 1] = torch.cos(shear) * zy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
