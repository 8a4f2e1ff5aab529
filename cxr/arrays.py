"""Images and labels from arrays and image files, checked: the conversions every file source of cxr.data shares.
An image array ((N, H, W), (N, H, W, 1|3) or (N, 1, H, W); uint8, or float in [0, 1]) becomes x (N, 1, H, W)
float32 in [0, 1], labels become y (N,) int64 with normal 0 and pneumonia 1, a folder of .jpeg/.jpg/.png files is
read as grayscale, and `_resize` brings images to the size asked for. Anything unusable raises DataError, one line
naming the file (or the array in it) and the problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cxr.errors import CxrError, one_line


class DataError(CxrError):
    """Data that cannot be used; the message is one line naming the file or source and the problem."""


CLASSES = ("normal", "pneumonia")  # label 0, label 1
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


@dataclass(frozen=True)
class Split:
    x: torch.Tensor  # (N, 1, S, S) float32 in [0, 1], CPU, contiguous
    y: torch.Tensor  # (N,) int64: normal 0, pneumonia 1

    @property
    def n(self) -> int:
        return len(self.y)

    @property
    def normal(self) -> int:
        return int((self.y == 0).sum())

    @property
    def pneumonia(self) -> int:
        return int((self.y == 1).sum())


# --- arrays: images, labels, size ------------------------------------------------------------------

def _images(array: np.ndarray, where: str) -> torch.Tensor:
    """(N, H, W), (N, H, W, 1|3) or (N, 1, H, W) uint8 or float in [0, 1] -> (N, 1, H, W) float32."""
    shape = array.shape
    if array.ndim == 4 and shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 4 and shape[-1] in (1, 3):
        array = array[..., 0] if shape[-1] == 1 else array
    elif array.ndim != 3:
        raise DataError(f"{where}: images have shape {shape}; expected (N, H, W), (N, H, W, 1|3) or (N, 1, H, W)")
    if array.shape[0] == 0 or 0 in array.shape[1:3]:
        raise DataError(f"{where}: no images (shape {shape})")
    if array.dtype == np.uint8:
        x = array.astype(np.float32) / 255
    elif np.issubdtype(array.dtype, np.floating):
        x = array.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{where}: images contain NaN or infinite values")
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"{where}: float images must lie in [0, 1], found [{x.min():.4g}, {x.max():.4g}]")
    else:
        raise DataError(f"{where}: images have dtype {array.dtype}; expected uint8 (0..255) or float in [0, 1]")
    if x.ndim == 4:  # RGB: luminance as Pillow's convert("L") computes it
        x = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x))[:, None]


def _labels(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1 or len(array) != n:
        raise DataError(f"{where}: labels have shape {array.shape}; expected ({n},) or ({n}, 1) for {n} images")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == bool):
        raise DataError(f"{where}: labels have dtype {array.dtype}; expected integers 0 or 1")
    bad = ~np.isin(array, (0, 1))
    if bad.any():
        raise DataError(f"{where}: labels must be 0 (normal) or 1 (pneumonia), found {array[bad][0].item()!r} "
                        f"({int(bad.sum())} bad)")
    return torch.from_numpy(array.astype(np.int64))


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    """Area averaging when shrinking, bilinear when growing; untouched when already size x size."""
    if size is None or x.shape[-2:] == (size, size):
        return x
    if min(x.shape[-2:]) >= size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def _checked(x: torch.Tensor, y: torch.Tensor, where: str) -> Split:
    for label, name in enumerate(CLASSES):
        if not (y == label).any():
            raise DataError(f"{where}: no {name} (label {label}) images")
    return Split(x.contiguous(), y)


def _labelled(normal: torch.Tensor, pneumonia: torch.Tensor) -> Split:
    y = torch.cat([torch.zeros(len(normal), dtype=torch.int64), torch.ones(len(pneumonia), dtype=torch.int64)])
    return Split(torch.cat([normal, pneumonia]).contiguous(), y)


def _hw(x: torch.Tensor) -> str:
    return f"{x.shape[-2]}x{x.shape[-1]}"


# --- files: one .npy array or a folder of images per class ------------------------------------------

def _class_images(path: Path, size: int | None) -> torch.Tensor:
    """All images of one class: an .npy array or a folder of image files, resized to size."""
    if path.is_dir():
        return _images(_read_folder(path, size), str(path))
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read npy ({one_line(err)})") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise DataError(f"{path}: an .npz archive, expected one .npy array")
    return _resize(_images(array, str(path)), size)


def _read_folder(folder: Path, size: int | None) -> np.ndarray:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
    images = [_read_image(p, size) for p in files]
    for p, image in zip(files, images, strict=True):
        if image.shape != images[0].shape:
            raise DataError(f"{folder}: images differ in size ({files[0].name} is {images[0].shape[1]}x"
                            f"{images[0].shape[0]}, {p.name} is {image.shape[1]}x{image.shape[0]}); "
                            "pass an image_size")
    return np.stack(images)


def _read_image(path: Path, size: int | None) -> np.ndarray:
    """One image as uint8 (H, W) grayscale, resized by Pillow (antialiased bilinear) to size x size."""
    try:
        with Image.open(path) as image:
            if size is not None:
                image.draft("L", (size, size))  # JPEG: decode at a reduced scale, still >= size
            image = image.convert("L")
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.asarray(image)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: unreadable image ({one_line(err)})") from None
