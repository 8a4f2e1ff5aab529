"""Procedural chest radiographs: the `synthetic[:SEED]` data source, generated in about a second.

Dark background, bright body, dark lungs, a bright mediastinum; pneumonia adds patchy opacities to
the lung fields. Confounders (vessel markings, hazy bases, a focal brightening) appear as often in
normal images as in pneumonia ones, so plain brightness does not give the label away. Not real X-rays.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# Bump when the images or labels this module makes change: results of the old ones are then not served
# (a synthetic data set is fingerprinted by this version, its seed and size, not by its pixels, whose
# last bits differ between CPUs' vector units).
GENERATOR_VERSION = 1
# (normal, pneumonia) images per split, as in PneumoniaMNIST
SYNTHETIC_COUNTS = {"train": (1214, 3494), "val": (135, 389), "test": (234, 390)}


def make_split(counts: tuple[int, int], seed: int, split_index: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, 1, size, size) float32 in [0, 1] and y (N,) int64 of one split, counts = (normal, pneumonia).

    Who the "patients" are depends on (seed, split_index) only, not on size; the pixel noise on size too.
    """
    rng = np.random.default_rng([seed, split_index])
    y = rng.permutation(np.repeat([0, 1], counts))
    people = patients(rng, y)
    noise = np.random.default_rng([seed, split_index, size])
    chunk = max(1, 2**21 // (size * size))  # bounds the memory of the temporaries
    x = np.concatenate([render({k: v[i:i + chunk] for k, v in people.items()}, size, noise)
                        for i in range(0, len(y), chunk)])
    return torch.from_numpy(x)[:, None].contiguous(), torch.from_numpy(y.astype(np.int64))


def patients(rng: np.random.Generator, y: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image parameters in image coordinates u (left to right), v (top to bottom), both in [-1, 1]."""
    n, sick = len(y), y == 1

    def uniform(low, high, shape=()):
        return rng.uniform(low, high, (n, *shape))

    k = 4  # opacity slots per image; a pneumonia case uses 1 to 4 of them
    count = np.where(sick, rng.choice([1, 2, 3, 4], n, p=[0.35, 0.3, 0.2, 0.15]), 0)
    severity = np.where(sick, rng.beta(2.2, 1.5, n) * 0.85 + 0.15, 0)  # some cases are subtle
    side = rng.choice([-1.0, 1.0], (n, k))
    radius, angle = np.sqrt(uniform(0, 1, (k,))) * 0.8, uniform(0, 2 * np.pi, (k,))
    lung_x, lung_y = uniform(0.4, 0.47), uniform(-0.08, 0.02)
    lung_w, lung_h = uniform(0.3, 0.38), uniform(0.62, 0.74)
    # Confounders, as often in normal as in pneumonia images: vessel markings around the hila,
    # brighter lung bases (soft tissue, poor inspiration), a small focal brightening (nipple shadow).
    focal = rng.random(n) < 0.25
    return {
        "y": y,
        "shift_u": rng.normal(0, 0.04, n), "shift_v": rng.normal(0, 0.04, n),
        "scale": uniform(0.92, 1.1), "rotate": rng.normal(0, 0.05, n),
        "background": uniform(0.0, 0.1), "tissue": uniform(0.55, 0.75), "body_w": uniform(0.95, 1.15),
        "lung_x": lung_x, "lung_y": lung_y, "lung_w": lung_w, "lung_h": lung_h,
        "lung_dark": uniform(0.4, 0.65),
        "heart_r": uniform(0.28, 0.38), "heart_u": uniform(0.08, 0.18),
        "rib_amp": uniform(0.03, 0.09), "rib_phase": uniform(0, 2 * np.pi), "rib_period": uniform(0.2, 0.28),
        "texture": rng.normal(0, 1, (n, 5, 5)) * uniform(0.01, 0.04)[:, None, None],
        "hilum": uniform(0, 0.3) * (rng.random(n) < 0.5),
        "base_haze": uniform(0, 0.3) * (rng.random(n) < 0.35),
        "focal_u": rng.choice([-1.0, 1.0], n) * (lung_x + uniform(-0.5, 0.5) * lung_w),
        "focal_v": lung_y + uniform(0.1, 0.5) * lung_h, "focal_amp": uniform(0.15, 0.45) * focal,
        "op_u": side * lung_x[:, None] + radius * np.cos(angle) * lung_w[:, None],
        "op_v": lung_y[:, None] + radius * np.sin(angle) * lung_h[:, None],
        "op_sigma": uniform(0.12, 0.35, (k,)),
        "op_amp": severity[:, None] * uniform(0.6, 1.2, (k,)) * (np.arange(k) < count[:, None]),
        "patch": uniform(0, 1, (6, 6)),
        "gamma": uniform(0.8, 1.25), "gain": uniform(0.85, 1.15), "noise": uniform(0.01, 0.03),
    }


def render(params: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """(n, size, size) float32 radiographs: dark background, bright body, dark lungs, bright mediastinum."""
    p = {k: v.astype(np.float32) for k, v in params.items()}  # float32 throughout: twice as fast

    def col(name):  # per-image scalar, broadcast over the image
        return p[name][:, None, None]

    def smooth(grid):  # (n, g, g) coarse random grid -> (n, size, size) smooth field
        return F.interpolate(torch.from_numpy(grid)[:, None], size=(size, size), mode="bicubic",
                             align_corners=False)[:, 0].numpy()

    def soft(z, width):  # 0 outside, 1 inside, a soft edge about `width` wide
        return 0.5 + 0.5 * np.tanh(z * (1 / width))

    edge = max(0.02, 1.5 / size)
    t = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)
    gv, gu = np.meshgrid(t, t, indexing="ij")
    cos, sin = np.cos(col("rotate")), np.sin(col("rotate"))
    u0, v0 = gu - col("shift_u"), gv - col("shift_v")
    u, v = (cos * u0 + sin * v0) / col("scale"), (cos * v0 - sin * u0) / col("scale")
    au = np.abs(u)

    torso = 1 - ((u / col("body_w")) ** 2) ** 2 - (np.minimum(v - 0.2, 0) ** 2) ** 2  # shoulders at v = -0.8
    neck = np.minimum(0.18 - au, -0.7 - v)
    body = np.maximum(soft(torso / 4, edge), soft(neck, edge))
    tissue = col("tissue")
    image = col("background") + (tissue - col("background")) * body * (1 + smooth(p["texture"]))
    image += 0.08 * soft(0.07 - au, edge) * body  # spine
    clavicle = np.exp((v + 0.72 - 0.22 * au) ** 2 * -500) * soft(0.65 - au, 0.05)
    image += 0.08 * clavicle * body

    heart = soft(1 - ((u - col("heart_u")) / col("heart_r")) ** 2
                 - ((v - col("lung_y") - 0.45) / (0.8 * col("heart_r"))) ** 2, 0.6)
    dv = (v - col("lung_y")) / col("lung_h")
    lungs = np.zeros_like(u)
    for side in (-1.0, 1.0):
        du = np.abs(u - side * col("lung_x")) / (col("lung_w") * (0.85 + 0.15 * np.clip(dv, -1, 1)))  # apex narrower
        lungs += soft((1 - du * du * np.sqrt(du) - dv * dv) * col("lung_w") / 2.5, edge)
    lungs = np.clip(lungs, 0, 1) * (1 - 0.7 * heart)

    opacity = np.zeros_like(u)
    for j in range(p["op_amp"].shape[1]):
        d2 = (u - p["op_u"][:, j, None, None]) ** 2 + (v - p["op_v"][:, j, None, None]) ** 2
        opacity += p["op_amp"][:, j, None, None] * np.exp(d2 * (-0.5 / p["op_sigma"][:, j, None, None] ** 2))
    opacity *= np.clip(0.4 + smooth(p["patch"]), 0.4, 1)  # patchy, not round
    opacity += col("base_haze") * np.clip(dv, 0, 1)
    hila = np.exp((au - 0.2) ** 2 * -125 + (v - col("lung_y")) ** 2 * -16)
    opacity += col("hilum") * hila * (1 + 0.5 * np.cos(40 * np.arctan2(v - col("lung_y"), au)))
    opacity += col("focal_amp") * np.exp(((u - col("focal_u")) ** 2 + (v - col("focal_v")) ** 2) * -250)
    image -= lungs * col("lung_dark") * tissue * (1 - np.clip(opacity, 0, 0.95))

    arc = v - 1.2 * (au - 0.3) ** 2  # posterior ribs: arcs highest mid-lung
    ribs = 0.5 + 0.5 * np.cos(arc * (2 * np.pi / col("rib_period")) + col("rib_phase"))
    image += lungs * col("rib_amp") * ribs ** 3

    image = np.clip(image, 0, 1) ** col("gamma") * col("gain")
    image += col("noise") * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image, 0, 1, out=image)
