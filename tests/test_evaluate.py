"""`cxr-bench run` on course-format files, then `cxr-bench evaluate`, checked against the course's own
evaluation loop; and a clear answer for every kind of bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from cxr import cli
from cxr.models import build_model

from .conftest import make_split

SPEC = """
[experiment]
name = "course"
model = "cnn"
epochs = 2
batch_size = 32
seeds = [0]
[grid]
loss = ["bce", "ce"]
"""


def _write_course_dir(root: Path) -> Path:
    """{train,val,test}_{normal,pneumonia}.npy as float32 (N, 28, 28) in [0, 1], like the course's files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", make_split(320, 11)), ("val", make_split(64, 12)), ("test", make_split(120, 13))):
        x = split.x[:, 0].numpy().astype(np.float32)
        y = split.y.numpy()
        np.save(root / f"{name}_normal.npy", x[y == 0])
        np.save(root / f"{name}_pneumonia.npy", x[y == 1])
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two models (BCE, CE) trained by `cxr-bench run --data npy:DIR` on course-format files."""
    tmp = tmp_path_factory.mktemp("course")
    data_dir = _write_course_dir(tmp / "data")
    (tmp / "course.toml").write_text(SPEC)
    code = cli.main(["run", str(tmp / "course.toml"), "--data", f"npy:{data_dir}", "--out", str(tmp / "results"),
                     "--device", "cpu"])
    assert code == 0
    return tmp, data_dir


def _course_accuracy(weights: Path, normal: Path, pneumonia: Path) -> float:
    """The course's evaluation loop, verbatim in spirit: build_model, load_state_dict, DataLoader, max(1)."""
    model = build_model("cnn", 2)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    normal_x, pneumonia_x = np.load(normal), np.load(pneumonia)
    x = torch.from_numpy(np.concatenate([normal_x, pneumonia_x])).float()
    y = torch.cat([torch.zeros(len(normal_x)), torch.ones(len(pneumonia_x))]).long()
    loader = DataLoader(TensorDataset(x.unsqueeze(1), y), batch_size=32)
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            outputs = model(images)
            _, predicted = outputs.max(1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return correct / total


def _evaluate(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_matches_the_course_loop_exactly(trained, capsys):
    tmp, data_dir = trained
    weights = tmp / "results/runs/course-ce-lr0.001-bs32/seed-0/model_weights.pth"
    normal, pneumonia = data_dir / "test_normal.npy", data_dir / "test_pneumonia.npy"
    code, out, _ = _evaluate(capsys, "--weights", weights, "--normal", normal, "--pneumonia", pneumonia,
                             "--json", "--device", "cpu")
    assert code == 0
    result = json.loads(out)
    assert result["accuracy"] == _course_accuracy(weights, normal, pneumonia)
    assert result["n"] == 120 and result["loss"] == "ce" and result["model"] == "cnn"
    (tn, fp), (fn, tp) = result["confusion"]
    assert tn + fp == len(np.load(normal)) and fn + tp == len(np.load(pneumonia))
    # and the run's own stored test accuracy is the same number
    stored = json.loads((tmp / "results/runs/course-ce-lr0.001-bs32/seed-0.json").read_text())
    assert stored["metrics"]["test"]["accuracy"] == result["accuracy"]


def test_text_output_is_percent_with_two_decimals_and_bce_is_inferred(trained, capsys):
    tmp, data_dir = trained
    weights = tmp / "results/runs/course-bce-lr0.001-bs32/seed-0/model_weights.pth"
    code, out, _ = _evaluate(capsys, "--weights", weights, "--normal", data_dir / "test_normal.npy",
                             "--pneumonia", data_dir / "test_pneumonia.npy", "--device", "cpu")
    assert code == 0
    assert "BCE: 1 output" in out
    line = next(x for x in out.splitlines() if x.startswith("accuracy"))
    pct, frac = line.split()[1], line.split()[2]
    correct, total = map(int, frac.strip("()").split("/"))
    assert total == 120 and pct == f"{100 * correct / total:.2f}%"


def test_uint8_input_is_scaled_like_training(trained, capsys, tmp_path):
    tmp, data_dir = trained
    weights = tmp / "results/runs/course-ce-lr0.001-bs32/seed-0/model_weights.pth"
    for name in ("normal", "pneumonia"):
        x = np.load(data_dir / f"test_{name}.npy")
        np.save(tmp_path / f"{name}.npy", np.round(x * 255).astype(np.uint8))
    code, out, _ = _evaluate(capsys, "--weights", weights, "--normal", tmp_path / "normal.npy",
                             "--pneumonia", tmp_path / "pneumonia.npy", "--json", "--device", "cpu")
    float_code, float_out, _ = _evaluate(capsys, "--weights", weights, "--normal", data_dir / "test_normal.npy",
                                         "--pneumonia", data_dir / "test_pneumonia.npy", "--json", "--device", "cpu")
    assert code == float_code == 0
    assert abs(json.loads(out)["accuracy"] - json.loads(float_out)["accuracy"]) <= 2 / 120  # rounding to 1/255


def _bad(capsys, tmp, data_dir, weights=None, normal=None, pneumonia=None, extra=()):
    weights = weights or tmp / "results/runs/course-ce-lr0.001-bs32/seed-0/model_weights.pth"
    code, out, err = _evaluate(capsys, "--weights", weights, "--normal", normal or data_dir / "test_normal.npy",
                               "--pneumonia", pneumonia or data_dir / "test_pneumonia.npy", *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_weights_that_do_not_fit_any_model(trained, capsys, tmp_path):
    tmp, data_dir = trained
    odd = tmp_path / "odd.pth"
    torch.save(torch.nn.Linear(3, 2).state_dict(), odd)
    assert "odd.pth: the weights fit no model" in _bad(capsys, tmp, data_dir, weights=odd)
    wrong_width = build_model("cnn", 2, 8).state_dict()
    wrong_width.pop("head.3.bias")
    torch.save(wrong_width, odd)
    assert "fit no model" in _bad(capsys, tmp, data_dir, weights=odd)


def test_corrupt_missing_and_mismatched_weights(trained, capsys, tmp_path):
    tmp, data_dir = trained
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a torch file at all")
    assert "corrupt.pth: cannot load weights" in _bad(capsys, tmp, data_dir, weights=corrupt)
    assert "nope.pth: no such weights file" in _bad(capsys, tmp, data_dir, weights=tmp_path / "nope.pth")
    assert "--loss asks for 1 (bce)" in _bad(capsys, tmp, data_dir, extra=("--loss", "bce"))
    assert "unknown model 'vit'" in _bad(capsys, tmp, data_dir, extra=("--model", "vit"))


def test_image_size_out_of_range_and_non_finite_weights(trained, capsys, tmp_path):
    tmp, data_dir = trained
    assert "--image-size: image_size 20000 is outside 8..1024 pixels" in \
        _bad(capsys, tmp, data_dir, extra=("--image-size", "20000"))
    state = torch.load(tmp / "results/runs/course-ce-lr0.001-bs32/seed-0/model_weights.pth", weights_only=True)
    state["head.3.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    assert "nan.pth: 1 non-finite value in head.3.weight" in _bad(capsys, tmp, data_dir, weights=tmp_path / "nan.pth")


def test_bad_arrays_are_named(trained, capsys, tmp_path):
    tmp, data_dir = trained
    np.save(tmp_path / "flat.npy", np.zeros((5, 784), np.float32))
    assert "flat.npy" in _bad(capsys, tmp, data_dir, normal=tmp_path / "flat.npy")
    np.save(tmp_path / "hot.npy", np.full((5, 28, 28), 7.0, np.float32))
    assert "hot.npy" in _bad(capsys, tmp, data_dir, pneumonia=tmp_path / "hot.npy")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage")
    assert "junk.npy" in _bad(capsys, tmp, data_dir, normal=tmp_path / "junk.npy")
    assert "missing.npy" in _bad(capsys, tmp, data_dir, normal=tmp_path / "missing.npy")


@pytest.mark.shared_data
def test_evaluate_reads_full_resolution_jpeg_folders(trained, capsys, shared_data):
    tmp, _ = trained
    weights = tmp / "results/runs/course-ce-lr0.001-bs32/seed-0/model_weights.pth"
    root = shared_data / "kermany-fullres"
    code, out, _ = _evaluate(capsys, "--weights", weights, "--normal", root / "NORMAL", "--pneumonia",
                             root / "PNEUMONIA", "--image-size", 28, "--json", "--device", "cpu")
    assert code == 0
    result = json.loads(out)
    assert result["n"] == 16 and sum(map(sum, result["confusion"])) == 16
