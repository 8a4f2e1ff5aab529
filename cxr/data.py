"""Data sources: one string names the data, `load` turns it into tensors (DESIGN.md "Data sources").

The sources are one table, `SOURCES` (at the end): a `Source` per scheme with its usage, such as
"npz:PATH[?holdout=F]", a one-line help and its loader. `SCHEMES`, `help_text()`, `usage_line()` and
the list in the error for an unknown source derive from it: a new source is one entry plus its loader.

Every split becomes x (N, 1, S, S) float32 in [0, 1] (uint8 divided by 255) and y (N,) int64 with
normal 0 and pneumonia 1. Where a source has no val split, val is a stratified 10% of train held out
with seed 0 (`holdout`). `load_pair` reads one labelled set (such as kermany-fullres) from .npy files
or image folders. Bad input raises DataError, one line naming the file and the problem. The checks and
conversions of arrays and image files that every file source shares live in cxr.arrays, and so do the limits:
image_size in MIN_IMAGE_SIZE..MAX_IMAGE_SIZE (8..1024), MAX_ARRAY_BYTES (4 GiB) for one file or folder, and
PIL.Image.MAX_IMAGE_PIXELS for one image. An .npz is read member by member, each member's header checked
before any is loaded (`_read_npz`); whatever fails while loading, running out of memory included, is a
DataError.
"""
from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr.arrays import (
    CLASSES,
    DataError,
    Split,
    _checked,
    _class_images,
    _hw,
    _image_size,
    _images,
    _labelled,
    _labels,
    _memory,
    _npy_header,
    _reading,
    _resize,
    _within_limit,
)
from cxr.arrays import IMAGE_SUFFIXES as IMAGE_SUFFIXES  # re-exported: the constants stay cxr.data's
from cxr.errors import one_line
from cxr.synthetic import GENERATOR_VERSION, SYNTHETIC_COUNTS, make_split

SPLITS = ("train", "val", "test")
FOLDER_CLASSES = ("NORMAL", "PNEUMONIA")
VAL_FRACTION, VAL_SEED = 0.1, 0  # the val split held out of train when a source has none
TEST_HOLDOUT_SEED = 0  # npz:PATH?holdout=F: the seed of the test part held out of val (fixed on purpose)
MEDMNIST_URL = "https://zenodo.org/records/10519652/files/{name}?download=1"
PNEUMONIAMNIST_MD5 = {  # from medmnist/info.py (MedMNIST 3.0.2), keyed by image size
    28: "28209eda62fecd6e6a2d98b1501bb15f",
    64: "8f4eceb4ccffa70c672198ea285246c6",
    128: "05b46931834c231683c68f40c47b2971",
    224: "d6a3c71de1b945ea11211b03746c1fe1",
}


@dataclass(frozen=True)
class Dataset:
    source: str  # as given, e.g. "synthetic", "npz:/p/x.npz"
    name: str  # human readable, e.g. "PneumoniaMNIST 28 px"
    synthetic: bool
    image_size: int
    train: Split
    val: Split
    test: Split
    generated_by: str = ""  # for data made by code: what defines it (generator, version, seed, size)

    @functools.cached_property
    def fingerprint(self) -> dict[str, str]:
        """{"train", "val", "test"}: 16 hex digits of sha256 over each split's images and labels (shape,
        dtype, bytes), or over `generated_by` and the split's name for generated data. Part of a result's
        identity: a result is served again only for data of the same content."""
        out = {}
        for name, split in zip(SPLITS, (self.train, self.val, self.test), strict=True):
            h = hashlib.sha256()
            if self.generated_by:
                h.update(f"{self.generated_by} {name}".encode())
            else:
                for t in (split.x, split.y):
                    t = t.detach().cpu().contiguous()
                    h.update(f"{t.dtype} {tuple(t.shape)}".encode())
                    h.update(t.numpy().tobytes())
            out[name] = h.hexdigest()[:16]
        return out

    def summary(self) -> dict:
        splits = {s: {"n": sp.n, "normal": sp.normal, "pneumonia": sp.pneumonia}
                  for s, sp in zip(SPLITS, (self.train, self.val, self.test), strict=True)}
        return {"source": self.source, "name": self.name, "synthetic": self.synthetic,
                "image_size": self.image_size, "splits": splits}


@dataclass(frozen=True)
class Source:
    """A source `scheme[:ARG]`, loaded by `load(source as given, ARG, image size)`. `usage` has at most one
    optional part, in trailing brackets ("npz:PATH[?holdout=F]"); a colon outside them makes ARG required."""

    scheme: str
    usage: str
    help: str  # one line
    load: Callable[[str, str, int], Dataset]

    @property
    def forms(self) -> tuple[str, ...]:
        """The usage spelled out: "npz:PATH[?holdout=F]" -> ("npz:PATH", "npz:PATH?holdout=F")."""
        base, bracket, optional = self.usage.partition("[")
        return (base, base + optional.removesuffix("]")) if bracket else (base,)

    @property
    def needs_arg(self) -> bool:
        return ":" in self.usage.partition("[")[0]


def load(source: str, image_size: int = 28) -> Dataset:
    """The dataset a source string names, at image_size x image_size; cached per process.

    The cache hands every caller the same tensors: treat them as read-only.
    """
    size = _image_size(image_size, source)
    with _memory(source):
        return _load(str(source), size)


def clear_cache() -> None:
    """Forget every dataset `load` has cached (e.g. after the files behind a source changed)."""
    _load.cache_clear()


@functools.lru_cache(maxsize=4)  # a sweep loads its dataset once; 224 px datasets are large
def _load(source: str, size: int) -> Dataset:
    scheme, _, arg = source.partition(":")
    entry = SOURCES.get(scheme)
    if entry is None or (entry.needs_arg and not arg):
        raise DataError(f"unknown data source {source!r}; allowed: {', '.join(_forms())}")
    return entry.load(source, arg, size)


def help_text() -> str:
    """One line per data source: its usage, then its help (for a --data help that keeps line breaks)."""
    width = max(len(s.usage) for s in SOURCES.values())
    return "\n".join(f"{s.usage:<{width}}  {s.help}" for s in SOURCES.values())


def usage_line() -> str:
    """Every source's usage on one line: "synthetic[:SEED] | pneumoniamnist[:SIZE] | npz:PATH[?holdout=F] | ..."."""
    return " | ".join(s.usage for s in SOURCES.values())


def _forms() -> tuple[str, ...]:
    return tuple(form for s in SOURCES.values() for form in s.forms)


def load_pair(normal_path, pneumonia_path, image_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A labelled test set from two sources, normal first: x (N, 1, H, W) float32 in [0, 1], y (N,) int64.

    Each path is an .npy array (N, H, W) (the course's test_normal.npy / test_pneumonia.npy) or a
    folder of images. image_size None keeps the stored size (which must then agree).
    """
    if image_size is not None:
        image_size = _image_size(image_size)
    with _memory(f"{normal_path} and {pneumonia_path}"):
        normal = _class_images(Path(normal_path), image_size)
        pneumonia = _class_images(Path(pneumonia_path), image_size)
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


# --- synthetic and pneumoniamnist ---------------------------------------------------------------------

def _synthetic(source: str, arg: str, size: int) -> Dataset:
    """Procedural radiographs (cxr.synthetic). The data seed is not the training seed: runs share one test set."""
    seed = _int_arg(source, arg, default=0)
    if seed < 0:
        raise DataError(f"{source}: the synthetic data seed must be >= 0")
    name = f"synthetic{f' seed {seed}' if seed else ''} (procedural, not real X-rays)"
    splits = {s: _synthetic_split(SYNTHETIC_COUNTS[s], seed, i, size) for i, s in enumerate(SPLITS)}
    return Dataset(source, name, True, size, **splits,
                   generated_by=f"cxr.synthetic v{GENERATOR_VERSION} seed {seed} size {size}")


def _synthetic_split(counts: tuple[int, int], seed: int, split_index: int, size: int) -> Split:
    return Split(*make_split(counts, seed, split_index, size))


def _pneumoniamnist(source: str, arg: str, size: int) -> Dataset:
    """The npz from cache_dir(), else downloaded there once, MD5 checked (a cached file is trusted as it is)."""
    file_size = _int_arg(source, arg, default=28)
    if file_size not in PNEUMONIAMNIST_MD5:
        raise DataError(f"{source}: PneumoniaMNIST comes in sizes {', '.join(map(str, PNEUMONIAMNIST_MD5))}")
    name = "pneumoniamnist.npz" if file_size == 28 else f"pneumoniamnist_{file_size}.npz"
    path, url = cache_dir() / name, MEDMNIST_URL.format(name=name)
    if not path.exists():
        import pooch  # imported here: only a download needs it

        try:
            pooch.retrieve(url, known_hash=f"md5:{PNEUMONIAMNIST_MD5[file_size]}", fname=name, path=path.parent,
                           progressbar=False)
        except (OSError, ValueError) as err:
            raise DataError(f"pneumoniamnist:{file_size}: {path} is missing and downloading it failed "
                            f"({one_line(err)}); download {url} and put it at {path}") from None
    return Dataset(source, f"PneumoniaMNIST {file_size} px", False, size, **_npz_splits(path, size))


def cache_dir() -> Path:
    return Path(os.environ.get("CXR_DATA_DIR") or Path.home() / ".cache" / "cxr").expanduser()


def _int_arg(source: str, arg: str, default: int) -> int:
    if not arg:
        return default
    try:
        return int(arg)
    except ValueError:
        raise DataError(f"{source}: {arg!r} is not an integer") from None


# --- npz (MedMNIST) ---------------------------------------------------------------------------------

def _npz(source: str, arg: str, size: int) -> Dataset:
    """PATH?holdout=F reads a file without a test split (such as ../shared/data's pneumoniamnist-trainval.npz):
    test is a stratified fraction F of val held out with TEST_HOLDOUT_SEED, val is the rest, and the dataset's
    name says so. Tune on train and the remaining val; report on the held-out part.
    """
    path, _, query = arg.partition("?")
    path, fraction = Path(path).expanduser(), None
    name = f"MedMNIST npz {path.name}"
    if query:
        key, _, value = query.partition("=")
        if key != "holdout":
            raise DataError(f"{source}: unknown option {key!r}; allowed: npz:PATH?holdout=F with F in (0, 1), "
                            "e.g. 0.5")
        try:
            fraction = float(value)
        except ValueError:
            fraction = float("nan")
        if not 0 < fraction < 1:
            raise DataError(f"{source}: holdout={value!r} must be a fraction in (0, 1), e.g. 0.5")
        name += (f" (test = {fraction:.0%} of val held out, stratified, seed {TEST_HOLDOUT_SEED};"
                 " not the official test split)")
    return Dataset(source, name, False, size, **_npz_splits(path, size, fraction))


def _npz_splits(path: Path, size: int, test_fraction: float | None = None) -> dict[str, Split]:
    """The splits of a MedMNIST npz; with test_fraction, of one without a test split (test held out of val)."""
    arrays = _read_npz(path)
    if test_fraction is not None and any(key.startswith("test_") for key in arrays):
        raise DataError(f"{path}: ?holdout= is for a file without a test split, and this one has one; "
                        f"use npz:{path}")
    wanted = SPLITS if test_fraction is None else SPLITS[:2]
    missing = [f"{s}_{k}" for s in wanted for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        hint = ""
        if set(missing) == {"test_images", "test_labels"}:
            hint = f"; to hold out part of val as a test stand-in, use npz:{path}?holdout=0.5"
        raise DataError(f"{path}: missing keys {', '.join(missing)} "
                        f"(a MedMNIST npz holds train_, val_ and test_ images and labels){hint}")
    splits = {}
    for s in wanted:
        with _memory(path):
            x = _images(arrays.pop(f"{s}_images"), f"{path} {s}_images")
            y = _labels(arrays.pop(f"{s}_labels"), len(x), f"{path} {s}_labels")
            splits[s] = _checked(_resize(x, size), y, f"{path} {s}_labels")
    if test_fraction is not None:
        splits["val"], splits["test"] = holdout(splits["val"], f"{path} val", test_fraction, TEST_HOLDOUT_SEED)
    return splits


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz by name (member name less .npy). Every member must be an .npy array; each one's header
    is checked against its declared size (ZipInfo.file_size) and all of them together against MAX_ARRAY_BYTES
    before any array is loaded."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    with _reading(path, "cannot read npz"):
        with open(path, "rb") as f:
            if f.read(6) == b"\x93NUMPY":
                raise DataError(f"{path}: a single .npy array, expected an .npz archive")
        with zipfile.ZipFile(path) as archive:
            members, need = archive.infolist(), 0
            for info in members:
                where = f"{path} member {info.filename!r}"
                if not info.filename.endswith(".npy"):
                    raise DataError(f"{where}: not an .npy array (an npz holds only .npy members)")
                with _reading(where, "not a readable .npy array"), archive.open(info) as member:
                    need += _npy_header(member, where, info.file_size)
            _within_limit(need, path, f"its {len(members)} arrays")
            arrays = {}
            for info in members:
                with _reading(f"{path} member {info.filename!r}", "cannot read"), archive.open(info) as member:
                    arrays[info.filename.removesuffix(".npy")] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays


# --- npy (course format) and folder (Kermany layout) -----------------------------------------------

def _npy(source: str, arg: str, size: int) -> Dataset:
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (npy:DIR reads DIR/{{train,val,test}}_{{normal,pneumonia}}.npy)")
    splits = _class_pair_splits({(s, c): root / f"{s}_{c}.npy" for s in SPLITS for c in CLASSES}, root, size)
    return Dataset(source, f"course npy {root}", False, size, **splits)


def _folder(source: str, arg: str, size: int) -> Dataset:
    """Images of any size, grayscale or RGB. NORMAL/ and PNEUMONIA/ at the top level are one set: see load_pair."""
    root = Path(arg).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: not a directory (folder:DIR reads DIR/{{train,val,test}}/{{NORMAL,PNEUMONIA}}/)")
    if all((root / c).is_dir() for c in FOLDER_CLASSES):
        raise DataError(f"{root}: NORMAL/ and PNEUMONIA/ at the top level make one labelled set, not train/test; "
                        f"evaluate on it with load_pair('{root / 'NORMAL'}', '{root / 'PNEUMONIA'}', image_size)")
    paths = {(s, c): root / s / folder for s in SPLITS for c, folder in zip(CLASSES, FOLDER_CLASSES, strict=True)}
    return Dataset(source, f"image folder {root}", False, size, **_class_pair_splits(paths, root, size))


def _class_pair_splits(paths: dict[tuple[str, str], Path], root: Path, size: int) -> dict[str, Split]:
    """Splits from one file or folder per (split, class); val is optional as a pair, else held out of train."""
    has_val = any(paths["val", c].exists() for c in CLASSES)
    missing = [str(p) for (s, _), p in paths.items() if not p.exists() and (s != "val" or has_val)]
    if missing:
        raise DataError(f"{root}: missing {', '.join(missing)}")
    splits = {s: _labelled(*(_class_images(paths[s, c], size) for c in CLASSES))
              for s in SPLITS if s != "val" or has_val}
    if not has_val:
        splits["train"], splits["val"] = holdout(splits["train"], str(paths["train", "normal"].parent))
    return splits


# --- the table of sources: one entry per scheme ----------------------------------------------------

SOURCES: dict[str, Source] = {source.scheme: source for source in (
    Source("synthetic", "synthetic[:SEED]",
           "procedural chest radiographs, no files or network; SEED (default 0) is the data seed", _synthetic),
    Source("pneumoniamnist", "pneumoniamnist[:SIZE]",
           "MedMNIST PneumoniaMNIST, SIZE 28 (default), 64, 128 or 224, from $CXR_DATA_DIR or downloaded there",
           _pneumoniamnist),
    Source("npz", "npz:PATH[?holdout=F]",
           "a MedMNIST-format npz; ?holdout=F for one without a test split: test = a stratified fraction F of val",
           _npz),
    Source("npy", "npy:DIR", "the course format DIR/{train,val,test}_{normal,pneumonia}.npy; val optional", _npy),
    Source("folder", "folder:DIR",
           "the Kermany layout DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg|jpg|png; val optional", _folder),
)}
SCHEMES = _forms()  # every usage spelled out, in table order: "synthetic", "synthetic:SEED", "pneumoniamnist", ...
