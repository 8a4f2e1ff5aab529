"""Hostile and malformed weights files: whatever a .pth holds, `cxr-bench evaluate` answers with one
line naming the file (a CxrError), never a traceback, and never allocates what a small file claims.

The fuzz tests corrupt the bytes of a real state dict (both torch.save formats: zip and legacy
pickle) or its contents (keys, shapes, dtypes, values) and pass the result through
`cxr.evaluate.load_state_dict` and `cxr.models.infer_model`; any exception other than a CxrError
fails the test. Each fuzz test runs CXR_FUZZ_EXAMPLES examples (default 200), e.g.

    CXR_FUZZ_EXAMPLES=3000 pytest -q tests/test_hostile_weights.py --hypothesis-show-statistics

(the statistics show how many examples loaded, fitted a model, or were refused, and why).
"""

from __future__ import annotations

import io
import os
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cxr import cli, evaluate, models
from cxr.data import DataError
from cxr.errors import CxrError
from cxr.models import WeightsError, build_model, infer_model

FUZZ_EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _saved(state, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def _real_state() -> dict:
    torch.manual_seed(0)
    return build_model("cnn", 2, 4).state_dict()


def _pickle_region(data: bytes) -> tuple[int, int]:
    """Where data.pkl's bytes lie in a zip-format .pth (torch stores records uncompressed)."""
    start = data.find(b"\x80\x02", data.find(b"data.pkl"))
    end = data.find(b"PK\x03\x04", start)
    return start, end


class _Bases:
    """The bytes of a real cnn width-4 state dict in each format, their pickle regions, a scratch directory."""

    def __init__(self, tmp: Path):
        zipped, legacy = _saved(_real_state()), _saved(_real_state(), legacy=True)
        self.formats = {"zip": (zipped, _pickle_region(zipped)), "legacy": (legacy, (0, len(legacy)))}
        self.tmp = tmp
        rng = np.random.default_rng(0)
        self.arrays = tmp / "normal.npy", tmp / "pneumonia.npy"
        for path in self.arrays:
            np.save(path, rng.random((4, 28, 28), dtype=np.float32))

    def __repr__(self) -> str:  # hypothesis prints fixtures with a failing example
        return f"_Bases({self.tmp})"


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> _Bases:
    return _Bases(tmp_path_factory.mktemp("hostile"))


def _outcome(path: Path, arrays: tuple[Path, Path]) -> str:
    """Load and infer, and evaluate what fits a model on `arrays`; a CxrError must be one line naming the
    file. Any other exception propagates and fails the test."""
    try:
        state = evaluate.load_state_dict(path)
        infer_model(state, source=str(path))
        evaluate.evaluate_weights(path, *arrays, device="cpu")
    except CxrError as e:
        message = str(e)
        assert str(path) in message and len(message.splitlines()) == 1, message
        return f"refused: {message.removeprefix(f'{path}: ')[:40]}"
    return "fits a model"


def _refusal(path: Path) -> str:
    """The WeightsError message for a file that must be refused, checked to be one line naming it."""
    with pytest.raises(WeightsError) as info:
        infer_model(evaluate.load_state_dict(path), source=str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: ") and len(message.splitlines()) == 1, message
    return message


# -- fuzzing the bytes -----------------------------------------------------------------------------

_EDIT = st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
                  st.booleans(),                          # in the pickle's bytes (else anywhere)
                  st.floats(0, 1, exclude_max=True),      # where, as a fraction of the region
                  st.binary(min_size=1, max_size=8))      # bytes to write / insert, or the bits to flip


def _corrupt(data: bytes, region: tuple[int, int], edits) -> bytes:
    out = bytearray(data)
    for op, in_pickle, where, payload in edits:
        lo, hi = region if in_pickle else (0, len(out))
        hi = min(hi, len(out))
        if hi <= lo:
            continue
        at = lo + int(where * (hi - lo))
        if op == "flip":
            for i, b in enumerate(payload[:hi - at]):
                out[at + i] ^= b or 1
        elif op == "set":
            out[at:at + len(payload)] = payload
        elif op == "insert":
            out[at:at] = payload
        elif op == "delete":
            del out[at:at + len(payload)]
        else:
            del out[at:]
    return bytes(out)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@FUZZ
@given(edits=st.lists(_EDIT, min_size=1, max_size=6))
def test_corrupted_bytes_give_only_cxr_errors(bases, fmt, edits):
    data, region = bases.formats[fmt]
    path = bases.tmp / f"corrupt-{fmt}.pth"
    path.write_bytes(_corrupt(data, region, edits))
    event(_outcome(path, bases.arrays))


# -- fuzzing the contents --------------------------------------------------------------------------

_KEYS = list(_real_state())
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
           torch.complex64]
_VALUE = st.one_of(
    st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
              st.lists(st.integers(0, 6), max_size=5), st.sampled_from(_DTYPES)),
    st.lists(st.integers(1, 10**6), max_size=3).map(lambda shape: torch.zeros(1).expand(*shape, 1)),  # stride 0
    st.sampled_from([float("nan"), float("inf"), 1e300]).map(lambda v: torch.full((8, 1, 3, 3), v,
                                                                                   dtype=torch.float64)),
    st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3)),
)
_KEY = st.one_of(st.sampled_from(_KEYS), st.text(max_size=12), st.integers(), st.sampled_from([b"head", 1.5, None]))
_CHANGE = st.one_of(
    st.tuples(st.just("set"), _KEY, _VALUE),
    st.tuples(st.just("drop"), st.sampled_from(_KEYS), st.none()),
    st.tuples(st.just("poison"), st.sampled_from(_KEYS),
              st.sampled_from([float("nan"), float("-inf"), 1e39, 1e30, -1.0])),  # -1: a negative running_var
)


@FUZZ
@given(changes=st.lists(_CHANGE, min_size=1, max_size=4), legacy=st.booleans(),
       whole=st.sampled_from([None] * 12 + [[], 0, "weights", [torch.zeros(1)]]))  # mostly a state dict
def test_malformed_state_dicts_give_only_cxr_errors(bases, changes, legacy, whole):
    state = _real_state()
    for op, key, value in changes:
        if op == "set":
            state[key] = value
        elif op == "drop":
            state.pop(key, None)
        elif isinstance(state.get(key), torch.Tensor) and state[key].is_floating_point() \
                and 0 < state[key].numel() <= 10_000:  # not a stride-0 giant set above: .double() would fill it
            state[key] = state[key].double()  # 1e39 is finite in float64, infinite once loaded as float32
            state[key].view(-1)[0] = value
    path = bases.tmp / "malformed.pth"
    path.write_bytes(_saved(state if whole is None else whole, legacy))
    event(_outcome(path, bases.arrays))


# -- the findings, one by one ----------------------------------------------------------------------

def _write(tmp_path, state, name="w.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_int_key(tmp_path):
    state = _real_state()
    state[3] = torch.zeros(2)
    assert "the key 3 is a int" in _refusal(_write(tmp_path, state))


def test_zero_dim_first_conv_and_flat_head(tmp_path):
    state = _real_state()
    state["features.1.weight"] = torch.tensor(1.0)
    assert "expected a 4-D conv weight at 'features.1.weight', found shape []" in _refusal(_write(tmp_path, state))
    state = _real_state()
    state["head.3.weight"] = torch.zeros(2)
    assert "expected a 2-D linear head weight at 'head.3.weight', found shape [2]" in \
        _refusal(_write(tmp_path, state))


@pytest.mark.parametrize("values, count", [([float("nan")], "1 non-finite value in"),
                                           ([float("nan"), float("inf")], "2 non-finite values in"),
                                           ([1e300], "1 non-finite value in")])  # float64 past float32's range
def test_non_finite_weights(tmp_path, values, count):
    state = {k: v.double() if v.is_floating_point() else v for k, v in _real_state().items()}
    state["features.5.weight"].view(-1)[:len(values)] = torch.tensor(values, dtype=torch.float64)
    assert f"{count} features.5.weight" in _refusal(_write(tmp_path, state))


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_width_20000_is_refused_before_anything_is_built(tmp_path):
    state = _real_state()
    state["features.1.weight"] = torch.empty(20000, 1, 3, 3)  # 720 KB that claims a 36G-parameter model
    path = _write(tmp_path, state)
    rss, t0 = _max_rss_mb(), time.perf_counter()
    message = _refusal(path)
    assert time.perf_counter() - t0 < 5 and _max_rss_mb() - rss < 500
    assert "cnn at width 20000 has" in message and "(cxr.models.MAX_PARAMETERS)" in message


def test_stride_zero_tensors_claim_nothing(tmp_path):
    """A 4-byte storage viewed with stride 0 claims any shape; nothing of that size is ever allocated."""
    state = _real_state()
    state["features.1.weight"] = torch.zeros(1).expand(2**31, 1, 3, 3)  # a width past int64 parameter counts
    assert "cnn at width 2147483648 has more than 2**63 parameters" in _refusal(_write(tmp_path, state))
    state = _real_state()
    state["features.5.weight"] = torch.zeros(1).expand(10**6, 10**6, 3, 3)
    assert "the weights fit no model" in _refusal(_write(tmp_path, state))


def test_resnet18_at_width_512_is_refused_without_building_it():
    state = {"stem.1.weight": torch.empty(2048, 1, 3, 3), "head.2.weight": torch.empty(2, 16384)}
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"^big\.pth: resnet18 at width 512 has 11,4\d\d,\d{3},\d{3} parameters, "
                                           r"more than the limit of 100,000,000 \(cxr.models.MAX_PARAMETERS\)$"):
        infer_model(state, source="big.pth")
    assert time.perf_counter() - t0 < 5
    assert models.parameter_count("resnet18", 2, 16) < models.MAX_PARAMETERS  # the standard one still fits


def test_not_plain_tensors_and_not_dicts(tmp_path):
    for value, what in ((torch.eye(3).to_sparse(), "layout torch.sparse_coo"), (torch.zeros(3, dtype=torch.complex64),
                        "dtype torch.complex64"), (torch.zeros(3, device="meta"), "device meta")):
        state = _real_state()
        state["head.3.bias"] = value
        message = _refusal(_write(tmp_path, state))
        assert "'head.3.bias' is not a plain tensor of real numbers (" in message and what in message
    assert "not a state dict" in _refusal(_write(tmp_path, [torch.zeros(1)]))
    assert "holds a str, not a tensor" in _refusal(_write(tmp_path, {**_real_state(), "x": "y"}))


def test_a_key_with_line_breaks_stays_one_line(tmp_path):
    state = _real_state()
    state["x\nTraceback (most recent call last):"] = torch.zeros(1)
    message = _refusal(_write(tmp_path, state))
    assert "unexpected 'x\\nTraceback (most recent call last):'" in message


def test_too_big_file_is_refused_before_reading(tmp_path, monkeypatch):
    path = _write(tmp_path, _real_state())
    monkeypatch.setattr(evaluate, "MAX_WEIGHTS_BYTES", 100)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    assert "more than the limit of 100 (MAX_WEIGHTS_BYTES in cxr/evaluate.py)" in _refusal(path)


def test_memory_error_while_loading(tmp_path, monkeypatch):
    path = _write(tmp_path, _real_state())

    def claim(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(torch, "load", claim)
    assert "the file claims more memory than is available" in _refusal(path)


# -- evaluate_weights and the CLI ------------------------------------------------------------------

@pytest.fixture()
def arrays(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("normal", "pneumonia"):
        np.save(tmp_path / f"{name}.npy", rng.random((6, 28, 28), dtype=np.float32))
    return tmp_path / "normal.npy", tmp_path / "pneumonia.npy"


def test_finite_weights_with_non_finite_outputs(tmp_path, arrays):
    state = _real_state()
    state["features.2.running_var"].fill_(-1.0)  # finite, but BatchNorm takes its square root
    path = _write(tmp_path, state)
    with pytest.raises(WeightsError, match=r"w\.pth: the model produced non-finite outputs on .*normal\.npy"):
        evaluate.evaluate_weights(path, *arrays, device="cpu")


@pytest.mark.parametrize("size", [0, 7, 1025, 20000])
def test_image_size_out_of_range(tmp_path, arrays, size):
    with pytest.raises(DataError, match=rf"^--image-size: image_size {size} is outside 8\.\.1024 pixels \(cxr.arrays"):
        evaluate.evaluate_weights(_write(tmp_path, _real_state()), *arrays, image_size=size, device="cpu")
    assert evaluate.evaluate_weights(_write(tmp_path, _real_state()), *arrays, image_size=8, device="cpu")["n"] == 12


def _cli(capsys, weights, arrays, *extra) -> tuple[int, str, str]:
    code = cli.main(["evaluate", "--weights", str(weights), "--normal", str(arrays[0]), "--pneumonia",
                     str(arrays[1]), "--device", "cpu", *extra])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_answers_a_corrupt_file_with_one_line(tmp_path, arrays, capsys):
    data = bytearray(_saved(_real_state()))
    start, end = _pickle_region(bytes(data))
    data[start + (end - start) // 2:end] = bytes(end - start - (end - start) // 2)  # zero half the pickle
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(bytes(data))
    wide = _real_state()
    wide["features.1.weight"] = torch.empty(20000, 1, 3, 3)
    for path, extra, expected in ((bad, (), "corrupt.pth: "),
                                  (_write(tmp_path, wide, "wide.pth"), (), "MAX_PARAMETERS"),
                                  (_write(tmp_path, _real_state()), ("--image-size", "20000"),
                                   "image_size 20000 is outside")):
        code, out, err = _cli(capsys, path, arrays, *extra)
        assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith("cxr-bench evaluate: error: ") and expected in err


def test_a_failed_load_prints_no_warning(tmp_path, arrays, capsys):
    """torch.load warns about a corrupt file's pickle protocol before failing; on stderr that was a 2nd line."""
    data = bytearray(_saved(_real_state()))
    start, end = _pickle_region(bytes(data))
    data[start + 1], data[end - 30] = 75, 0  # protocol 75, and a broken opcode near the end
    path = tmp_path / "protocol.pth"
    path.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = _cli(capsys, path, arrays)
    assert code == 2 and err.count("\n") == 1 and "protocol.pth: cannot load weights" in err, err
    assert [str(w.message) for w in caught] == []
