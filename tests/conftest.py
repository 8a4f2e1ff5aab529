"""Shared test settings: the hypothesis profile and the path of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=50, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data beside the checkout; tests that use it skip visibly when it is absent."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"../shared/data not found: {path}")
    return path


def make_split(n: int, seed: int, size: int = 28):
    """A learnable toy split: pneumonia images carry a brighter square (about 90% separable)."""
    import torch

    from cxr.data import Split

    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.6).long()
    y[:2] = torch.tensor([0, 1])  # both classes present
    x = torch.rand(n, 1, size, size, generator=g) * 0.5
    x[:, :, 8:20, 8:20] += 0.35 * y.view(-1, 1, 1, 1) * torch.rand(n, 1, 1, 1, generator=g)
    return Split(x=x.clamp(0, 1).contiguous(), y=y)


@pytest.fixture(scope="session")
def tiny_data():
    """A small in-memory Dataset (train 256, val 64, test 96) that trains in well under a second."""
    from cxr.data import Dataset

    return Dataset(source="tiny", name="tiny toy data", synthetic=True, image_size=28,
                   train=make_split(256, 1), val=make_split(64, 2), test=make_split(96, 3))


def learnable_npz(path, seed: int = 0, sizes=(("train", 128), ("val", 32), ("test", 48))):
    """A MedMNIST-format npz of 28 px uint8 images in which pneumonia is a brighter square (learnable)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in sizes:
        y = np.arange(n) % 2
        x = rng.integers(0, 120, size=(n, 28, 28))
        x[:, 8:20, 8:20] += 100 * y[:, None, None]
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x.astype(np.uint8), y[:, None].astype(np.uint8)
    np.savez(path, **arrays)
    return path
