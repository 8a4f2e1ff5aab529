"""Regenerate tests/fixtures/medmnistc-pneumoniamnist.npz: medmnistc's own output for every PneumoniaMNIST
corruption and severity on 6 real images, the reference tests/test_corruptions.py holds cxr.corruptions to.

It needs medmnistc, which the project's environment does not have (its requirements would replace torch).
Run it in a separate venv; the fixture in the repo was made with Python 3.11 and

    python3 -m venv /work/venv-mc && . /work/venv-mc/bin/activate
    apt-get install -y libmagickwand-6.q16-6      # ImageMagick, for wand: medmnistc imports it at load
    pip install numpy==2.4.6 scipy==1.17.1 pillow==13.0.0 scikit-learn==1.9.1 scikit-image==0.23.2 \
        opencv-python-headless wand pytest hypothesis jsonschema
    pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl   # or any CPU torch
    pip install --no-deps torchvision==0.28.0 medmnistc==0.1.0 medmnist==3.0.1
    python scripts/make_corruption_fixture.py [DATA_NPZ] [OUT_NPZ]

Keep Pillow the version of the project's environment: JPEG's bytes depend on Pillow's libjpeg build.
torchvision from PyPI may be built against a CUDA torch whose libraries are absent; its package __init__ then
fails while registering its C++ operators. medmnistc needs only torchvision.transforms.functional (pure Python
over torch: gaussian_blur, adjust_gamma), so `reference_corruptions` imports that module without running the
package's __init__.

Seeding: each (corruption, severity) is run over the images in order after np.random.seed(s) and with
corruptor.rng = np.random.default_rng(s), s = cxr.corruptions.seed(name, severity), the streams cxr.corruptions
draws from. Images: the first 3 normal and first 3 pneumonia images of val in ../shared/data's
pneumoniamnist-trainval.npz (28 px).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr import corruptions  # noqa: E402  (after the path)


def reference_corruptions() -> dict:
    """medmnistc's corruptors for PneumoniaMNIST, {name: corruptor}; torchvision imported without its __init__."""
    if "torchvision" not in sys.modules:
        found = importlib.util.find_spec("torchvision")
        if found is None:
            raise ImportError("torchvision is not installed")
        package = types.ModuleType("torchvision")
        package.__path__ = list(found.submodule_search_locations)
        sys.modules["torchvision"] = package
    from medmnistc.corruptions.registry import CORRUPTIONS_DS

    return CORRUPTIONS_DS["pneumoniamnist"]


def reference(images: np.ndarray, name: str, severity: int, corruptors: dict | None = None) -> np.ndarray:
    """medmnistc's corruption of (N, H, W) uint8 images, as its DatasetManager applies it (gray -> RGB ->
    corruptor.apply -> convert("L")), seeded as cxr.corruptions seeds it."""
    corruptor = (corruptors or reference_corruptions())[name]
    s = corruptions.seed(name, severity)
    np.random.seed(s)
    corruptor.rng = np.random.default_rng(s)
    out = [corruptor.apply(Image.fromarray(im).convert("RGB"), severity - 1) for im in images]
    return np.stack([np.asarray(Image.fromarray(np.asarray(o)).convert("L")) for o in out])


def main(data: str, out: str) -> None:
    import medmnistc
    import PIL
    import skimage
    import torch

    del medmnistc
    from importlib.metadata import version

    with np.load(data) as d:
        x, y = d["val_images"], d["val_labels"].ravel()
    pick = np.concatenate([np.flatnonzero(y == 0)[:3], np.flatnonzero(y == 1)[:3]])
    images = x[pick]
    corruptors = reference_corruptions()
    names = list(corruptions.CORRUPTIONS)
    assert names == list(corruptors), (names, list(corruptors))
    corrupted = np.stack([np.stack([reference(images, n, s, corruptors) for s in corruptions.SEVERITIES])
                          for n in names])
    versions = {"medmnistc": version("medmnistc"), "pillow": PIL.__version__, "numpy": np.__version__,
                "scikit-image": skimage.__version__, "torch": torch.__version__,
                "torchvision": version("torchvision")}
    np.savez_compressed(out, images=images, labels=y[pick], corrupted=corrupted, names=np.array(names),
                        seeds=np.array([[corruptions.seed(n, s) for s in corruptions.SEVERITIES] for n in names]),
                        versions=np.array([f"{k} {v}" for k, v in versions.items()]))
    print(f"{out}: {corrupted.shape} from {data}; {', '.join(f'{k} {v}' for k, v in versions.items())}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT.parent / "shared" / "data" / "pneumoniamnist-trainval.npz"),
         sys.argv[2] if len(sys.argv) > 2 else str(ROOT / "tests" / "fixtures" / "medmnistc-pneumoniamnist.npz"))
