"""Hostile and malformed data files: every one is refused with a CxrError, one line naming the file, before memory
is spent on it; the findings of the "hostile and malformed inputs" issue, one test each; and fuzzing.

The fuzz tests corrupt the bytes of small valid files made here (an .npy, an .npz stored and compressed, PNGs of
8-bit, 16-bit and RGB pixels, JPEGs): random overwrites, insertions, deletions and truncations, plus edits of the
fields that size things (the .npy header's shape and dtype, a zip member's declared sizes, PNG's IHDR and JPEG's
SOF width and height), then load the result through cxr.data.load_pair or cxr.data.load("npz:...") and require
that only CxrError subclasses come out, and that whatever loads is float32 in [0, 1]. Each runs
CXR_FUZZ_EXAMPLES examples (default 150), e.g. CXR_FUZZ_EXAMPLES=2000 pytest tests/test_hostile_data.py for a
longer search. The huge-claim files are also loaded in a subprocess whose address space (RLIMIT_AS) leaves 1 GiB
beyond what its imports map, so that a loader that tries to allocate what a header claims fails the test, not the
machine.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cxr import arrays, data
from cxr.data import DataError
from cxr.errors import CxrError

FUZZ = settings(max_examples=int(os.environ.get("CXR_FUZZ_EXAMPLES", 150)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# Fuzzed files make numpy's header parser and Pillow warn (DeprecationWarning, RuntimeWarning, UserWarning): expected.
FUZZED = pytest.mark.filterwarnings("ignore")
HUGE = (10**13,)  # 9 TiB of uint8, claimed by a 144-byte file
ROOT = Path(__file__).resolve().parents[1]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple, fortran: bool = False) -> bytes:
    """An .npy 1.0 header with any descr and shape, valid or not (np.lib.format would check them)."""
    text = f"{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape!r}, }}"
    text += " " * (-(len(text) + 11) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def huge_npy() -> bytes:
    return npy_header("'|u1'", HUGE) + bytes(16)


def npz_bytes(members: dict[str, bytes], compress: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as z:
        for name, content in members.items():
            z.writestr(name, content)
    return buffer.getvalue()


def medmnist_members(n: int = 4, size: int = 8) -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    members = {}
    for split in ("train", "val", "test"):
        members[f"{split}_images.npy"] = npy_bytes(rng.integers(0, 256, (n, size, size), dtype=np.uint8))
        members[f"{split}_labels.npy"] = npy_bytes((np.arange(n) % 2).astype(np.uint8)[:, None])
    return members


def image_bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def assert_one_line(err: pytest.ExceptionInfo, *names: str) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, CxrError), message
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.fixture(autouse=True)
def fresh_cache():
    data.clear_cache()
    yield
    data.clear_cache()


# --- the findings, one test each -----------------------------------------------------------------------

def test_npy_claiming_9_tib_is_refused_from_its_header(tmp_path):
    bad = write(tmp_path / "huge.npy", huge_npy())
    ok = write(tmp_path / "ok.npy", npy_bytes(np.zeros((2, 8, 8), np.uint8)))
    assert bad.stat().st_size == 144
    with pytest.raises(DataError) as err:
        data.load_pair(bad, ok, 8)
    assert_one_line(err, "huge.npy", "claims shape (10000000000000,)", "10,000,000,000,000 bytes", "holds 16")


def test_npz_member_claiming_9_tib_is_refused_from_its_header(tmp_path):
    members = medmnist_members() | {"train_images.npy": huge_npy() + bytes(78_000)}
    path = write(tmp_path / "huge.npz", npz_bytes(members))
    with pytest.raises(DataError) as err:
        data.load(f"npz:{path}")
    assert_one_line(err, "huge.npz member 'train_images.npy'", "claims shape (10000000000000,)")


@pytest.mark.parametrize("name, content, message", [
    ("train_images.npy", b"junk", "not a readable .npy array (ValueError: EOF"),
    ("train_images.npy", b"\x93NUMPY\x01\x00\x10\x00{'descr': '<u2'", "not a readable .npy array"),
    ("notes.txt", b"hello", "not an .npy array (an npz holds only .npy members)"),
])
def test_npz_member_that_is_not_an_array(tmp_path, name, content, message):
    path = write(tmp_path / "raw.npz", npz_bytes(medmnist_members() | {name: content}))
    with pytest.raises(DataError) as err:
        data.load(f"npz:{path}")
    assert_one_line(err, f"raw.npz member '{name}'", message)


def test_16_bit_png_keeps_its_values(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, (64, 64), dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 65535
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    png = write(tmp_path / "sixteen" / "a.png", image_bytes(image, "PNG"))
    write(tmp_path / "eight" / "b.png", image_bytes(Image.new("L", (64, 64), 128), "PNG"))
    x, y = data.load_pair(png.parent, tmp_path / "eight")
    assert x.shape == (2, 1, 64, 64) and y.tolist() == [0, 1]
    assert torch.equal(x[0, 0], torch.from_numpy(pixels.astype(np.float32) / 65535))  # exact, not saturated
    assert (x[0] == 1).float().mean() < 0.01 and abs(x[0].mean().item() - pixels.mean() / 65535) < 1e-6
    small, _ = data.load_pair(png.parent, tmp_path / "eight", 16)  # area average of 4 x 4 blocks, in float
    blocks = pixels.astype(np.float64).reshape(16, 4, 16, 4).mean(axis=(1, 3)) / 65535
    assert np.allclose(small[0, 0].numpy(), blocks, atol=1e-6)
    assert abs(small[1].mean().item() - 128 / 255) < 1e-6


def test_16_bit_png_in_a_folder_source(tmp_path):
    for split in ("train", "test"):
        for cls, value in (("NORMAL", 1000), ("PNEUMONIA", 60000)):
            for i in range(2):
                pixels = np.full((20, 20), value, np.uint16)
                write(tmp_path / split / cls / f"{i}.png", image_bytes(Image.fromarray(pixels), "PNG"))
    d = data.load(f"folder:{tmp_path}", 8)
    assert torch.allclose(d.test.x[d.test.y == 0], torch.tensor(1000 / 65535))
    assert torch.allclose(d.test.x[d.test.y == 1], torch.tensor(60000 / 65535))


def test_rgb_stored_grayscale_keeps_its_value_and_rgb_becomes_luminance(tmp_path):
    write(tmp_path / "gray" / "a.png", image_bytes(Image.new("RGB", (12, 12), (77, 77, 77)), "PNG"))
    write(tmp_path / "gray" / "b.png", image_bytes(Image.new("RGBA", (12, 12), (200, 200, 200, 9)), "PNG"))
    write(tmp_path / "gray" / "c.png", image_bytes(Image.new("LA", (12, 12), (30, 255)), "PNG"))
    write(tmp_path / "color" / "d.png", image_bytes(Image.new("RGB", (12, 12), (255, 0, 0)), "PNG"))
    write(tmp_path / "color" / "e.png", image_bytes(Image.new("P", (12, 12), 0), "PNG"))
    x, y = data.load_pair(tmp_path / "gray", tmp_path / "color", 8)
    assert torch.equal(x[:3, 0, 4, 4], torch.tensor([77, 200, 30], dtype=torch.float32) / 255)
    assert abs(x[3].mean().item() - 0.299) < 1 / 255 and x[4].max() == 0


@pytest.mark.parametrize("make, mode", [
    (lambda: image_bytes(Image.new("CMYK", (16, 16), (0, 0, 0, 255)), "JPEG"), "CMYK"),
    (lambda: image_bytes(Image.new("YCbCr", (16, 16)), "TIFF"), "YCbCr"),
    (lambda: image_bytes(Image.new("LAB", (16, 16)), "TIFF"), "LAB"),
])
def test_other_image_modes_are_refused_by_name(tmp_path, make, mode):
    write(tmp_path / "odd" / "x.jpeg", make())
    write(tmp_path / "ok" / "y.png", image_bytes(Image.new("L", (16, 16)), "PNG"))
    with pytest.raises(DataError) as err:
        data.load_pair(tmp_path / "odd", tmp_path / "ok", 8)
    assert_one_line(err, "x.jpeg", f"image mode {mode};")


def test_32_bit_and_float_images_by_their_range(tmp_path):
    def tiff(pixels: np.ndarray, name: str) -> Path:  # PNG holds neither; a .png that is a TIFF is read by content
        return write(tmp_path / name / "x.png", image_bytes(Image.fromarray(pixels), "TIFF"))

    ok = write(tmp_path / "ok" / "y.png", image_bytes(Image.new("L", (4, 4)), "PNG"))
    x, _ = data.load_pair(tiff(np.array([[0, 65535], [300, 7]], np.int32), "int").parent, ok.parent, 8)
    assert x[0].max() == 1 and x[0].min() == 0 and x[0].mean() > 0.2  # resized in float: 0 and 1 meet
    two = write(tmp_path / "two" / "y.png", image_bytes(Image.new("L", (2, 2)), "PNG"))
    x, _ = data.load_pair(tiff(np.array([[0, 0.25], [1, 0.5]], np.float32), "float").parent, two.parent)
    assert x[0, 0].tolist() == [[0, 0.25], [1, 0.5]]
    for pixels, message in ((np.array([[0, 70000]], np.int32), "mode I) with values in 0..70000"),
                            (np.array([[-1, 5]], np.int32), "values in -1..5"),
                            (np.array([[0, 2.5]], np.float32), r"must lie in [0, 1], found [0, 2.5]"),
                            (np.array([[0, np.nan]], np.float32), "NaN")):
        with pytest.raises(DataError) as err:
            data.load_pair(tiff(pixels, "bad").parent, ok.parent, 8)
        assert_one_line(err, "bad/x.png", message)


@pytest.mark.parametrize("size", [20000, -3, 0, 7, 1025])
def test_image_size_outside_the_limits(tmp_path, size):
    ok = write(tmp_path / "ok.npy", npy_bytes(np.zeros((2, 8, 8), np.uint8)))
    with pytest.raises(DataError) as err:
        data.load_pair(ok, ok, size)
    assert_one_line(err, f"image_size {size} is outside 8..1024", "MAX_IMAGE_SIZE")
    with pytest.raises(DataError) as err:
        data.load("synthetic", size)
    assert_one_line(err, f"synthetic: image_size {size} is outside 8..1024")


def test_image_size_at_the_limits(tmp_path):
    ok = write(tmp_path / "ok.npy", npy_bytes(np.full((1, 8, 8), 255, np.uint8)))
    assert data.load_pair(ok, ok, 8)[0].shape == (2, 1, 8, 8)
    assert data.load_pair(ok, ok, 1024)[0].shape == (2, 1, 1024, 1024)


# --- the limits: MAX_ARRAY_BYTES, PIL's MAX_IMAGE_PIXELS, memory ------------------------------------------------

def test_arrays_over_max_array_bytes_are_refused_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "MAX_ARRAY_BYTES", 1000)
    small = write(tmp_path / "small.npy", npy_bytes(np.zeros((3, 8, 8), np.uint8)))  # 768 float32 bytes
    big = write(tmp_path / "big.npy", npy_bytes(np.zeros((4, 8, 8), np.uint8)))  # 1024 float32 bytes
    assert data.load_pair(small, small)[0].shape == (6, 1, 8, 8)
    with pytest.raises(DataError) as err:
        data.load_pair(big, small)
    assert_one_line(err, "big.npy: its images come to 1,024 bytes as float32", "limit of 1,000 bytes",
                    "cxr.arrays.MAX_ARRAY_BYTES")
    path = write(tmp_path / "m.npz", npz_bytes(medmnist_members(n=2, size=8)))  # 6 x 512 bytes
    with pytest.raises(DataError) as err:
        data.load(f"npz:{path}")
    assert_one_line(err, "m.npz: its 6 arrays come to", "MAX_ARRAY_BYTES")


def test_folders_over_max_array_bytes_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(arrays, "MAX_ARRAY_BYTES", 4 * 16 * 16 * 3)  # three 16 x 16 images
    for i in range(4):
        write(tmp_path / "four" / f"{i}.png", image_bytes(Image.new("L", (16, 16)), "PNG"))
    with pytest.raises(DataError) as err:  # known from the number of files
        data.load_pair(tmp_path / "four", tmp_path / "four", 16)
    assert_one_line(err, "four: 4 images of 16x16 come to 4,096 bytes as float32", "limit of 3,072 bytes")
    with pytest.raises(DataError) as err:  # found while reading: the size is each file's own
        data.load_pair(tmp_path / "four", tmp_path / "four")
    assert_one_line(err, "3.png: with the images before it", "MAX_ARRAY_BYTES")


def test_decompression_bombs_are_refused(tmp_path, monkeypatch):
    write(tmp_path / "bomb" / "x.png", image_bytes(Image.new("L", (40, 40)), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 pixels: Pillow warns; refused here
    with pytest.raises(DataError) as err:
        data.load_pair(tmp_path / "bomb", tmp_path / "bomb", 8)
    assert_one_line(err, "x.png", "MAX_IMAGE_PIXELS = 1,000 pixels")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: Pillow raises
    with pytest.raises(DataError) as err:
        data.load_pair(tmp_path / "bomb", tmp_path / "bomb", 8)
    assert_one_line(err, "x.png", "decompression bomb")


def test_memory_errors_become_data_errors(tmp_path, monkeypatch):
    ok = write(tmp_path / "ok.npy", npy_bytes(np.zeros((2, 8, 8), np.uint8)))
    path = write(tmp_path / "m.npz", npz_bytes(medmnist_members()))

    def no_memory(*args, **kwargs):
        raise MemoryError

    with monkeypatch.context() as m:
        m.setattr(np, "load", no_memory)
        with pytest.raises(DataError) as err:
            data.load_pair(ok, ok)
        assert_one_line(err, "ok.npy: loading it needs more memory than is available")
    with monkeypatch.context() as m:
        m.setattr(np.lib.format, "read_array", no_memory)
        with pytest.raises(DataError) as err:
            data.load(f"npz:{path}")
        assert_one_line(err, "m.npz member 'train_images.npy': loading it needs more memory")
    with monkeypatch.context() as m:
        m.setattr(arrays, "_resize", lambda *a: (_ for _ in ()).throw(RuntimeError("can't allocate memory: 9 TB")))
        with pytest.raises(DataError) as err:
            data.load_pair(ok, ok, 16)
        assert_one_line(err, "ok.npy: loading it needs more memory", "can't allocate")


def test_keyboard_interrupt_is_not_swallowed(tmp_path, monkeypatch):
    write(tmp_path / "f" / "x.png", image_bytes(Image.new("L", (8, 8)), "PNG"))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Image, "open", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.load_pair(tmp_path / "f", tmp_path / "f")


def test_odd_npy_files(tmp_path):
    ok = write(tmp_path / "ok.npy", npy_bytes(np.zeros((2, 8, 8), np.uint8)))
    cases = {
        "pickled.npy": (npy_bytes(np.array([{"a": 1}], dtype=object)), "dtype object; expected numbers"),
        "structured.npy": (npy_bytes(np.zeros(3, [("a", "<u1")])), "dtype [('a', 'u1')]"),
        "negative.npy": (npy_header("'|u1'", (-2, 8, 8)) + bytes(128), "impossible shape (-2, 8, 8)"),
        "strings.npy": (npy_bytes(np.array(["a"])), "dtype <U1"),
        "short.npy": (npy_bytes(np.zeros((2, 8, 8), np.uint8))[:-1],
                      "shape (2, 8, 8) of uint8, 128 bytes, but it holds 127"),
        "v3.npy": (b"\x93NUMPY\x03\x00" + bytes(8), "format version 3.0; expected 1.0 or 2.0"),
    }
    for name, (content, message) in cases.items():
        with pytest.raises(DataError) as err:
            data.load_pair(write(tmp_path / name, content), ok)
        assert_one_line(err, name, message)
    with pytest.raises(DataError) as err:
        data.load_pair("/dev/null", ok)
    assert_one_line(err, "/dev/null: not a regular file")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_huge_claims_fail_cleanly_with_1_gib_of_address_space_to_spare(tmp_path):
    """A loader that allocates what a header claims dies here with a MemoryError traceback, not the machine.

    The subprocess imports numpy, torch, Pillow and cxr and loads a small file first, then limits its address
    space (RLIMIT_AS) to what it has mapped by then plus 1 GiB: not to 1 GiB in all, because the imports alone
    map about 0.6 GiB with the CPU build of torch and several GiB with a CUDA build (its libraries)."""
    ok = write(tmp_path / "ok.npy", npy_bytes(np.zeros((2, 8, 8), np.uint8)))
    huge = write(tmp_path / "huge.npy", huge_npy())
    npz = write(tmp_path / "huge.npz", npz_bytes(medmnist_members() | {"val_images.npy": huge_npy()}))
    compressed = write(tmp_path / "huge-z.npz", npz_bytes(medmnist_members() | {"test_labels.npy": huge_npy()},
                                                          compress=True))
    script = textwrap.dedent(f"""
        import resource
        import numpy as np
        from cxr import data
        from cxr.data import DataError
        data.load_pair({str(ok)!r}, {str(ok)!r}, 16)  # every library the loaders use is loaded before the limit
        mapped = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
        limit = mapped * 1024 + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            np.ones(2 << 30, np.uint8)
        except MemoryError:
            print("the limit holds")
        calls = [lambda: data.load_pair({str(huge)!r}, {str(ok)!r}, 8),
                 lambda: data.load_pair({str(ok)!r}, {str(huge)!r}),
                 lambda: data.load("npz:" + {str(npz)!r}),
                 lambda: data.load("npz:" + {str(compressed)!r}, 8)]
        for call in calls:
            try:
                call()
            except DataError as err:
                print("DataError:", err)
            else:
                raise SystemExit("loaded a file that claims 9 TiB")
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    first, *lines = done.stdout.splitlines()
    assert first == "the limit holds", done.stdout
    assert len(lines) == 4 and all("claims shape (10000000000000,)" in line for line in lines), lines


# --- fuzzing ----------------------------------------------------------------------------------------------

def mutations(content: bytes) -> st.SearchStrategy[bytes]:
    """content with 1 to 4 random byte-level edits: overwrite, insert, delete, truncate."""
    n = len(content)
    edit = st.one_of(
        st.tuples(st.just("overwrite"), st.integers(0, n - 1), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("insert"), st.integers(0, n), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("delete"), st.integers(0, n - 1), st.integers(1, 64)),
        st.tuples(st.just("truncate"), st.integers(0, n - 1), st.just(b"")),
    )

    def apply(edits) -> bytes:
        out = bytearray(content)
        for kind, at, arg in edits:
            at = min(at, len(out))
            if kind == "overwrite":
                out[at:at + len(arg)] = arg
            elif kind == "insert":
                out[at:at] = arg
            elif kind == "delete":
                del out[at:at + arg]
            else:
                del out[at:]
        return bytes(out)

    return st.lists(edit, min_size=1, max_size=4).map(apply)


DESCRS = ["'|u1'", "'<u2'", "'>u2'", "'<f4'", "'<f8'", "'<f2'", "'|b1'", "'<i8'", "'|O'", "'<c8'", "'|V0'",
          "'|S0'", "'<U3'", "[('a', '<u1')]", "'<M8[s]'", "'xyz'", "3", "None"]
DIMS = st.one_of(st.integers(0, 20), st.sampled_from([-1, 2**31, 2**32, 2**40, 10**13, 2**63, 2**64]))


@st.composite
def hostile_npy(draw, base: bytes) -> bytes:
    """A base .npy with random bytes, or with a new header (any descr, any shape) over its data."""
    if draw(st.booleans()):
        return draw(mutations(base))
    shape = tuple(draw(st.lists(DIMS, max_size=4)))
    header = npy_header(draw(st.sampled_from(DESCRS)), shape, draw(st.booleans()))
    return header + base[128:][:draw(st.integers(0, len(base)))]


def zip_size_fields(content: bytes) -> list[int]:
    """The offsets of every compressed and uncompressed size in a zip's local and central headers."""
    offsets = []
    for signature, first in ((b"PK\x03\x04", 18), (b"PK\x01\x02", 20)):
        at = content.find(signature)
        while at >= 0:
            offsets += [at + first, at + first + 4]
            at = content.find(signature, at + 1)
    return offsets


@st.composite
def hostile_npz(draw, members: dict[str, bytes]) -> bytes:
    """An npz with one member replaced by a hostile .npy, or random bytes, or lying zip size fields."""
    compress = draw(st.booleans())
    how = draw(st.sampled_from(["member", "bytes", "sizes"]))
    if how == "member":
        name = draw(st.sampled_from(sorted(members)))
        return npz_bytes(members | {name: draw(hostile_npy(members[name]))}, compress)
    content = npz_bytes(members, compress)
    if how == "bytes":
        return draw(mutations(content))
    out = bytearray(content)
    for at in draw(st.lists(st.sampled_from(zip_size_fields(content)), min_size=1, max_size=3)):
        out[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 100, 2**20, 2**31, 2**32 - 1])))
    return bytes(out)


def png_with_size(content: bytes, width: int, height: int) -> bytes:
    """content with IHDR's width and height replaced, its CRC recomputed (so that the decoder goes on)."""
    ihdr = bytearray(content[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    return content[:12] + bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr))) + content[33:]


def jpeg_with_size(content: bytes, width: int, height: int) -> bytes:
    at = content.find(b"\xff\xc0")
    return content[:at + 5] + struct.pack(">HH", height, width) + content[at + 9:]


SIDES = st.one_of(st.integers(0, 70), st.sampled_from([2**14, 2**15, 65535, 2**31 - 1, 2**32 - 1]))


@st.composite
def hostile_image(draw, base: bytes, fmt: str) -> bytes:
    if draw(st.booleans()):
        return draw(mutations(base))
    resize = png_with_size if fmt == "PNG" else jpeg_with_size
    width, height = draw(SIDES), draw(SIDES)
    if fmt == "JPEG":
        width, height = min(width, 65535), min(height, 65535)
    return resize(base, width, height)


def only_cxr_errors(load) -> None:
    """load() either gives float32 images in [0, 1] or raises a CxrError; anything else fails the example."""
    try:
        x = load()
    except CxrError as err:
        assert "\n" not in str(err)
        return
    assert x.dtype == torch.float32 and torch.isfinite(x).all() and 0 <= x.min() and x.max() <= 1


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    write(root / "ok.npy", npy_bytes(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)))
    write(root / "okfolder" / "a.png", image_bytes(Image.new("L", (8, 8), 99), "PNG"))
    return root


NPY_BASE = npy_bytes(np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8))
IMAGE_BASES = {
    "8-bit.png": image_bytes(Image.fromarray(np.random.default_rng(2).integers(0, 256, (12, 10), np.uint8)), "PNG"),
    "16-bit.png": image_bytes(Image.fromarray(np.random.default_rng(3).integers(0, 65536, (9, 12), np.uint16)),
                              "PNG"),
    "rgb.png": image_bytes(Image.new("RGB", (10, 10), (10, 200, 30)), "PNG"),
    "gray.jpeg": image_bytes(Image.fromarray(np.random.default_rng(4).integers(0, 256, (16, 24), np.uint8)),
                             "JPEG"),
    "rgb.jpeg": image_bytes(Image.new("RGB", (24, 16), (90, 90, 250)), "JPEG"),
}


@FUZZED
@FUZZ
@given(st.data(), st.sampled_from([8, None]))
def test_fuzzed_npy(fuzz_dir, draw, size):
    path = write(fuzz_dir / "fuzzed.npy", draw.draw(hostile_npy(NPY_BASE)))
    only_cxr_errors(lambda: data.load_pair(path, fuzz_dir / "ok.npy", size)[0])


@FUZZED
@FUZZ
@given(st.data())
def test_fuzzed_npz(fuzz_dir, draw):
    path = write(fuzz_dir / "fuzzed.npz", draw.draw(hostile_npz(medmnist_members())))
    data.clear_cache()
    only_cxr_errors(lambda: data.load(f"npz:{path}", 8).train.x)


@FUZZED
@FUZZ
@given(st.data(), st.sampled_from(sorted(n for n in IMAGE_BASES if n.endswith(".png"))), st.sampled_from([8, None]))
def test_fuzzed_png(fuzz_dir, draw, name, size):
    path = write(fuzz_dir / "png" / "x.png", draw.draw(hostile_image(IMAGE_BASES[name], "PNG")))
    only_cxr_errors(lambda: data.load_pair(fuzz_dir / "okfolder", path.parent, size)[0])


@FUZZED
@FUZZ
@given(st.data(), st.sampled_from(sorted(n for n in IMAGE_BASES if n.endswith(".jpeg"))), st.sampled_from([8, None]))
def test_fuzzed_jpeg(fuzz_dir, draw, name, size):
    path = write(fuzz_dir / "jpeg" / "x.jpeg", draw.draw(hostile_image(IMAGE_BASES[name], "JPEG")))
    only_cxr_errors(lambda: data.load_pair(path.parent, fuzz_dir / "okfolder", size)[0])
