"""cxr.data: every source, its checks and its errors, on tiny files made here (plus ../shared/data)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr import data
from cxr.data import DataError
from cxr.errors import CxrError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data sits beside the checkout)")
    return path


def write_npy_dir(root: Path, n=(20, 30), size=28, dtype=np.uint8, val=True) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test") if val else ("train", "test"):
        for cls, count in zip(("normal", "pneumonia"), n, strict=True):
            array = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
            np.save(root / f"{split}_{cls}.npy", array if dtype == np.uint8 else (array / 255).astype(dtype))
    return root


def write_npz(path: Path, n=10, size=28, **override) -> Path:
    rng = np.random.default_rng(1)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).astype(np.uint8)[:, None]  # MedMNIST: (N, 1)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def write_image(path: Path, size: tuple[int, int], mode: str, value: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)
    return path


# --- synthetic ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def synthetic() -> data.Dataset:
    return data.load("synthetic")


def test_synthetic_has_pneumoniamnist_sizes_and_valid_tensors(synthetic):
    assert synthetic.synthetic and "not real" in synthetic.name and synthetic.image_size == 28
    for split, (normal, pneumonia) in data.SYNTHETIC_COUNTS.items():
        s = getattr(synthetic, split)
        assert (s.normal, s.pneumonia, s.n) == (normal, pneumonia, normal + pneumonia)
        assert s.x.shape == (s.n, 1, 28, 28) and s.x.dtype == torch.float32 and s.x.is_contiguous()
        assert s.y.dtype == torch.int64 and set(s.y.unique().tolist()) == {0, 1}
        assert 0 <= s.x.min() and s.x.max() <= 1 and s.x.std() > 0.1
    assert synthetic.summary()["splits"]["test"] == {"n": 624, "normal": 234, "pneumonia": 390}


def test_synthetic_is_deterministic_per_seed():
    a = data._synthetic_split((5, 7), 0, 2, 28)
    b = data._synthetic_split((5, 7), 0, 2, 28)
    c = data._synthetic_split((5, 7), 1, 2, 28)
    assert a.x.numpy().tobytes() == b.x.numpy().tobytes() and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert not torch.equal(a.x, data._synthetic_split((5, 7), 0, 1, 28).x)  # splits differ too


def test_synthetic_seed_in_source_and_other_sizes():
    assert data.load("synthetic:0") is not data.load("synthetic")  # a different key, the same data
    assert torch.equal(data.load("synthetic:0").test.x, data.load("synthetic").test.x)
    x = data._synthetic_split((3, 3), 0, 0, 64).x
    assert x.shape == (6, 1, 64, 64) and 0 <= x.min() and x.max() <= 1
    with pytest.raises(DataError, match="synthetic:abc"):
        data.load("synthetic:abc")


def test_synthetic_classes_differ_but_not_by_plain_brightness(synthetic):
    x, y = synthetic.test.x, synthetic.test.y
    lungs = x[:, 0, 8:20, 4:24].mean(dim=(1, 2))
    assert lungs[y == 1].mean() > lungs[y == 0].mean() + 0.02  # opacities brighten the lung fields
    brightness = x.mean(dim=(1, 2, 3))
    best = max(((brightness > t) == (y == 1)).float().mean().item() for t in torch.linspace(0, 1, 101))
    assert best < 0.75  # a brightness threshold is no better than guessing "pneumonia" (0.625)


# The synthetic data at 28 px, recorded before the renderer moved from cxr.data to cxr.synthetic. numpy and torch
# pick float32 SIMD kernels (exp, tanh, bicubic, ...) by CPU, so the pixels' last bits differ between machines
# (up to about 1e-6): labels are compared exactly, pixels by their sums.
SYNTHETIC_28 = {  # split: (sha256 of y, sum of x, sum of x ** 2)
    "train": ("2e13724ea3936722b5d66f0ab0d5ead987c13bccc5baf651b2fa1c19687bf116", 1829372.90235, 1055611.84674),
    "val": ("08e975a4385f315720ae5da9f4c1112fab60e3e9e5071a9cfb7cf99a5b641cf5", 202408.406398, 115872.840729),
    "test": ("72b53a4dcb635b377865bd479cac9d016b28a6cc980989c932bbb190d4f9435e", 238313.117542, 135065.755000),
}


def test_synthetic_data_is_unchanged(synthetic):
    for split, (y_sha256, x_sum, x_squares) in SYNTHETIC_28.items():
        s = getattr(synthetic, split)
        x = s.x.double()
        assert hashlib.sha256(s.y.numpy().tobytes()).hexdigest() == y_sha256, split
        assert x.sum().item() == pytest.approx(x_sum, rel=1e-7), split  # machines differ by about 5e-9
        assert (x * x).sum().item() == pytest.approx(x_squares, rel=1e-7), split


# --- npy (course format) -----------------------------------------------------------------------------

def test_npy_round_trip_uint8(tmp_path):
    root = write_npy_dir(tmp_path / "npy")
    d = data.load(f"npy:{root}")
    normal = np.load(root / "test_normal.npy")
    assert (d.test.normal, d.test.pneumonia, d.val.n) == (20, 30, 50)
    assert torch.equal(d.test.y[:20], torch.zeros(20, dtype=torch.int64))  # normal first
    assert torch.allclose(d.test.x[:20, 0], torch.from_numpy(normal / 255).float())
    assert d.name.startswith("course npy") and not d.synthetic


def test_npy_float_input_and_resize_both_ways(tmp_path):
    root = write_npy_dir(tmp_path / "f", size=56, dtype=np.float32)
    x56 = torch.from_numpy(np.load(root / "train_normal.npy"))
    d = data.load(f"npy:{root}", image_size=28)
    assert d.train.x.shape == (50, 1, 28, 28)
    assert torch.allclose(d.train.x[:20, 0, 0, 0], x56[:, :2, :2].mean(dim=(1, 2)))  # area = block mean
    grown = data.load(f"npy:{root}", image_size=64).train.x
    assert grown.shape == (50, 1, 64, 64) and 0 <= grown.min() and grown.max() <= 1


@pytest.mark.parametrize("shape", [(4, 28, 28, 1), (4, 1, 28, 28)])
def test_npy_accepts_channel_axes(tmp_path, shape):
    a, b = np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    x, y = data.load_pair(tmp_path / "a.npy", tmp_path / "b.npy")
    assert x.shape == (8, 1, 28, 28) and y.tolist() == [0] * 4 + [1] * 4 and x[4:].min() == 1


@pytest.mark.parametrize("dtype", ["<u2", ">u2"])
def test_npy_and_npz_uint16_images_are_scaled_by_65535(tmp_path, dtype):
    pixels = np.random.default_rng(0).integers(0, 65536, (4, 8, 8)).astype(dtype)
    np.save(tmp_path / "a.npy", pixels)
    np.save(tmp_path / "b.npy", np.full((2, 8, 8), 65535, dtype))
    x, _ = data.load_pair(tmp_path / "a.npy", tmp_path / "b.npy")
    assert torch.equal(x[:4, 0], torch.from_numpy(pixels.astype(np.float32) / 65535)) and x[4:].min() == 1
    path = write_npz(tmp_path / "m.npz", train_images=np.concatenate([pixels] * 3)[:10])
    train = data.load(f"npz:{path}", image_size=8).train.x
    assert torch.equal(train[:4, 0], torch.from_numpy(pixels.astype(np.float32) / 65535))  # not saturated or refused


def test_npy_without_val_holds_out_a_stratified_tenth_of_train(tmp_path):
    root = write_npy_dir(tmp_path / "nv", n=(20, 30), val=False)
    d = data.load(f"npy:{root}")
    assert (d.val.normal, d.val.pneumonia) == (2, 3) and (d.train.normal, d.train.pneumonia) == (18, 27)
    again = data.holdout(data._labelled(*(data._class_images(root / f"train_{c}.npy", 28) for c in data.CLASSES)),
                         "x")
    assert torch.equal(again[1].x, d.val.x)  # seeded: the same images every time


@pytest.mark.parametrize("bad, name, message", [
    (np.zeros((3, 28), np.uint8), "train_normal.npy", "shape"),
    (np.full((3, 28, 28), 1.5, np.float32), "train_normal.npy", r"\[0, 1\]"),
    (np.full((3, 28, 28), np.nan, np.float32), "test_pneumonia.npy", "NaN"),
    (np.zeros((0, 28, 28), np.uint8), "test_normal.npy", "no images"),
    (np.zeros((3, 28, 28), np.int64), "train_pneumonia.npy", "dtype"),
])
def test_npy_bad_arrays_name_the_file(tmp_path, bad, name, message):
    root = write_npy_dir(tmp_path / "bad", n=(3, 3))
    np.save(root / name, bad)
    with pytest.raises(DataError, match=message) as err:
        data.load(f"npy:{root}")
    assert name in str(err.value) and "\n" not in str(err.value)


def test_npy_missing_and_corrupt_files_name_the_file(tmp_path):
    root = write_npy_dir(tmp_path / "m", n=(3, 3))
    (root / "test_pneumonia.npy").unlink()
    with pytest.raises(DataError, match="missing .*test_pneumonia.npy"):
        data.load(f"npy:{root}")
    (root / "test_pneumonia.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(DataError, match="test_pneumonia.npy: cannot read"):
        data.load(f"npy:{root}")
    (root / "val_normal.npy").unlink()  # val is optional as a pair, not half of it
    with pytest.raises(DataError, match="val_normal.npy"):
        data.load(f"npy:{root}")
    with pytest.raises(DataError, match="not a directory"):
        data.load(f"npy:{tmp_path / 'nowhere'}")


# --- npz (MedMNIST) ----------------------------------------------------------------------------------

def test_npz_round_trip(tmp_path):
    path = write_npz(tmp_path / "m.npz", train_images=np.zeros((10, 28, 28, 1), np.uint8))
    d = data.load(f"npz:{path}")
    assert (d.train.n, d.val.normal, d.test.pneumonia) == (10, 5, 5) and d.name == "MedMNIST npz m.npz"
    assert d.train.x.max() == 0 and d.val.y.tolist() == [0, 1] * 5


@pytest.mark.parametrize("override, message", [
    ({"test_images": None, "test_labels": None}, "missing keys test_images, test_labels"),
    ({"val_labels": np.full((10, 1), 2, np.uint8)}, "val_labels: labels must be 0 .* found 2"),
    ({"val_labels": np.full(10, np.nan)}, "val_labels: labels must be 0"),
    ({"train_labels": np.ones(10, np.uint8)}, "train_labels: no normal"),
    ({"test_labels": np.zeros(9, np.uint8)}, r"test_labels: labels have shape \(9,\)"),
    ({"train_images": np.zeros((10, 28), np.uint8)}, "train_images: images have shape"),
])
def test_npz_bad_content_names_file_and_key(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(DataError, match=message) as err:
        data.load(f"npz:{path}")
    assert "bad.npz" in str(err.value)


def test_npz_unreadable(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="junk.npz: cannot read npz"):
        data.load(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(DataError, match="absent.npz: no such file"):
        data.load(f"npz:{tmp_path / 'absent.npz'}")
    np.save(tmp_path / "one.npy", np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="one.npy: a single .npy array"):
        data.load(f"npz:{tmp_path / 'one.npy'}")


@pytest.mark.shared_data
def test_shared_trainval_npz_has_no_test_split():
    path = shared("pneumoniamnist-trainval.npz")
    with pytest.raises(DataError, match="pneumoniamnist-trainval.npz: missing keys test_images, test_labels"):
        data.load(f"npz:{path}")


def write_trainval_npz(path: Path, val=(30, 50)) -> Path:
    """A MedMNIST npz without a test split; val image i is filled with the value i (each is unique)."""
    labels = np.repeat([0, 1], val).astype(np.uint8)
    values = np.arange(len(labels), dtype=np.uint8)
    return write_npz(path, n=20, test_images=None, test_labels=None,
                     val_images=np.broadcast_to(values[:, None, None], (len(labels), 28, 28)).copy(),
                     val_labels=labels[:, None])


def rows(split: data.Split) -> set[tuple[int, int]]:
    """(image value, label) of every image of a split made by write_trainval_npz."""
    return {(round(float(x[0, 0, 0]) * 255), int(y)) for x, y in zip(split.x, split.y, strict=True)}


def test_npz_without_test_split_hints_at_holdout(tmp_path):
    path = write_trainval_npz(tmp_path / "tv.npz")
    hint = r"tv.npz: missing keys test_images, test_labels .*; to hold out .* use npz:.*tv.npz\?holdout=0.5"
    with pytest.raises(DataError, match=hint):
        data.load(f"npz:{path}")


def test_npz_holdout_splits_val_into_stratified_disjoint_val_and_test(tmp_path):
    path = write_trainval_npz(tmp_path / "tv.npz", val=(30, 50))
    d = data.load(f"npz:{path}?holdout=0.4")
    assert (d.test.normal, d.test.pneumonia) == (12, 20) and (d.val.normal, d.val.pneumonia) == (18, 30)
    whole = {(i, int(i >= 30)) for i in range(80)}
    assert rows(d.val) | rows(d.test) == whole and not rows(d.val) & rows(d.test)  # disjoint, nothing lost
    assert d.train.n == 20 and "test = 40% of val held out" in d.name and "not the official test" in d.name
    assert d.summary()["name"] == d.name and d.source == f"npz:{path}?holdout=0.4"
    data.clear_cache()
    again = data.load(f"npz:{path}?holdout=0.4")
    assert again is not d and torch.equal(again.test.x, d.test.x) and torch.equal(again.val.y, d.val.y)  # fixed seed
    half = data.load(f"npz:{path}?holdout=0.5")
    assert (half.test.normal, half.test.pneumonia, half.val.normal, half.val.pneumonia) == (15, 25, 15, 25)


def test_npz_holdout_keeps_both_classes_on_both_sides(tmp_path):
    d = data.load(f"npz:{write_trainval_npz(tmp_path / 'small.npz', val=(2, 3))}?holdout=0.9")
    assert (d.val.normal, d.val.pneumonia, d.test.normal, d.test.pneumonia) == (1, 1, 1, 2)
    with pytest.raises(DataError, match="small1.npz val: too few normal images"):
        data.load(f"npz:{write_trainval_npz(tmp_path / 'small1.npz', val=(1, 3))}?holdout=0.5")


@pytest.mark.parametrize("query, message", [
    ("holdout=0", r"holdout='0' must be a fraction in \(0, 1\)"),
    ("holdout=1", "must be a fraction"),
    ("holdout=half", "must be a fraction"),
    ("holdout=nan", "must be a fraction"),
    ("seed=3", "unknown option 'seed'; allowed: npz:PATH\\?holdout=F"),
])
def test_npz_holdout_bad_options(tmp_path, query, message):
    path = write_trainval_npz(tmp_path / "tv.npz")
    with pytest.raises(DataError, match=message):
        data.load(f"npz:{path}?{query}")


def test_npz_holdout_refuses_a_file_with_a_test_split(tmp_path):
    path = write_npz(tmp_path / "full.npz")
    with pytest.raises(DataError, match=r"full.npz: \?holdout= is for a file without a test split"):
        data.load(f"npz:{path}?holdout=0.5")


@pytest.mark.shared_data
def test_shared_trainval_npz_with_holdout_halves_val():
    d = data.load(f"npz:{shared('pneumoniamnist-trainval.npz')}?holdout=0.5")
    assert (d.train.normal, d.train.pneumonia) == (1214, 3494)
    assert (d.val.normal, d.val.pneumonia, d.test.normal, d.test.pneumonia) == (67, 195, 68, 194)


# --- folder (Kermany layout) and load_pair ------------------------------------------------------------

def make_tree(root: Path) -> Path:
    for split in ("train", "test"):
        for i in range(3):  # RGB JPEGs of different sizes, grayscale PNGs
            write_image(root / split / "NORMAL" / f"n{i}.jpeg", (40 + 8 * i, 30), "RGB", 10 * i)
            write_image(root / split / "PNEUMONIA" / f"p{i}.png", (20, 20 + i), "L", 200 + 10 * i)
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    return root


def test_folder_rgb_and_gray_of_any_size(tmp_path):
    d = data.load(f"folder:{make_tree(tmp_path / 'k')}", image_size=16)
    assert d.test.x.shape == (6, 1, 16, 16) and d.test.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert (d.train.n, d.val.n) == (4, 2)  # no val folder: one image per class held out of train
    assert torch.allclose(d.test.x[:3, 0, 8, 8], torch.tensor([0, 10, 20]) / 255, atol=1 / 255)
    assert torch.allclose(d.test.x[3:, 0, 8, 8], torch.tensor([200, 210, 220]) / 255, atol=1 / 255)


def test_folder_errors_name_the_file(tmp_path):
    root = make_tree(tmp_path / "k")
    (root / "test" / "PNEUMONIA" / "p1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match="p1.png: unreadable image"):
        data.load(f"folder:{root}", image_size=16)
    jpeg = root / "train" / "NORMAL" / "n2.jpeg"
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated in the middle of the scan
    with pytest.raises(DataError, match="n2.jpeg: unreadable image"):
        data.load(f"folder:{root}", image_size=16)
    jpeg.unlink()
    for f in (root / "test" / "PNEUMONIA").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="PNEUMONIA: no images"):
        data.load(f"folder:{root}", image_size=16)
    (root / "test" / "PNEUMONIA").rmdir()
    with pytest.raises(DataError, match="missing .*test/PNEUMONIA"):
        data.load(f"folder:{root}", image_size=16)


def test_folder_with_classes_at_top_level_points_to_load_pair(tmp_path):
    root = tmp_path / "flat"
    write_image(root / "NORMAL" / "a.jpeg", (30, 40), "L", 0)
    write_image(root / "NORMAL" / "b.jpeg", (50, 40), "L", 0)
    write_image(root / "PNEUMONIA" / "c.jpeg", (30, 40), "RGB", 255)
    with pytest.raises(DataError, match="load_pair"):
        data.load(f"folder:{root}")
    x, y = data.load_pair(root / "NORMAL", root / "PNEUMONIA", image_size=8)
    assert x.shape == (3, 1, 8, 8) and y.tolist() == [0, 0, 1]
    with pytest.raises(DataError, match="differ in size"):
        data.load_pair(root / "NORMAL", root / "PNEUMONIA")


def test_load_pair_npy_keeps_size_or_resizes(tmp_path):
    np.save(tmp_path / "test_normal.npy", np.zeros((2, 32, 32), np.uint8))
    np.save(tmp_path / "test_pneumonia.npy", np.full((3, 64, 64), 255, np.uint8))
    with pytest.raises(DataError, match="32x32.*64x64.*image_size"):
        data.load_pair(tmp_path / "test_normal.npy", tmp_path / "test_pneumonia.npy")
    x, y = data.load_pair(str(tmp_path / "test_normal.npy"), tmp_path / "test_pneumonia.npy", image_size=28)
    assert x.shape == (5, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.tolist() == [0, 0, 1, 1, 1] and x[:2].max() == 0 and x[2:].min() == 1
    with pytest.raises(DataError, match="nothing.npy: no such file"):
        data.load_pair(tmp_path / "nothing.npy", tmp_path / "test_pneumonia.npy")
    np.savez(tmp_path / "both.npz", x=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="both.npz: an .npz archive"):
        data.load_pair(tmp_path / "both.npz", tmp_path / "test_pneumonia.npy")


@pytest.mark.shared_data
def test_shared_kermany_224_folder():
    d = data.load(f"folder:{shared('kermany-224')}", image_size=28)
    assert d.train.x.shape[1:] == (1, 28, 28) and d.test.x.shape == (784, 1, 28, 28)
    assert (d.train.normal + d.val.normal, d.train.pneumonia + d.val.pneumonia) == (201, 581)
    assert (d.val.normal, d.val.pneumonia) == (20, 58)  # held out of train: there is no val folder
    assert (d.test.normal, d.test.pneumonia) == (202, 582)
    assert 0 <= d.test.x.min() and d.test.x.max() <= 1 and d.test.x.std() > 0.1


@pytest.mark.shared_data
def test_shared_kermany_fullres_is_one_labelled_set():
    root = shared("kermany-fullres")
    with pytest.raises(DataError, match="load_pair"):
        data.load(f"folder:{root}")
    x, y = data.load_pair(root / "NORMAL", root / "PNEUMONIA", image_size=28)
    assert x.shape == (16, 1, 28, 28) and y.tolist() == [0] * 8 + [1] * 8
    with pytest.raises(DataError, match="differ in size"):
        data.load_pair(root / "NORMAL", root / "PNEUMONIA")


# --- pneumoniamnist (cache, download) ------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "cache"))
    data.clear_cache()
    yield tmp_path / "cache"
    data.clear_cache()


def test_pneumoniamnist_from_cache_without_network(cache, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded")

    monkeypatch.setattr(pytest.importorskip("pooch"), "retrieve", no_network)
    cache.mkdir()
    write_npz(cache / "pneumoniamnist.npz")
    write_npz(cache / "pneumoniamnist_64.npz", size=64)
    d = data.load("pneumoniamnist")
    assert d.name == "PneumoniaMNIST 28 px" and not d.synthetic and d.train.x.shape == (10, 1, 28, 28)
    d64 = data.load("pneumoniamnist:64", image_size=64)
    assert d64.name == "PneumoniaMNIST 64 px" and d64.test.x.shape == (10, 1, 64, 64)
    assert data.load("pneumoniamnist:64").test.x.shape == (10, 1, 28, 28)


def test_pneumoniamnist_downloads_once_with_md5(cache, monkeypatch):
    calls = []

    def fake_retrieve(url, known_hash, fname, path, **kwargs):
        calls.append((url, known_hash))
        Path(path).mkdir(parents=True)
        return str(write_npz(Path(path) / fname))

    monkeypatch.setattr(pytest.importorskip("pooch"), "retrieve", fake_retrieve)
    assert data.load("pneumoniamnist:128", image_size=28).train.n == 10
    assert calls == [("https://zenodo.org/records/10519652/files/pneumoniamnist_128.npz?download=1",
                      "md5:05b46931834c231683c68f40c47b2971")]


def test_pneumoniamnist_offline_says_where_to_put_the_file(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'zenodo.org'")

    monkeypatch.setattr(pytest.importorskip("pooch"), "retrieve", offline)
    with pytest.raises(DataError) as err:
        data.load("pneumoniamnist")
    message = str(err.value)
    assert str(cache / "pneumoniamnist.npz") in message and "\n" not in message
    assert "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1" in message
    with pytest.raises(DataError, match="28, 64, 128, 224"):
        data.load("pneumoniamnist:100")


# --- load() ------------------------------------------------------------------------------------------

def test_load_caches_per_source_and_size(tmp_path):
    root = write_npy_dir(tmp_path / "c", n=(3, 3))
    first = data.load(f"npy:{root}")
    assert data.load(f"npy:{root}", 28) is first and data.load(f"npy:{root}", 32) is not first


@pytest.mark.parametrize("source", ["mnist", "npz:", "folder", "csv:/x.csv"])
def test_unknown_source_lists_the_allowed_ones(source):
    with pytest.raises(DataError, match="allowed: synthetic, synthetic:SEED, pneumoniamnist"):
        data.load(source)


def test_numpy_integer_image_size_is_the_same_key():
    assert data.load("synthetic", np.int64(28)) is data.load("synthetic")
    assert data.load("synthetic:2").name == "synthetic seed 2 (procedural, not real X-rays)"


@pytest.mark.parametrize("size", [0, -28, 28.0, True])
def test_bad_image_size(size):
    with pytest.raises(DataError, match="image_size"):
        data.load("synthetic", size)


# --- the table of sources ------------------------------------------------------------------------------

def test_schemes_and_help_text_come_from_the_table():
    assert data.SCHEMES == ("synthetic", "synthetic:SEED", "pneumoniamnist", "pneumoniamnist:SIZE", "npz:PATH",
                            "npz:PATH?holdout=F", "npy:DIR", "folder:DIR")  # as before the table
    assert data.SCHEMES == tuple(form for source in data.SOURCES.values() for form in source.forms)
    assert {form.partition(":")[0] for form in data.SCHEMES} == set(data.SOURCES)
    lines = data.help_text().splitlines()
    assert len(lines) == len(data.SOURCES)
    for (scheme, source), line in zip(data.SOURCES.items(), lines, strict=True):
        assert source.scheme == scheme and all(form.partition(":")[0] == scheme for form in source.forms)
        assert line.startswith(source.usage) and line.endswith(source.help) and "\n" not in source.help
    assert data.usage_line() == " | ".join(source.usage for source in data.SOURCES.values())
    assert data.usage_line().startswith("synthetic[:SEED] | pneumoniamnist[:SIZE] | npz:PATH[?holdout=F]")


def test_a_new_source_is_one_table_entry(monkeypatch, request):
    def constant(source: str, arg: str, size: int) -> data.Dataset:
        split = data.Split(torch.full((4, 1, size, size), float(arg)), torch.tensor([0, 1, 0, 1]))
        return data.Dataset(source, f"constant {arg}", True, size, split, split, split)

    monkeypatch.setitem(data.SOURCES, "const", data.Source("const", "const:VALUE", "every pixel VALUE", constant))
    request.addfinalizer(data.clear_cache)
    d = data.load("const:0.5", 8)
    assert d.name == "constant 0.5" and d.test.x.shape == (4, 1, 8, 8) and d.test.x.max() == 0.5
    assert data.help_text().splitlines()[-1].split() == ["const:VALUE", "every", "pixel", "VALUE"]
    assert data.usage_line().endswith("folder:DIR | const:VALUE")
    with pytest.raises(DataError, match="allowed: synthetic, .*, folder:DIR, const:VALUE$"):
        data.load("const")  # VALUE is required: the colon is outside brackets


def test_optional_parts_of_a_usage():
    source = data.Source("x", "x[:N]", "help", data.load)
    assert source.forms == ("x", "x:N") and not source.needs_arg
    source = data.Source("x", "x:PATH[?k=V]", "help", data.load)
    assert source.forms == ("x:PATH", "x:PATH?k=V") and source.needs_arg


def test_data_errors_are_cxr_errors_with_one_line_causes(cache, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("connection refused\n  while resolving zenodo.org")

    monkeypatch.setattr(pytest.importorskip("pooch"), "retrieve", offline)
    with pytest.raises(CxrError) as err:
        data.load("pneumoniamnist:64")
    assert isinstance(err.value, DataError) and isinstance(err.value, ValueError)
    assert "(OSError: connection refused while resolving zenodo.org)" in str(err.value)
