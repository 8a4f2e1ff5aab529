"""cxr.corruptions against MedMNIST-C's own code (medmnistc 0.1.0), for all 13 corruptions x 5 severities.

Against tests/fixtures/medmnistc-pneumoniamnist.npz (medmnistc's output on 6 real PneumoniaMNIST images, made by
scripts/make_corruption_fixture.py) always, and directly against medmnistc where it imports (it is not a
dependency: the test skips, saying so, where it is absent). Tolerance: identical bytes, except
  - gaussian_blur: at most 1 gray level apart on at most 0.1% of the pixels (float64 separable convolution here,
    torch's float32 2-D one in torchvision: a value at .5 may round the other way; measured 0 to 0.006%);
  - jpeg_compression with a Pillow other than the fixture's: mean |difference| <= 1 gray level (libjpeg builds).
The noise is the same bytes because the seeds of cxr.corruptions.seed reproduce medmnistc's streams; its
distribution is checked as well, against the formulas.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import PIL
import pytest

from cxr import corruptions as corr

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "medmnistc-pneumoniamnist.npz"
CASES = [(name, s) for name in corr.CORRUPTIONS for s in corr.SEVERITIES]
BLUR_MAX, BLUR_SHARE = 1, 0.001
LUMA = np.sqrt(0.299 ** 2 + 0.587 ** 2 + 0.114 ** 2)  # gray std of independent per-channel noise, per unit


@pytest.fixture(scope="module")
def fixture() -> dict:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def agree(name: str, got: np.ndarray, want: np.ndarray, same_pillow: bool = True) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - want.astype(int))
    if name == "gaussian_blur":
        assert diff.max() <= BLUR_MAX and (diff > 0).mean() <= BLUR_SHARE, (diff.max(), (diff > 0).mean())
    elif name == "jpeg_compression" and not same_pillow:
        assert diff.mean() <= 1.0, diff.mean()
    else:
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_the_fixture_is_of_this_corruption_set(fixture):
    assert list(fixture["names"]) == list(corr.CORRUPTIONS)
    assert fixture["seeds"].tolist() == [[corr.seed(n, s) for s in corr.SEVERITIES] for n in corr.CORRUPTIONS]
    assert fixture["corrupted"].shape == (13, 5, *fixture["images"].shape)
    assert set(fixture["labels"].tolist()) == {0, 1}


@pytest.mark.parametrize(("name", "severity"), CASES)
def test_matches_medmnistc_fixture(fixture, name, severity):
    same_pillow = f"pillow {PIL.__version__}" in fixture["versions"].tolist()
    want = fixture["corrupted"][list(corr.CORRUPTIONS).index(name), severity - 1]
    agree(name, corr.corrupt(fixture["images"], name, severity), want, same_pillow)


def _reference_module():
    pytest.importorskip("medmnistc", reason="medmnistc not installed: the direct comparison needs it "
                                            "(see scripts/make_corruption_fixture.py)")
    spec = importlib.util.spec_from_file_location("make_corruption_fixture", ROOT / "scripts" /
                                                  "make_corruption_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return module, module.reference_corruptions()
    except ImportError as e:  # wand without ImageMagick, no torchvision
        pytest.skip(f"medmnistc's corruptions cannot be imported here: {e}")


def test_matches_medmnistc_directly(fixture):
    """Every corruption and severity, on real images at 28 and 64 px and on random images (odd size, full range)."""
    module, corruptors = _reference_module()
    from PIL import Image

    rng = np.random.default_rng(0)
    sets = {"real 28 px": fixture["images"],
            "real 64 px": np.stack([np.asarray(Image.fromarray(im).resize((64, 64))) for im in fixture["images"]]),
            "random 33 px": rng.integers(0, 256, (5, 33, 33), dtype=np.uint8)}
    for images in sets.values():
        for name, severity in CASES:
            agree(name, corr.corrupt(images, name, severity), module.reference(images, name, severity, corruptors))


@pytest.mark.parametrize("name", ["gaussian_noise", "speckle_noise", "shot_noise", "impulse_noise"])
def test_noise_has_the_distribution_of_its_definition(name):
    """On mid-gray images (x = 128/255), per severity: gray std = LUMA * the channel noise's std (gaussian c,
    speckle c x, shot sqrt(x / m)), mean within a gray level of x less the truncation's half level; impulse:
    the share of changed pixels = 1 - (1 - amount)^3 (a pixel changes when any channel flips)."""
    images = np.full((40, 32, 32), 128, np.uint8)
    x = 128 / 255
    for severity, p in zip(corr.SEVERITIES, corr.get(name).params, strict=True):
        out = corr.corrupt(images, name, severity).astype(float)
        if name == "impulse_noise":
            share, expect = (out != 128).mean(), 1 - (1 - p) ** 3
            assert abs(share - expect) < 4 * np.sqrt(expect * (1 - expect) / out.size) + 1e-3, (severity, share)
            continue
        sd = {"gaussian_noise": p, "speckle_noise": p * x, "shot_noise": np.sqrt(x / p)}[name] * LUMA * 255
        assert abs(out.std() / sd - 1) < 0.06, (severity, out.std(), sd)
        assert abs(out.mean() - (128 - 0.5)) < 1.0, (severity, out.mean())


def test_the_same_images_every_time_and_a_seed_per_corruption_and_severity(fixture):
    seeds = {corr.seed(n, s) for n, s in CASES}
    assert len(seeds) == len(CASES)
    for name in ("gaussian_noise", "impulse_noise", "shot_noise"):
        a = corr.corrupt(fixture["images"], name, 3)
        np.testing.assert_array_equal(a, corr.corrupt(fixture["images"], name, 3))
        assert (a != corr.corrupt(fixture["images"], name, 4)).any()


def test_8_bit_images_survive_the_float_round_trip():
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    np.testing.assert_array_equal(corr.to_uint8(u8.astype(np.float32) / 255), u8)


def test_severities_get_stronger(fixture):
    """The mean absolute change of the real images grows with severity (noise, blur, pixelate, JPEG, intensity)."""
    images = fixture["images"].astype(float)
    for name in corr.CORRUPTIONS:
        change = [np.abs(corr.corrupt(fixture["images"], name, s) - images).mean() for s in corr.SEVERITIES]
        assert change[-1] > change[0] > 0, (name, change)


@pytest.mark.parametrize(("images", "name", "severity", "words"), [
    (np.zeros((2, 2, 2), np.uint8), "pixelate", 5, "pixelate severity 5: needs images of at least 3 x 3 px"),
    (np.zeros((2, 5, 5), np.uint8), "gaussian_blur", 5, "gaussian_blur severity 5: needs images of at least 6 x 6"),
    (np.zeros((2, 8, 8), np.uint8), "fog", 1, "unknown corruption 'fog'; allowed: pixelate,"),
    (np.zeros((2, 8, 8), np.uint8), "pixelate", 6, "severity 6; allowed: 1 to 5"),
    (np.zeros((2, 8, 8), np.float32), "pixelate", 1, "expected (N, H, W) uint8 images, got float32"),
])
def test_bad_input_is_one_line(images, name, severity, words):
    with pytest.raises(corr.CorruptionError) as e:
        corr.corrupt(images, name, severity)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_min_size_is_what_medmnistc_can_do():
    assert corr.min_size("pixelate", 1) == 2 and corr.min_size("pixelate", 5) == 3
    assert [corr.min_size("gaussian_blur", s) for s in corr.SEVERITIES] == [2, 3, 4, 5, 6]
    assert corr.required_size() == (6, "gaussian_blur severity 5")
    assert corr.corrupt(np.zeros((1, 6, 6), np.uint8), "gaussian_blur", 5).shape == (1, 6, 6)
