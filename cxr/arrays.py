"""Images and labels from arrays and image files, checked: the conversions every file source of cxr.data shares.
An image array ((N, H, W), (N, H, W, 1|3) or (N, 1, H, W); uint8, uint16, or float in [0, 1]) becomes x
(N, 1, H, W) float32 in [0, 1], labels become y (N,) int64 with normal 0 and pneumonia 1, a folder of
.jpeg/.jpg/.png files is read as grayscale, and `_resize` brings images to the size asked for. Anything unusable
raises DataError, one line naming the file (or the array in it) and the problem.

Hostile files are refused before memory is spent on them: an .npy header (`_npy_header`, also for each member of
an .npz) is checked against the bytes the file really holds and against MAX_ARRAY_BYTES before the array is
read, a folder of images against MAX_ARRAY_BYTES as it is read, one image against PIL.Image.MAX_IMAGE_PIXELS;
any failure of numpy, zipfile or Pillow becomes a DataError naming the file (`_reading`), a MemoryError too.

Images keep their meaning: 8-bit pixels are divided by 255, 16-bit ones by 65535, float ones must lie in [0, 1].
Image files by Pillow mode (IMAGE_MODES): 1 (black and white, 0 or 1), L, P (palette: its colours' luminance),
LA, PA, RGB, RGBA and RGBX (luminance as Pillow's convert("L"), alpha ignored; grayscale stored as RGB keeps its
value) are 8-bit; I;16, I;16B, I;16L and I;16N are 16-bit; I (32-bit integers) is read as 16-bit when its values
lie in 0..65535, else refused; F (float) must lie in [0, 1]. Every other mode (CMYK, YCbCr, LAB, HSV, I;16S, ...)
is refused by name. 8-bit images are resized by Pillow (antialiased bilinear, JPEGs decoded at a reduced scale
first), the others after scaling to float, by `_resize`, so that no value is rounded to 8 bits.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib import format as npy_format
from PIL import Image

from cxr.errors import CxrError, one_line


class DataError(CxrError):
    """Data that cannot be used; the message is one line naming the file or source and the problem."""


CLASSES = ("normal", "pneumonia")  # label 0, label 1
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# The most one .npy file, one .npz archive (all its arrays) or one folder of images may come to, counted as the
# float32 images it becomes (4 bytes a pixel) or as stored, whichever is larger; checked before it is read.
# PneumoniaMNIST at 224 px is 0.3 GB as uint8, 1.2 GB as float32. Loading needs about twice this at its peak (the
# stored array and its float32 copy). To read more, raise it before loading: cxr.arrays.MAX_ARRAY_BYTES = 16 << 30.
MAX_ARRAY_BYTES = 4 << 30
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # the image_size load and load_pair accept (pixels a side)
# One image file may have at most PIL.Image.MAX_IMAGE_PIXELS pixels (89,478,485 by default, about 9459 x 9459;
# radiographs have 5 to 25 million): more is refused as a likely decompression bomb. Raise that one to read larger.
EIGHT_BIT_MODES = ("1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX")  # read through convert("L"), / 255
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # read as numbers: 16-bit / 65535, F as it is
IMAGE_MODES = EIGHT_BIT_MODES + WIDE_MODES


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


# --- failures and limits ----------------------------------------------------------------------------

@contextlib.contextmanager
def _reading(where: object, problem: str) -> Iterator[None]:
    """Any failure inside (numpy, zipfile, Pillow, ...) as a one-line DataError `where: problem (cause)`;
    a DataError passes through, KeyboardInterrupt and the like are not caught."""
    try:
        with _memory(where):
            yield
    except CxrError:
        raise
    except Exception as err:
        raise DataError(f"{where}: {problem} ({one_line(err, 200)})") from None


@contextlib.contextmanager
def _memory(where: object) -> Iterator[None]:
    """A MemoryError (or torch's failed allocation) inside as a DataError naming `where`."""
    try:
        yield
    except MemoryError:
        raise DataError(f"{where}: loading it needs more memory than is available") from None
    except RuntimeError as err:
        if "alloc" not in str(err):  # torch: "DefaultCPUAllocator: can't allocate memory: you tried to allocate"
            raise
        raise DataError(f"{where}: loading it needs more memory than is available ({one_line(err, 120)})") from None


def _image_size(size: object, where: object = None) -> int:
    """size as an int in [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE], else DataError naming it, the limits and `where`."""
    prefix = f"{where}: " if where is not None else ""
    if isinstance(size, bool) or not isinstance(size, int | np.integer):
        raise DataError(f"{prefix}image_size must be an integer, got {size!r}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise DataError(f"{prefix}image_size {int(size)} is outside {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} pixels "
                        "(cxr.arrays.MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)")
    return int(size)


def _size(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _within_limit(need: int, where: object, what: str) -> None:
    if need > MAX_ARRAY_BYTES:
        raise DataError(f"{where}: {what} come to {_size(need)} as float32, over the limit of "
                        f"{_size(MAX_ARRAY_BYTES)} (cxr.arrays.MAX_ARRAY_BYTES; raise it to load more)")


def _npy_header(fp, where: object, stream_bytes: int) -> int:
    """Check the header of the .npy stream at fp (stream_bytes long in all) before its array is read: a numeric
    dtype, and a shape that the bytes after the header hold. Returns the bytes the array needs (as stored or as
    float32 images, whichever is more) for `_within_limit`; fp is left after the header."""
    start = fp.tell()
    version = npy_format.read_magic(fp)
    readers = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}
    if version not in readers:  # 3.0 only adds UTF-8 field names of structured dtypes, which are refused anyway
        raise DataError(f"{where}: .npy format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
    shape, _, dtype = readers[version](fp)
    if dtype.kind not in "biuf":
        raise DataError(f"{where}: holds an array of dtype {dtype}; expected numbers (uint8, uint16 or float "
                        "images, integer labels)")
    if any(d < 0 or d >= 2**63 for d in shape):  # numpy's sizes are int64
        raise DataError(f"{where}: its header claims the impossible shape {shape}")
    count = math.prod(shape)
    claim, held = count * dtype.itemsize, stream_bytes - (fp.tell() - start)
    if claim > held:
        raise DataError(f"{where}: its header claims shape {shape} of {dtype}, {claim:,} bytes, but it holds "
                        f"{max(held, 0):,}")
    return max(claim, 4 * count)


def _read_npy(path: Path) -> np.ndarray:
    """One .npy array, its header checked (`_npy_header`, MAX_ARRAY_BYTES) before np.load allocates it."""
    with _reading(path, "cannot read npy"), open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise DataError(f"{path}: an .npz archive, expected one .npy array")
        f.seek(0)
        array_bytes = _npy_header(f, path, os.fstat(f.fileno()).st_size)
        _within_limit(array_bytes, path, "its images")
        f.seek(0)
        return np.load(f, allow_pickle=False)


# --- arrays: images, labels, size ------------------------------------------------------------------

def _images(array: np.ndarray, where: str) -> torch.Tensor:
    """(N, H, W), (N, H, W, 1|3) or (N, 1, H, W) uint8, uint16 or float in [0, 1] -> (N, 1, H, W) float32."""
    shape = array.shape
    if array.ndim == 4 and shape[1] == 1:
        array = array[:, 0]
    elif array.ndim == 4 and shape[-1] in (1, 3):
        array = array[..., 0] if shape[-1] == 1 else array
    elif array.ndim != 3:
        raise DataError(f"{where}: images have shape {shape}; expected (N, H, W), (N, H, W, 1|3) or (N, 1, H, W)")
    if array.shape[0] == 0 or 0 in array.shape[1:3]:
        raise DataError(f"{where}: no images (shape {shape})")
    with _memory(where):
        if array.dtype == np.uint8:
            x = array.astype(np.float32) / 255
        elif array.dtype.kind == "u" and array.dtype.itemsize == 2:  # uint16 in either byte order
            x = array.astype(np.float32) / 65535
        elif np.issubdtype(array.dtype, np.floating):
            x = _unit_floats(array, where, "float images", plural=True)
        else:
            raise DataError(f"{where}: images have dtype {array.dtype}; expected uint8 (0..255), uint16 "
                            "(0..65535) or float in [0, 1]")
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
        return _read_folder(path, size)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    array = _read_npy(path)
    with _memory(path):
        return _resize(_images(array, str(path)), size)


def _read_folder(folder: Path, size: int | None) -> torch.Tensor:
    """The images of a folder as (N, 1, H, W) float32, refused once they come to more than MAX_ARRAY_BYTES."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join('*' + s for s in IMAGE_SUFFIXES)})")
    if size is not None:
        _within_limit(len(files) * size * size * 4, folder, f"{len(files):,} images of {size}x{size}")
    images, room = [], MAX_ARRAY_BYTES
    for p in files:
        image = _read_image(p, size, room)
        room -= image.nbytes
        if images and image.shape != images[0].shape:
            raise DataError(f"{folder}: images differ in size ({files[0].name} is {images[0].shape[1]}x"
                            f"{images[0].shape[0]}, {p.name} is {image.shape[1]}x{image.shape[0]}); "
                            "pass an image_size")
        images.append(image)
    with _memory(folder):
        return torch.from_numpy(np.stack(images))[:, None]


def _read_image(path: Path, size: int | None, room: int | None = None) -> np.ndarray:
    """One image as float32 (H, W) in [0, 1] at size x size (see the module's docstring for modes and scaling);
    refused before decoding when it would take more than `room` bytes as float32."""
    with _reading(path, "unreadable image"), warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # over MAX_IMAGE_PIXELS: refused, not warned
        with open(path, "rb") as file, _open_image(file, path) as image:
            if image.mode not in IMAGE_MODES:
                raise DataError(f"{path}: image mode {image.mode}; expected grayscale (8-bit, 16-bit or float) or "
                                f"RGB (modes {', '.join(IMAGE_MODES)})")
            need = (size * size if size is not None else image.width * image.height) * 4
            if room is not None and need > room:
                raise DataError(f"{path}: with the images before it, {path.parent} comes to more than "
                                f"{_size(MAX_ARRAY_BYTES)} as float32 (cxr.arrays.MAX_ARRAY_BYTES; raise it to load "
                                "more, or pass a smaller image_size)")
            if image.mode in EIGHT_BIT_MODES:
                return _eight_bit(image, size)
            return _wide(image, path, size)


def _open_image(file, path: Path) -> Image.Image:
    """Image.open, its decompression bomb check (size only, nothing decoded yet) as a DataError."""
    try:
        return Image.open(file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: {one_line(err, 120)} (more than PIL.Image.MAX_IMAGE_PIXELS = "
                        f"{Image.MAX_IMAGE_PIXELS:,} pixels; raise that to read larger images)") from None


def _eight_bit(image: Image.Image, size: int | None) -> np.ndarray:
    """An 8-bit image as grayscale / 255, resized by Pillow (antialiased bilinear) to size x size."""
    if size is not None:
        image.draft("L", (size, size))  # JPEG: decode at a reduced scale, still >= size
    image = image.convert("L")
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(image).astype(np.float32) / 255


def _unit_floats(values: np.ndarray, where: str, noun: str, plural: bool) -> np.ndarray:
    """values as float32, checked finite and in [0, 1]: float images are taken as already scaled."""
    x = values.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{where}: {noun} {'contain' if plural else 'contains'} NaN or infinite values")
    if x.min() < 0 or x.max() > 1:
        raise DataError(f"{where}: {noun} must lie in [0, 1], found [{x.min():.4g}, {x.max():.4g}]")
    return x


def _wide(image: Image.Image, path: Path, size: int | None) -> np.ndarray:
    """A 16-bit, 32-bit integer or float image scaled to [0, 1] as float32, then resized by `_resize`."""
    pixels = np.asarray(image)
    if image.mode == "F":
        x = _unit_floats(pixels, str(path), "float image (mode F)", plural=False)
    else:
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise DataError(f"{path}: 32-bit integer image (mode {image.mode}) with values in {low}..{high}; "
                            "expected 16-bit values 0..65535")
        x = pixels.astype(np.float32) / 65535
    return _resize(torch.from_numpy(np.ascontiguousarray(x))[None, None], size)[0, 0].numpy()
