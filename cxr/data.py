"""Data sources: one string names the data, `load` turns it into tensors (DESIGN.md "Data sources").

    synthetic[:SEED]        procedural chest radiographs, generated in about a second, no files or network.
                            The data seed (default 0) is not the training seed: every run shares one test set.
    pneumoniamnist[:SIZE]   MedMNIST PneumoniaMNIST, SIZE 28 (default), 64, 128 or 224, read from
                            $CXR_DATA_DIR (default ~/.cache/cxr) or else downloaded there once with pooch.
                            The MD5 is checked on download; a file already in the cache is trusted as it is
                            (it came from a verified download or was put there on purpose).
    npz:PATH                a MedMNIST-format npz: {train,val,test}_{images,labels}, all six required.
    npz:PATH?holdout=F      an npz without a test split (train and val only, such as ../shared/data's
                            pneumoniamnist-trainval.npz): test is a stratified fraction F of val, held out
                            with a fixed seed (TEST_HOLDOUT_SEED), and val is the rest. The dataset's name
                            says so. Tune on train and the remaining val; report on the held-out part.
    npy:DIR                 the course format DIR/{train,val,test}_{normal,pneumonia}.npy; val optional.
    folder:DIR              the Kermany layout DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg|jpg|png, any
                            size, grayscale or RGB; val optional.

Every split becomes x (N, 1, S, S) float32 in [0, 1] (uint8 divided by 255) and y (N,) int64 with
normal 0 and pneumonia 1. Where a source has no val split, val is a stratified 10% of train held out
with seed 0 (`holdout`). A folder with NORMAL/ and PNEUMONIA/ at its top level (such as
kermany-fullres, the source's validation split) is one labelled set, not a train/test dataset:
`folder:` refuses it and says to evaluate on it with load_pair(DIR/NORMAL, DIR/PNEUMONIA, image_size),
which takes .npy files or image folders. Bad input raises DataError, one line naming the file and
the problem.
"""

from __future__ import annotations

import functools
import numbers
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class DataError(ValueError):
    """Data that cannot be used; the message is one line naming the file or source and the problem."""


SCHEMES = ("synthetic", "synthetic:SEED", "pneumoniamnist", "pneumoniamnist:SIZE", "npz:PATH",
           "npz:PATH?holdout=F", "npy:DIR", "folder:DIR")
SPLITS = ("train", "val", "test")
CLASSES = ("normal", "pneumonia")  # label 0, label 1
FOLDER_CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VAL_FRACTION, VAL_SEED = 0.1, 0  # the val split held out of train when a source has none
TEST_HOLDOUT_SEED = 0  # npz:PATH?holdout=F: the seed of the test part held out of val (fixed on purpose)
SYNTHETIC_COUNTS = {"train": (1214, 3494), "val": (135, 389), "test": (234, 390)}  # as PneumoniaMNIST
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"
PNEUMONIAMNIST_MD5 = {  # from medmnist/info.py (MedMNIST 3.0.2), keyed by image size
    28: "28209eda62fecd6e6a2d98b1501bb15f",
    64: "8f4eceb4ccffa70c672198ea285246c6",
    128: "05b46931834c231683c68f40c47b2971",
    224: "d6a3c71de1b945ea11211b03746c1fe1",
}


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


@dataclass(frozen=True)
class Dataset:
    source: str  # as given, e.g. "synthetic", "npz:/p/x.npz"
    name: str  # human readable, e.g. "PneumoniaMNIST 28 px"
    synthetic: bool
    image_size: int
    train: Split
    val: Split
    test: Split

    def summary(self) -> dict:
        splits = {s: {"n": sp.n, "normal": sp.normal, "pneumonia": sp.pneumonia}
                  for s, sp in zip(SPLITS, (self.train, self.val, self.test), strict=True)}
        return {"source": self.source, "name": self.name, "synthetic": self.synthetic,
                "image_size": self.image_size, "splits": splits}


def load(source: str, image_size: int = 28) -> Dataset:
    """The dataset a source string names, at image_size x image_size; cached per process.

    The cache hands every caller the same tensors: treat them as read-only.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise DataError(f"{source}: image_size must be a positive integer, got {image_size!r}")
    return _load(str(source), int(image_size))


def clear_cache() -> None:
    """Forget every dataset `load` has cached (e.g. after the files behind a source changed)."""
    _load.cache_clear()


@functools.lru_cache(maxsize=4)  # a sweep loads its dataset once; 224 px datasets are large
def _load(source: str, size: int) -> Dataset:
    scheme, _, arg = source.partition(":")
    if scheme == "synthetic":
        seed = _int_arg(source, arg, default=0)
        if seed < 0:
            raise DataError(f"{source}: the synthetic data seed must be >= 0")
        name = f"synthetic{f' seed {seed}' if seed else ''} (procedural, not real X-rays)"
        splits = {s: _synthetic_split(SYNTHETIC_COUNTS[s], seed, i, size) for i, s in enumerate(SPLITS)}
        return Dataset(source, name, True, size, **splits)
    if scheme == "pneumoniamnist":
        file_size = _int_arg(source, arg, default=28)
        if file_size not in PNEUMONIAMNIST_MD5:
            raise DataError(f"{source}: PneumoniaMNIST comes in sizes {', '.join(map(str, PNEUMONIAMNIST_MD5))}")
        path = _pneumoniamnist_file(file_size)
        return Dataset(source, f"PneumoniaMNIST {file_size} px", False, size, **_npz_splits(path, size))
    if scheme in ("npz", "npy", "folder") and arg:
        path = Path(arg).expanduser()
        if scheme == "npz":
            path, fraction = _npz_query(source, arg)
            name = f"MedMNIST npz {path.name}"
            if fraction is not None:
                name += (f" (test = {fraction:.0%} of val held out, stratified, seed {TEST_HOLDOUT_SEED};"
                         " not the official test split)")
            return Dataset(source, name, False, size, **_npz_splits(path, size, fraction))
        if scheme == "npy":
            return Dataset(source, f"course npy {path}", False, size, **_npy_splits(path, size))
        return Dataset(source, f"image folder {path}", False, size, **_folder_splits(path, size))
    raise DataError(f"unknown data source {source!r}; allowed: {', '.join(SCHEMES)}")


def _int_arg(source: str, arg: str, default: int) -> int:
    if not arg:
        return default
    try:
        return int(arg)
    except ValueError:
        raise DataError(f"{source}: {arg!r} is not an integer") from None


def _npz_query(source: str, arg: str) -> tuple[Path, float | None]:
    """`PATH` or `PATH?holdout=F` -> (path, F or None); F must lie in (0, 1)."""
    path, _, query = arg.partition("?")
    if not query:
        return Path(path).expanduser(), None
    key, _, value = query.partition("=")
    if key != "holdout":
        raise DataError(f"{source}: unknown option {key!r}; allowed: npz:PATH?holdout=F with F in (0, 1), e.g. 0.5")
    try:
        fraction = float(value)
    except ValueError:
        fraction = float("nan")
    if not 0 < fraction < 1:
        raise DataError(f"{source}: holdout={value!r} must be a fraction in (0, 1), e.g. 0.5")
    return Path(path).expanduser(), fraction


def load_pair(normal_path, pneumonia_path, image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled test set from two sources, normal first: x (N, 1, H, W) float32 in [0, 1], y (N,) int64.

    Each path is an .npy array (N, H, W) (the course's test_normal.npy / test_pneumonia.npy) or a
    folder of images. image_size None keeps the stored size (which must then agree).
    """
    normal, pneumonia = _class_images(Path(normal_path), image_size), _class_images(Path(pneumonia_path), image_size)
    if normal.shape[1:] != pneumonia.shape[1:]:
        raise DataError(f"{normal_path} holds {_hw(normal)} images but {pneumonia_path} holds {_hw(pneumonia)}; "
                        "pass an image_size to resize both")
    split = _labelled(normal, pneumonia)
    return split.x, split.y


def holdout(split: Split, where: str, fraction: float = VAL_FRACTION, seed: int = VAL_SEED) -> tuple[Split, Split]:
    """Split `split` into (kept, held out), stratified by class: the held part is about `fraction` of each."""
    y = split.y.numpy()
    held = np.zeros(len(y), dtype=bool)
    rng = np.random.default_rng(seed)
    for label in (0, 1):
        index = np.flatnonzero(y == label)
        if len(index) < 2:
            raise DataError(f"{where}: too few {CLASSES[label]} images ({len(index)}) to split in two")
        held[rng.permutation(index)[:min(len(index) - 1, max(1, round(fraction * len(index))))]] = True
    keep, held = torch.from_numpy(~held), torch.from_numpy(held)
    return (Split(split.x[keep].contiguous(), split.y[keep]),
            Split(split.x[held].contiguous(), split.y[held]))


# --- checks and conversion, shared by every file source -------------------------------------------

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


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# --- npz (MedMNIST) ---------------------------------------------------------------------------------

def _npz_splits(path: Path, size: int, test_fraction: float | None = None) -> dict[str, Split]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: a single .npy array, expected an .npz archive")
        with archive:
            arrays = {key: archive[key] for key in archive.files}
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot read npz ({_one_line(err)})") from None
    if test_fraction is None:
        return _medmnist_splits(arrays, str(path), size)
    if any(key.startswith("test_") for key in arrays):
        raise DataError(f"{path}: ?holdout= is for a file without a test split, and this one has one; "
                        f"use npz:{path}")
    splits = _medmnist_splits(arrays, str(path), size, SPLITS[:2])
    splits["val"], splits["test"] = holdout(splits["val"], f"{path} val", test_fraction, TEST_HOLDOUT_SEED)
    return splits


def _medmnist_splits(arrays: dict[str, np.ndarray], where: str, size: int,
                     splits_wanted: tuple[str, ...] = SPLITS) -> dict[str, Split]:
    """Splits from MedMNIST keys; every wanted split must be there (see `holdout` for one that is not)."""
    missing = [f"{s}_{k}" for s in splits_wanted for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        hint = ""
        if set(missing) == {"test_images", "test_labels"}:
            hint = f"; to hold out part of val as a test stand-in, use npz:{where}?holdout=0.5"
        raise DataError(f"{where}: missing keys {', '.join(missing)} "
                        f"(a MedMNIST npz holds train_, val_ and test_ images and labels){hint}")
    splits = {}
    for s in splits_wanted:
        x = _images(arrays[f"{s}_images"], f"{where} {s}_images")
        y = _labels(arrays[f"{s}_labels"], len(x), f"{where} {s}_labels")
        splits[s] = _checked(_resize(x, size), y, f"{where} {s}_labels")
    return splits


# --- npy (course format) and folder (Kermany layout) -----------------------------------------------

def _npy_splits(root: Path, size: int) -> dict[str, Split]:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (npy:DIR reads DIR/{{train,val,test}}_{{normal,pneumonia}}.npy)")
    return _class_pair_splits({(s, c): root / f"{s}_{c}.npy" for s in SPLITS for c in CLASSES}, root, size)


def _folder_splits(root: Path, size: int) -> dict[str, Split]:
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (folder:DIR reads DIR/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/)")
    if all((root / c).is_dir() for c in FOLDER_CLASSES):
        raise DataError(f"{root}: NORMAL/ and PNEUMONIA/ at the top level make one labelled set, not train/test; "
                        f"evaluate on it with load_pair('{root / 'NORMAL'}', '{root / 'PNEUMONIA'}', image_size)")
    paths = {(s, c): root / s / folder for s in SPLITS for c, folder in zip(CLASSES, FOLDER_CLASSES, strict=True)}
    return _class_pair_splits(paths, root, size)


def _class_pair_splits(paths: dict[tuple[str, str], Path], root: Path, size: int) -> dict[str, Split]:
    """Splits from one file or folder per (split, class); val is optional as a pair, else held out of train."""
    missing = [str(p) for (s, _), p in paths.items() if not p.exists() and (s != "val" or _any_val(paths))]
    if missing:
        raise DataError(f"{root}: missing {', '.join(missing)}")
    splits = {s: _labelled(*(_class_images(paths[s, c], size) for c in CLASSES))
              for s in SPLITS if s != "val" or _any_val(paths)}
    if "val" not in splits:
        splits["train"], splits["val"] = holdout(splits["train"], str(paths["train", "normal"].parent))
    return splits


def _any_val(paths: dict[tuple[str, str], Path]) -> bool:
    return any(paths["val", c].exists() for c in CLASSES)


def _class_images(path: Path, size: int | None) -> torch.Tensor:
    """All images of one class: an .npy array or a folder of image files, resized to size."""
    if path.is_dir():
        return _images(_read_folder(path, size), str(path))
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read npy ({_one_line(err)})") from None
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
        raise DataError(f"{path}: unreadable image ({_one_line(err)})") from None


# --- PneumoniaMNIST from the cache or Zenodo --------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or Path.home() / ".cache" / "cxr").expanduser()


def _pneumoniamnist_file(size: int) -> Path:
    name = "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"
    path = cache_dir() / name
    if path.exists():
        return path
    url = MEDMNIST_URL.format(name=name)
    import pooch  # imported here: only a download needs it

    try:
        pooch.retrieve(url, known_hash=f"md5:{PNEUMONIAMNIST_MD5[size]}", fname=name, path=path.parent,
                       progressbar=False)
    except (OSError, ValueError) as err:
        raise DataError(f"pneumoniamnist:{size}: {path} is missing and downloading it failed ({_one_line(err)}); "
                        f"download {url} and put it at {path}") from None
    return path


# --- synthetic: procedural chest radiographs --------------------------------------------------------

def _synthetic_split(counts: tuple[int, int], seed: int, split_index: int, size: int) -> Split:
    """Images and labels of one split. Who the "patients" are depends on (seed, split) only, not on size."""
    rng = np.random.default_rng([seed, split_index])
    y = rng.permutation(np.repeat([0, 1], counts))
    patients = _synthetic_patients(rng, y)
    noise = np.random.default_rng([seed, split_index, size])
    chunk = max(1, 2**21 // (size * size))  # bounds the memory of the temporaries
    x = np.concatenate([_render({k: v[i:i + chunk] for k, v in patients.items()}, size, noise)
                        for i in range(0, len(y), chunk)])
    return Split(torch.from_numpy(x)[:, None].contiguous(), torch.from_numpy(y.astype(np.int64)))


def _synthetic_patients(rng: np.random.Generator, y: np.ndarray) -> dict[str, np.ndarray]:
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


def _render(params: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
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
