"""MedMNIST-C's 13 corruptions of PneumoniaMNIST at 5 severities, in numpy, scipy and Pillow only.

MedMNIST-C (Di Salvo, Doerrich & Ledig 2024; package `medmnistc` 0.1.0, `corruptions/registry.py`) corrupts
each test image as an 8-bit RGB picture (the gray value in three channels) and stores it converted back to
gray (Pillow's convert("L")). `corrupt` does the same to (N, H, W) uint8 arrays. The parameters, severity 1..5:

    pixelate          Pillow BOX resize to int(f * size), then back:  f = 0.8, 0.7, 0.6, 0.5, 0.4
    jpeg_compression  Pillow JPEG at quality                            50, 30, 15, 10, 7
    gaussian_noise    + N(0, c) per channel on [0, 1]:                 c = 0.04, 0.05, 0.06, 0.07, 0.08
    speckle_noise     + x * N(0, c) per channel:                       c = 0.05, 0.07, 0.10, 0.15, 0.20
    impulse_noise     salt and pepper (skimage random_noise "s&p"):    amount = 0.005, 0.01, 0.013, 0.017, 0.02
    shot_noise        Poisson(x * m) / m per channel:                  m = 300, 200, 150, 100, 80
    gaussian_blur     torchvision gaussian_blur, kernel k (sigma = 0.15 k + 0.35): k = 3, 5, 7, 9, 11
    brightness_up     Pillow ImageEnhance.Brightness:                  1.1, 1.2, 1.3, 1.4, 1.5
    brightness_down                                                    0.9, 0.8, 0.7, 0.6, 0.5
    contrast_up       Pillow ImageEnhance.Contrast:                    1.1, 1.2, 1.3, 1.4, 1.6
    contrast_down                                                      0.9, 0.8, 0.7, 0.6, 0.4
    gamma_corr_up     torchvision adjust_gamma (gain 1):               1.1, 1.2, 1.3, 1.4, 1.6
    gamma_corr_down                                                    0.9, 0.8, 0.7, 0.6, 0.4

(medmnistc lists a sixth blur kernel, 13, that its 5 severities never use.) The noise is drawn per RGB channel
and averaged by the gray conversion (0.299 R + 0.587 G + 0.114 B), so its gray standard deviation is about
0.67 c, as in MedMNIST-C's files; it is drawn here the same way.

Randomness. Each (corruption, severity) has its own fixed seed (`seed`), so every model is scored on the same
images. The streams are those medmnistc draws from, in the same order (image by image): numpy's legacy
RandomState (MT19937, whose streams numpy keeps stable) for the normal and Poisson noise, a
numpy.random.default_rng Generator for salt and pepper. medmnistc seeded the same way (np.random.seed(s),
`corruptor.rng = np.random.default_rng(s)`; scripts/make_corruption_fixture.py) gives the same bytes. Its own
DatasetManager seeds once (0) for the whole test set, so MedMNIST-C's published files hold other draws of the
same noise.

Agreement with medmnistc (tests/test_corruptions.py, against a stored fixture and, where medmnistc imports,
directly): identical bytes for 12 corruptions at every severity (the same Pillow calls, the same random
streams, the same float64 arithmetic, gamma's table computed as torchvision computes it; JPEG with the same
Pillow build). gaussian_blur is a float64 separable convolution here and torch's float32 2-D one there: at
most 1 gray level apart, on at most 0.1% of the pixels (a value at .5 rounding the other way; measured 0 to
0.006% of the pixels at 28, 64 and 128 px).

Size. MedMNIST-C is defined on 224 px images; this module corrupts the images at the size the model sees. At
28 px the spatial corruptions (blur, pixelate, JPEG's 8 px blocks) are relatively 8 times as strong as at
224 px; the pixel-wise ones (noise, brightness, contrast, gamma) are the same. Images smaller than a
corruption needs (`min_size`) are refused with a CorruptionError.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

from cxr.errors import CxrError

NAME = "medmnistc-pneumoniamnist"  # the corruption set: MedMNIST-C's for PneumoniaMNIST
VERSION = 1  # bump when a corrupted image changes (parameters, seeds, arithmetic): stored scores are redone
REFERENCE = "medmnistc 0.1.0"
SEVERITIES = (1, 2, 3, 4, 5)
_CHUNK = 1 << 22  # values of a noise draw held at once (float64: 32 MB)


class CorruptionError(CxrError):
    """Images a corruption cannot be applied to (too small, wrong type), or an unknown corruption."""


@dataclass(frozen=True)
class Corruption:
    name: str
    family: str  # FAMILIES' key
    params: tuple  # one per severity 1..5
    kind: str  # how it is applied (_APPLY's key)


CORRUPTIONS = {c.name: c for c in (  # medmnistc's order
    Corruption("pixelate", "digital", (0.8, 0.7, 0.6, 0.5, 0.4), "pixelate"),
    Corruption("jpeg_compression", "digital", (50, 30, 15, 10, 7), "jpeg"),
    Corruption("gaussian_noise", "noise", (0.04, 0.05, 0.06, 0.07, 0.08), "gaussian"),
    Corruption("speckle_noise", "noise", (0.05, 0.07, 0.10, 0.15, 0.20), "speckle"),
    Corruption("impulse_noise", "noise", (0.005, 0.01, 0.013, 0.017, 0.02), "impulse"),
    Corruption("shot_noise", "noise", (300, 200, 150, 100, 80), "shot"),
    Corruption("gaussian_blur", "blur", (3, 5, 7, 9, 11), "blur"),
    Corruption("brightness_up", "intensity", (1.1, 1.2, 1.3, 1.4, 1.5), "brightness"),
    Corruption("brightness_down", "intensity", (0.9, 0.8, 0.7, 0.6, 0.5), "brightness"),
    Corruption("contrast_up", "intensity", (1.1, 1.2, 1.3, 1.4, 1.6), "contrast"),
    Corruption("contrast_down", "intensity", (0.9, 0.8, 0.7, 0.6, 0.4), "contrast"),
    Corruption("gamma_corr_up", "intensity", (1.1, 1.2, 1.3, 1.4, 1.6), "gamma"),
    Corruption("gamma_corr_down", "intensity", (0.9, 0.8, 0.7, 0.6, 0.4), "gamma"),
)}
FAMILIES = {  # the report's columns: which corruptions each family averages
    "noise": ("gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise"),
    "blur": ("gaussian_blur",),
    "digital": ("pixelate", "jpeg_compression"),
    "intensity": ("brightness_up", "brightness_down", "contrast_up", "contrast_down", "gamma_corr_up",
                  "gamma_corr_down"),
}


def get(name: str) -> Corruption:
    if name not in CORRUPTIONS:
        raise CorruptionError(f"unknown corruption {name!r}; allowed: {', '.join(CORRUPTIONS)}")
    return CORRUPTIONS[name]


def seed(name: str, severity: int) -> int:
    """The fixed seed of one (corruption, severity): CRC-32 of "NAME/name/severity" (the same on every machine)."""
    return zlib.crc32(f"{NAME}/{name}/{severity}".encode())


def min_size(name: str, severity: int) -> int:
    """The least height and width a corruption can be applied at (what medmnistc itself can do)."""
    c = get(name)
    p = c.params[severity - 1]
    if c.kind == "pixelate":  # both resized sides must stay >= 1 px
        return next(s for s in range(1, 64) if int(s * p) >= 1)
    if c.kind == "blur":  # torch's reflect padding needs padding < size
        return p // 2 + 1
    return 1


def required_size() -> tuple[int, str]:
    """(the least side every corruption and severity can be applied at, the one that needs it)."""
    need = max((min_size(n, s), f"{n} severity {s}") for n in CORRUPTIONS for s in SEVERITIES)
    return need


def to_uint8(x) -> np.ndarray:
    """Images in [0, 1] (any shape) as uint8, rounded: 8-bit data divided by 255 comes back exactly."""
    return np.rint(np.clip(np.asarray(x, dtype=np.float64), 0, 1) * 255).astype(np.uint8)


def corrupt(images: np.ndarray, name: str, severity: int) -> np.ndarray:
    """(N, H, W) uint8 gray images corrupted by `name` at `severity` (1..5): a new (N, H, W) uint8 array."""
    c = get(name)
    if isinstance(severity, bool) or severity not in SEVERITIES:
        raise CorruptionError(f"{name}: severity {severity!r}; allowed: 1 to 5")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise CorruptionError(f"{name}: expected (N, H, W) uint8 images, got {images.dtype} of shape {images.shape}")
    need = min_size(name, severity)
    if min(images.shape[1:]) < need:
        raise CorruptionError(f"{name} severity {severity}: needs images of at least {need} x {need} px, these are "
                              f"{images.shape[1]} x {images.shape[2]}")
    if images.shape[0] == 0:
        return images.copy()
    return _APPLY[c.kind](np.ascontiguousarray(images), c.params[severity - 1], seed(name, severity))


# --- the corruptions: f(images (N, H, W) uint8, parameter, seed) -> (N, H, W) uint8 --------------------------

def _gray(rgb: np.ndarray) -> np.ndarray:
    """Pillow's convert("L") of (..., 3) uint8 RGB: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def _per_channel(images: np.ndarray, noisy) -> np.ndarray:
    """noisy(rgb in [0, 1] float64, chunk of images) -> float image, per chunk, as medmnistc: clip to [0, 1],
    * 255, truncated to uint8, then gray. The draws run image by image in order, whatever the chunk size."""
    n, h, w = images.shape
    step = max(1, _CHUNK // (h * w * 3))
    out = np.empty_like(images)
    for i in range(0, n, step):
        rgb = np.repeat(images[i:i + step, :, :, None], 3, axis=3) / 255.
        out[i:i + step] = _gray((np.clip(noisy(rgb), 0, 1) * 255).astype(np.uint8))
    return out


def _gaussian(images, c, s):
    rs = np.random.RandomState(s)
    return _per_channel(images, lambda x: x + rs.normal(size=x.shape, scale=c))


def _speckle(images, c, s):
    rs = np.random.RandomState(s)
    return _per_channel(images, lambda x: x + x * rs.normal(size=x.shape, scale=c))


def _shot(images, m, s):
    rs = np.random.RandomState(s)
    return _per_channel(images, lambda x: rs.poisson(x * m) / m)


def _impulse(images, amount, s):
    """skimage.util.random_noise(x, mode="s&p", amount, rng): per image, `flipped` = U < amount, then `salted` =
    U < 0.5, both of the image's shape, from one Generator; flipped and salted -> 1, flipped and not -> 0."""
    rng = np.random.default_rng(s)

    def noisy(x):
        u = rng.random((len(x), 2, *x.shape[1:]))  # per image: the flipped draws, then the salted ones
        flipped, salted = u[:, 0] <= amount, u[:, 1] <= 0.5
        out = x.copy()
        out[flipped & salted] = 1
        out[flipped & ~salted] = 0
        return out

    return _per_channel(images, noisy)


def _blur(images, k, _s):
    """torchvision's gaussian_blur: the float32 kernel exp(-x^2 / (2 sigma^2)) / sum over x = -k//2..k//2,
    sigma = 0.15 k + 0.35, reflect padding, rounded half to even."""
    x = np.linspace(-(k // 2), k // 2, k, dtype=np.float32)
    pdf = np.exp(np.float32(-0.5) * (x / np.float32(0.15 * k + 0.35)) ** 2)
    kernel = (pdf / pdf.sum()).astype(np.float64)
    out = ndimage.correlate1d(images.astype(np.float64), kernel, axis=2, mode="mirror")
    out = ndimage.correlate1d(out, kernel, axis=1, mode="mirror")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _gamma(images, gamma, _s):
    """torchvision's adjust_gamma on a PIL image: the table int((255 + 1 - 1e-3) * gain * pow(v / 255, gamma))."""
    table = np.array([int((255 + 1 - 1e-3) * 1 * pow(v / 255.0, gamma)) for v in range(256)], dtype=np.uint8)
    return table[images]


def _each(op):
    """A Pillow operation image by image, on mode "L" images (the same as on medmnistc's gray RGB ones)."""
    def apply(images, p, _s):
        return np.stack([np.asarray(op(Image.fromarray(im), p), dtype=np.uint8) for im in images])
    return apply


def _pixelate(im: Image.Image, f: float) -> Image.Image:
    w, h = im.size
    return im.resize((int(w * f), int(h * f)), Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return Image.open(buf)


_APPLY = {
    "pixelate": _each(_pixelate),
    "jpeg": _each(_jpeg),
    "gaussian": _gaussian,
    "speckle": _speckle,
    "impulse": _impulse,
    "shot": _shot,
    "blur": _blur,
    "brightness": _each(lambda im, f: ImageEnhance.Brightness(im).enhance(f)),
    "contrast": _each(lambda im, f: ImageEnhance.Contrast(im).enhance(f)),
    "gamma": _gamma,
}
