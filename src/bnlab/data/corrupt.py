"""Deterministic corruptions of test images: the distribution shifts of the ``bn-shift`` study.

In the spirit of MNIST-C / ImageNet-C (Mu & Gilmer 2019; Hendrycks & Dietterich 2019), five shifts at
three severities, applied to images with values in [0, 1] (``scaling = "unit"``), clipped back to
[0, 1]:

==============  =====================================================  =================
corruption      what                                                    severity 1 / 2 / 3
==============  =====================================================  =================
gaussian_noise  x + N(0, σ²) per pixel                                  σ = 0.1 / 0.25 / 0.5
contrast        each image's pixels pulled toward its own mean: μ + c·(x - μ)   c = 0.5 / 0.3 / 0.15
brightness      x + b                                                   b = 0.2 / 0.4 / 0.6
rotation        about the centre by ±θ (sign drawn per image), bilinear, zero fill   θ = 15° / 30° / 45°
translation     by (dy, dx) pixels, |dy| = |dx| = k (signs per image), zero fill     k = 2 / 4 / 6
==============  =====================================================  =================

Deterministic: the same images, corruption, severity and seed give the same result on every machine
(the random draws come from a generator seeded per corruption and severity, on the CPU).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CORRUPTIONS = ("gaussian_noise", "contrast", "brightness", "rotation", "translation")
SEVERITIES = (1, 2, 3)
LEVELS: dict[str, tuple[float, float, float]] = {
    "gaussian_noise": (0.1, 0.25, 0.5),
    "contrast": (0.5, 0.3, 0.15),
    "brightness": (0.2, 0.4, 0.6),
    "rotation": (15.0, 30.0, 45.0),
    "translation": (2.0, 4.0, 6.0),
}


def _generator(kind: str, severity: int, seed: int) -> torch.Generator:
    from bnlab.train.engine import stream_seed

    return torch.Generator().manual_seed(stream_seed(seed, f"corrupt {kind} {severity}"))


def _signs(n: int, gen: torch.Generator, k: int = 1) -> torch.Tensor:
    return torch.randint(0, 2, (n, k), generator=gen).float() * 2 - 1  # (n, k) of ±1


def rotate(x: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Each image of (N, C, H, W) rotated counter-clockwise by its angle about the centre (bilinear, zeros
    outside). With align_corners=False pixel centres map onto pixel centres for multiples of 90°."""
    a = degrees.to(torch.float64) * (math.pi / 180)
    cos, sin = torch.cos(a), torch.sin(a)
    h, w = x.shape[-2:]
    # affine_grid works in normalised coordinates: correct the aspect ratio for non-square images
    theta = torch.stack([torch.stack([cos, -sin * h / w, torch.zeros_like(a)], 1),
                         torch.stack([sin * w / h, cos, torch.zeros_like(a)], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Each image of (N, C, H, W) moved down by dy[i] and right by dx[i] whole pixels, zeros shifted in."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i, (a, b) in enumerate(zip(dy.tolist(), dx.tolist())):
        a, b = int(a), int(b)
        src = x[i, :, max(0, -a):h - max(0, a), max(0, -b):w - max(0, b)]
        out[i, :, max(0, a):max(0, a) + src.shape[-2], max(0, b):max(0, b) + src.shape[-1]] = src
    return out


def corrupt(x: torch.Tensor, kind: str, severity: int, *, seed: int = 0) -> torch.Tensor:
    """``x`` (N, C, H, W), values in [0, 1], with corruption ``kind`` at ``severity`` (1..3); a new tensor."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}: expected one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES} (got {severity!r})")
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected float images of shape (N, C, H, W) (got {x.dim()}D {x.dtype})")
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 1.0)
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"expected images scaled to [0, 1] (scaling 'unit'); got values from {lo:.3g} to {hi:.3g}")
    level, gen, n = LEVELS[kind][severity - 1], _generator(kind, severity, seed), len(x)
    xc = x.detach().cpu()
    if kind == "gaussian_noise":
        out = xc + level * torch.randn(xc.shape, generator=gen, dtype=xc.dtype)
    elif kind == "contrast":
        mean = xc.mean(dim=(1, 2, 3), keepdim=True)
        out = mean + level * (xc - mean)
    elif kind == "brightness":
        out = xc + level
    elif kind == "rotation":
        out = rotate(xc, level * _signs(n, gen)[:, 0])
    else:
        s = _signs(n, gen, 2) * level
        out = translate(xc, s[:, 0], s[:, 1])
    return out.clamp_(0.0, 1.0).to(x.device)


__all__ = ["CORRUPTIONS", "LEVELS", "SEVERITIES", "corrupt", "rotate", "translate"]
