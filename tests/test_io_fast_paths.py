"""The fast paths under the engine give the same bytes as the plain ones, and fail as loudly.

- staged output files (``io/staged.py``): O_DIRECT or the page cache, in or out of order,
  read back with the ``safetensors`` library and hashed with hashlib;
- tiled transposes (``io/dtypes.contiguous``) against numpy's own copy;
- CRC-32 checks of .npz members (zip's CRC, computed by ISA-L) run on their own thread during a conversion and still
  refuse a corrupt member, leaving nothing behind;
- merge-lora's banded Linear merge against the whole-matrix float32 arithmetic, and split
  over two threads against one.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from clawconvert.io import dtypes, staged
from clawconvert.io.dtypes import contiguous
from clawconvert.io.writers import SafetensorsWriter

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((300, 70)).astype(np.float32),        # spans stages below
            "b": rng.standard_normal((3,)).astype(np.float16),
            "empty": np.zeros((0, 4), np.float32),
            "c": rng.standard_normal((1000, 33)).astype(np.float32),
            # transposed views: laid out straight into the buffers, slices straddling them
            "t": rng.standard_normal((77, 1300)).astype(np.float32).T,
            "t3": rng.standard_normal((9, 50, 70)).astype(ml_dtypes.bfloat16).transpose(2, 0, 1)}


def _write(out: Path, tensors: dict[str, np.ndarray], order: list[str], **kw) -> SafetensorsWriter:
    plan = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    w = SafetensorsWriter(out, plan, **kw)
    for k in order:
        w.write(k, tensors[k])
    w.close()
    return w


@pytest.fixture
def small_stages(monkeypatch):
    """Stages of 8 KiB: every tensor below crosses stage boundaries and the ring wraps."""
    from clawconvert.io import writers
    monkeypatch.setattr(writers, "stage_size", lambda total: 8192)
    calls = []
    real = staged.Staging.submit
    monkeypatch.setattr(staged.Staging, "submit", lambda self, *a: (calls.append(a[2]), real(self, *a))[1])
    yield calls


@pytest.mark.parametrize("direct", ["1", "0"])
def test_many_shards_need_no_more_buffers_than_one_file(tmp_path, monkeypatch, direct):
    """Ten shards, written in order: each file's header goes out with its first tensor and the
    file is flushed after its last, so three buffers serve them all (four or more shards used
    to exhaust the ring: every shard's header held a buffer from the start)."""
    monkeypatch.setenv("CLAWCONVERT_DIRECT_IO", direct)
    rng = np.random.default_rng(3)
    tensors = {f"t{i}": rng.standard_normal((1000,)).astype(np.float32) for i in range(10)}
    w = _write(tmp_path, tensors, list(tensors), max_shard_size=4000)
    shards = sorted(tmp_path.glob("model-*-of-00010.safetensors"))
    assert len(shards) == 10 and w._staging._made <= staged.STAGES
    got = {}
    for f in shards:
        got.update(load_file(f))
        assert hashlib.sha256(f.read_bytes()).hexdigest() == w.hashes[f.name]
    assert set(got) == set(tensors) and all(np.array_equal(got[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("direct", ["1", "0"])
@pytest.mark.parametrize("order", ["planned", "reversed"])
def test_staged_files_read_back_exactly(tmp_path, monkeypatch, small_stages, direct, order):
    monkeypatch.setenv("CLAWCONVERT_DIRECT_IO", direct)
    t = _tensors()
    names = list(t) if order == "planned" else list(reversed(t))
    w = _write(tmp_path, t, names, max_shard_size=300_000)   # several shards
    assert len(w.files) >= 2
    if order == "planned":
        assert len(small_stages) > 20 and max(small_stages) == 8192   # many full stages written
    back = {}
    for f in w.files:
        back.update(load_file(f))
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if order == "planned":
            assert w.hashes[f.name] == digest       # hashed while written, nothing read back
        else:
            assert f.name not in w.hashes or w.hashes[f.name] == digest
    assert set(back) == set(t)
    for k in t:
        assert back[k].dtype == t[k].dtype and np.array_equal(back[k].view(np.uint8), np.ascontiguousarray(t[k]).view(np.uint8))


def test_copy_range_reads_into_the_stages(tmp_path, small_stages):
    src = tmp_path / "src.bin"
    payload = np.random.default_rng(1).integers(0, 255, size=50_000, dtype=np.uint8)
    src.write_bytes(b"x" * 123 + payload.tobytes())
    w = SafetensorsWriter(tmp_path, [("head", (5,), np.dtype("uint8")), ("p", (50_000,), np.dtype("uint8"))])
    w.write("head", np.arange(5, dtype=np.uint8))
    w.copy_range("p", src, 123, 50_000)
    (f,) = w.close()
    back = load_file(f)
    assert np.array_equal(back["p"], payload) and np.array_equal(back["head"], np.arange(5))
    assert w.hashes[f.name] == hashlib.sha256(f.read_bytes()).hexdigest()


def test_file_systems_without_o_direct_fall_back(tmp_path, monkeypatch):
    """tmpfs and others refuse O_DIRECT at open (EINVAL): the same file, through the page cache."""
    real_open = os.open

    def no_direct(path, flags, mode=0o777, **kw):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)
    monkeypatch.setattr(staged.os, "open", no_direct)
    t = _tensors()
    w = _write(tmp_path, t, list(t))
    assert not w.direct
    back = load_file(w.files[0])
    assert all(np.array_equal(back[k], t[k]) for k in t)


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
def test_direct_io_pads_then_truncates(tmp_path, monkeypatch):
    monkeypatch.setenv("CLAWCONVERT_DIRECT_IO", "1")
    t = {"x": np.arange(1001, dtype=np.float32)}   # the file is not a whole number of 4 KiB blocks
    w = _write(tmp_path, t, ["x"])
    f = w.files[0]
    header = int.from_bytes(f.read_bytes()[:8], "little")
    assert f.stat().st_size == 8 + header + 4004
    assert np.array_equal(load_file(f)["x"], t["x"])


@pytest.mark.parametrize("shape", [(4304, 1152), (1152, 16, 72), (768, 3072), (37, 1000, 3), (129, 40000), (1, 4096, 300)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_tiled_transposes_match_numpy(shape, dtype):
    a = (np.random.default_rng(0).standard_normal(shape) * 8).astype(dtype)
    for perm in itertools.permutations(range(a.ndim)):
        v = a.transpose(perm)
        got = contiguous(v)
        assert got.flags.c_contiguous and got.dtype == a.dtype
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(v).view(np.uint8)), perm
    flipped = a.T[::-1]
    assert np.array_equal(contiguous(flipped), np.ascontiguousarray(flipped))


def test_tiled_copy_is_used_for_large_transposes(monkeypatch):
    calls = []
    real = dtypes._tiled_copy
    monkeypatch.setattr(dtypes, "_tiled_copy", lambda out, x: (calls.append(x.shape), real(out, x)))
    contiguous(np.zeros((2048, 512), np.float32).T)
    contiguous(np.zeros((16, 16), np.float32).T)       # small: numpy's copy
    assert calls == [(512, 2048)]


def _corrupt_member(src: Path, dst: Path, member_suffix: str) -> str:
    """Copy ``src`` flipping one byte in the data of the first member ending in ``member_suffix``."""
    shutil.copy(src, dst)
    with zipfile.ZipFile(src) as z:
        m = next(i for i in z.infolist() if i.filename.endswith(member_suffix) and i.file_size > 512)
    raw = bytearray(dst.read_bytes())
    local = m.header_offset
    name_len = int.from_bytes(raw[local + 26:local + 28], "little")
    extra_len = int.from_bytes(raw[local + 28:local + 30], "little")
    at = local + 30 + name_len + extra_len + m.file_size - 3     # inside the array data
    raw[at] ^= 0xFF
    dst.write_bytes(bytes(raw))
    return m.filename


def test_the_npz_crc32_is_zips_crc32():
    """The reader's CRC-32 (ISA-L's when installed) gives zlib's value, chained and not."""
    import zlib

    from clawconvert.io.readers import crc32
    rng = np.random.default_rng(3)
    for n in (0, 1, 7, 4096, 1_000_003):
        data = rng.integers(0, 256, n, dtype=np.uint8)
        head = bytes(rng.integers(0, 256, 128, dtype=np.uint8))
        assert crc32(memoryview(data)) == zlib.crc32(memoryview(data))
        assert crc32(memoryview(data), crc32(head)) == zlib.crc32(memoryview(data), zlib.crc32(head))


@pytest.mark.parametrize("fixture", ["siglip_tiny.npz", "siglip_tiny_scan.npz"])
def test_a_corrupt_npz_member_is_refused_mid_conversion(tmp_path, cli, fixture):
    src = tmp_path / "bad.npz"
    member = _corrupt_member(FIXTURES / "big_vision" / fixture, src, "MAPHead_0/MlpBlock_0/Dense_0/kernel.npy")
    before = src.read_bytes()
    out = tmp_path / "out"
    r = cli("convert", src, out, "--to", "hf")
    assert r.code == 2, r.err
    assert "corrupt (Bad CRC-32)" in r.err and member in r.err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.npz"]
    assert src.read_bytes() == before


class _Factors:
    """An adapter's LoRA factors from a dict: what merged_linear / merge_into read."""

    def __init__(self, d):
        self.d = d

    def read(self, key):
        return self.d[key]


def test_banded_lora_merge_matches_whole_matrix_arithmetic():
    from clawconvert.surgery.lora import LoraModule, merge_into, merged_linear

    rng = np.random.default_rng(0)
    module = LoraModule("m", "linear", "a", "b", scale=2.0, r=16)
    for rows, cols in [(600, 700), (37, 11), (3000, 90)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        f = _Factors({"a": rng.standard_normal((16, cols)).astype(np.float32) * 0.05,
                      "b": rng.standard_normal((rows, 16)).astype(np.float32) * 0.05})
        whole = merge_into(w.copy(), f, module, fan_in_fan_out=False)
        banded = merged_linear(w, f, module, np.dtype(np.float32))
        np.testing.assert_allclose(banded, whole, rtol=1e-6, atol=1e-6)
        bf = w.astype(ml_dtypes.bfloat16)
        got = merged_linear(bf, f, module, bf.dtype).astype(np.float32)
        want = merge_into(bf.astype(np.float32), f, module, False).astype(ml_dtypes.bfloat16).astype(np.float32)
        assert np.mean(got != want) < 1e-3 and np.max(np.abs(got - want)) <= 2 ** -6 * np.abs(want).max()


def test_a_large_merge_split_over_two_threads_gives_the_same_bytes(monkeypatch):
    """Weights past pipeline.TWO_THREADS_FROM are merged in two halves (one on the helper thread):
    the same bands, so the same bytes as one thread; an error in either half is raised."""
    from threadpoolctl import threadpool_limits

    from clawconvert.io import pipeline
    from clawconvert.surgery import lora

    rng = np.random.default_rng(1)
    module = lora.LoraModule("m", "linear", "a", "b", scale=0.5, r=8)
    w = rng.standard_normal((4099, 300)).astype(ml_dtypes.bfloat16)
    f = _Factors({"a": rng.standard_normal((8, 300)).astype(np.float32) * 0.05,
                  "b": rng.standard_normal((4099, 8)).astype(np.float32) * 0.05})
    calls = []
    real = lora._merge_rows
    monkeypatch.setattr(lora, "_merge_rows", lambda *a: (calls.append(a[6:8]), real(*a))[1])   # (first, last)
    with threadpool_limits(limits=1, user_api="blas"):
        one = lora.merged_linear(w, f, module, w.dtype)
        monkeypatch.setattr(pipeline, "TWO_THREADS_FROM", 0)
        two = lora.merged_linear(w, f, module, w.dtype)
    halves = sorted(calls[1:])
    assert calls[0] == (0, 4099) and len(halves) == 2 and halves[0][0] == 0 and halves[0][1] == halves[1][0] and halves[1][1] == 4099
    assert one.view(np.uint16).tobytes() == two.view(np.uint16).tobytes()
    assert not np.array_equal(two.astype(np.float32), w.astype(np.float32))      # it did merge
    f.d["b"] = f.d["b"][:4000]                                                   # half 2 fails
    with pytest.raises(ValueError):
        lora.merged_linear(w, f, module, w.dtype)
