"""Write docs/synthetic-samples.png: synthetic training images, one row per class, beside real ones if present.

    PYTHONPATH=. python scripts/synthetic_samples.py [--size 28] [--out docs/synthetic-samples.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cxr import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--per-row", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "synthetic-samples.png")
    args = parser.parse_args()

    split = data.load("synthetic", args.size).train
    rows = [("synthetic normal", split.x[split.y == 0]), ("synthetic pneumonia", split.x[split.y == 1])]
    real = ROOT.parent / "shared" / "data" / "pneumoniamnist-trainval.npz"
    if real.exists() and args.size == 28:  # the real thing, for comparison
        import numpy as np

        with np.load(real) as f:
            x, y = f["train_images"] / 255, f["train_labels"][:, 0]
        rows += [("PneumoniaMNIST normal", x[y == 0][:, None]), ("PneumoniaMNIST pneumonia", x[y == 1][:, None])]

    fig, axes = plt.subplots(len(rows), args.per_row, figsize=(args.per_row * 1.1, len(rows) * 1.25))
    for r, (label, images) in enumerate(rows):
        for c in range(args.per_row):
            ax = axes[r, c]
            ax.imshow(images[c, 0], cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle(f"synthetic chest radiographs ({args.size} px, procedural, not real X-rays)", fontsize=10)
    fig.tight_layout()
    if len(rows) > 2:
        fig.text(0.5, 0.005, "PneumoniaMNIST rows for comparison: Yang et al., MedMNIST v2, Sci. Data 2023 "
                 "(CC BY 4.0), from Kermany et al., Cell 2018", ha="center", fontsize=7)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(args.out)


if __name__ == "__main__":
    main()
