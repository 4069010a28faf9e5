"""Image corruptions for self-generated negatives (SeVa / SMPRO; papers.md §2.3).

All functions act on a preprocessed pixel tensor (C, H, W) or (B, C, H, W) (diffusion noise: any layout),
never modify it, and are
deterministic given a ``torch.Generator`` (random numbers are drawn on the CPU and moved to the tensor's
device, so a seed gives the same corruption on every device).

Families, each with a severity order (higher = more information destroyed):

- ``diffusion``: SeVa's forward-diffusion noise q(x_t|x_0) = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, T = 1000,
  β_t = sigmoid(linspace(−6, 6, 1000))·(5e-3 − 1e-5) + 1e-5, ᾱ_t = Π_{s≤t}(1 − β_s) with 0-based t as in
  SeVa's code (``alphas_prod[t]``); SeVa uses t = 500 and 800, we add 950 as the third level.
- ``patch_shuffle``: a fraction of the image's square patches permuted among themselves (our choice: it
  destroys layout/counting/position cues while keeping colours and local texture).
- ``blur``: separable Gaussian blur with standard deviation σ pixels (our choice: destroys shape detail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from prefrank import _checks

__all__ = [
    "SEVA_STEPS", "seva_betas", "seva_alphas_cumprod", "diffusion_noise", "patch_shuffle", "gaussian_blur",
    "Corruption", "corruption_ladder", "FAMILIES",
]

SEVA_STEPS = (500, 800, 950)
NUM_DIFFUSION_STEPS = 1000


def seva_betas(num_steps=NUM_DIFFUSION_STEPS, beta_start=1e-5, beta_end=5e-3):
    """β_t = sigmoid(linspace(−6, 6, T))·(beta_end − beta_start) + beta_start, float64 (T,)."""
    return torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (beta_end - beta_start) \
        + beta_start


def seva_alphas_cumprod(num_steps=NUM_DIFFUSION_STEPS):
    """ᾱ_t = Π_{s=0..t} (1 − β_s), float64 (T,), strictly decreasing."""
    return torch.cumprod(1 - seva_betas(num_steps), dim=0)


def _pixels(pixels):
    _checks.float_tensor("pixels", pixels)
    if pixels.dim() not in (3, 4):
        raise ValueError(f"pixels must be (C, H, W) or (B, C, H, W), got shape {tuple(pixels.shape)}")
    return pixels


def _randn_like(x, generator):
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def diffusion_noise(pixels, t, *, generator=None):
    """√ᾱ_t·x_0 + √(1−ᾱ_t)·ε with SeVa's schedule; ``t`` an int in [0, 999]. Any tensor layout works
    (e.g. Qwen2-VL's flattened patches), not only (C, H, W) images."""
    _checks.float_tensor("pixels", pixels)
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < NUM_DIFFUSION_STEPS:
        raise ValueError(f"t must be an int in [0, {NUM_DIFFUSION_STEPS - 1}], got {t!r}")
    alpha_bar = float(seva_alphas_cumprod()[t])
    return math.sqrt(alpha_bar) * pixels + math.sqrt(1 - alpha_bar) * _randn_like(pixels, generator)


def patch_shuffle(pixels, fraction, *, patch_size=8, generator=None):
    """Permute ``round(fraction·n)`` randomly chosen patches among themselves (a derangement: every chosen
    patch moves when at least two are chosen). H and W must be multiples of ``patch_size``."""
    _pixels(pixels)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    *lead, c, h, w = pixels.shape
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 \
            or h % patch_size or w % patch_size:
        raise ValueError(f"patch_size must be a positive int dividing H={h} and W={w}, got {patch_size!r}")
    gh, gw = h // patch_size, w // patch_size
    n = gh * gw
    x = pixels.reshape(-1, c, gh, patch_size, gw, patch_size).permute(0, 2, 4, 1, 3, 5).reshape(-1, n, c,
                                                                                                patch_size,
                                                                                                patch_size)
    out = x.clone()
    chosen_count = round(fraction * n)
    for b in range(x.shape[0]):
        if chosen_count < 2:
            break
        chosen = torch.randperm(n, generator=generator)[:chosen_count]
        shift = int(torch.randint(1, chosen_count, (1,), generator=generator))  # cyclic shift ≠ 0: derangement
        out[b, chosen] = x[b, chosen.roll(shift)]
    out = out.reshape(-1, gh, gw, c, patch_size, patch_size).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(*lead, c, h, w)


def gaussian_blur(pixels, sigma, *, generator=None):
    """Separable Gaussian blur, σ in pixels (kernel radius ⌈3σ⌉, reflect padding). σ = 0 returns a copy.
    ``generator`` is accepted for a uniform corruption signature (the blur is not random)."""
    del generator
    _pixels(pixels)
    if not sigma >= 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return pixels.clone()
    squeeze = pixels.dim() == 3
    x = pixels.unsqueeze(0) if squeeze else pixels
    b, c, h, w = x.shape
    radius = max(1, math.ceil(3 * sigma))
    radius = min(radius, h - 1, w - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(device=x.device, dtype=x.dtype)
    flat = x.reshape(b * c, 1, h, w)
    flat = torch.nn.functional.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, 1, -1))
    flat = torch.nn.functional.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = torch.nn.functional.conv2d(flat, kernel.view(1, 1, -1, 1))
    out = flat.reshape(b, c, h, w)
    return out.squeeze(0) if squeeze else out


@dataclass(frozen=True)
class Corruption:
    """One corrupted view: ``family`` ∈ FAMILIES and its ``severity`` parameter (t, fraction or σ)."""
    family: str
    severity: float

    @property
    def name(self):
        value = int(self.severity) if self.family == "diffusion" else self.severity
        return f"{self.family}@{value}"

    def __call__(self, pixels, *, generator=None, patch_size=8):
        if self.family == "diffusion":
            return diffusion_noise(pixels, int(self.severity), generator=generator)
        if self.family == "patch_shuffle":
            return patch_shuffle(pixels, self.severity, patch_size=patch_size, generator=generator)
        return gaussian_blur(pixels, self.severity)


FAMILIES = {
    "diffusion": SEVA_STEPS,
    "patch_shuffle": (0.25, 0.5, 1.0),
    "blur": (0.5, 1.0, 2.0),
}


def corruption_ladder(family="diffusion", severities=None):
    """Corruptions of one family in increasing severity: the negative groups G⁻_1 ≻ G⁻_2 ≻ … of SMPRO."""
    _checks.choice("family", family, tuple(FAMILIES))
    levels = FAMILIES[family] if severities is None else tuple(severities)
    if not levels:
        raise ValueError("severities must not be empty")
    if any(b <= a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"severities must be strictly increasing, got {levels}")
    return [Corruption(family, float(s)) for s in levels]
