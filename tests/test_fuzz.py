"""Fuzzing, short CI version: random corruption of valid fixtures, per reader.

``tools/fuzz.py`` is the dedicated command (>= 1000 cases per format, worker processes with
hard time limits); this runs the same cases in-process, a few dozen per format, each under
a time bound (SIGALRM), with the write audit armed.  Zero tracebacks, zero hangs, zero
writes outside the case's temporary directory, sources unchanged, no partial outputs, and
every refusal one line naming a file.

Hypothesis drives the parsers directly with structured garbage: safetensors headers, index
weight maps, ``.npy`` headers inside zips, JSON text.
"""
from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import fuzz  # noqa: E402

CASES_PER_FORMAT = int(os.environ.get("CLAWCONVERT_FUZZ_CASES", "25"))
TIME_BOUND = 20.0


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    b = fuzz.build_bases(root / "base")
    for fmt in fuzz.FORMATS:  # warm-up (first conversions import open_clip / transformers models)
        fuzz.run_case(fmt, -1, 0, b, root / "warm", 0)
    return root, b


@pytest.mark.parametrize("fmt", fuzz.FORMATS)
def test_random_corruption_is_always_refused_cleanly(fmt, bases):
    root, b = bases
    results = [fuzz.run_case(fmt, i, 0, b, root / "cases", TIME_BOUND) for i in range(CASES_PER_FORMAT)]
    bad = [f"#{r.index} {r.mutation}: [{r.outcome}] {r.message}\n{r.detail[-1500:]}"
           for r in results if r.outcome in fuzz.BAD or r.outcome == "unclear"]
    assert not bad, "\n".join(bad)
    refused = sum(r.outcome == "refused" for r in results)
    assert refused >= CASES_PER_FORMAT // 4, [r.outcome for r in results]  # the corruptions do bite


# ------------------------------------------------------------------------------------
# hypothesis: the parsers themselves
# ------------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2",
          "C64", "f32", "", "U16"]
ints = st.one_of(st.integers(-3, 64), st.sampled_from([2**31, 2**63, 2**64 + 1]), st.booleans(),
                 st.floats(allow_nan=True), st.none(), st.text(max_size=3))
entry = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(DTYPES), ints),
    "shape": st.one_of(st.lists(ints, max_size=3), ints),
    "data_offsets": st.one_of(st.lists(ints, min_size=0, max_size=3), ints),
})
header_st = st.dictionaries(st.text(max_size=8), st.one_of(entry, ints, st.lists(ints, max_size=2)), max_size=4)


def _readable(path: Path) -> None:
    """Open with the library reader and read every tensor; only ClawError may escape."""
    from clawconvert.errors import ClawError
    from clawconvert.io.readers import open_tensors
    try:
        with open_tensors(path) as store:
            for name in store.keys():
                t = store.read(name)
                assert tuple(t.shape) == store.info(name).shape
    except ClawError as e:
        assert "\n" not in str(e) and str(path.name) in str(e)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=header_st, data=st.binary(max_size=96), length_delta=st.sampled_from([0, 0, 0, -1, 1, 7, -8]))
def test_safetensors_header_parser(header, data, length_delta, tmp_path):
    raw = json.dumps(header, allow_nan=True).encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes((len(raw) + length_delta).to_bytes(8, "little", signed=True) + raw + data)
    _readable(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(weight_map=st.one_of(st.dictionaries(st.text(max_size=6), st.one_of(
    st.sampled_from(["a.safetensors", "../a.safetensors", "/etc/passwd", "sub/../a.safetensors", "", ".", "..",
                     "b.safetensors", "a.safetensors\0x", "C:\\a.safetensors", "\\\\host\\share"]),
    ints, st.text(max_size=6)), max_size=4), ints, st.lists(ints, max_size=2)))
def test_index_weight_map_parser(weight_map, tmp_path):
    from safetensors.torch import save_file
    import torch
    d = tmp_path / "idx"
    d.mkdir(exist_ok=True)
    save_file({"x": torch.zeros(2)}, str(d / "a.safetensors"))
    path = d / "model.safetensors.index.json"
    path.write_text(json.dumps({"weight_map": weight_map}, allow_nan=True))
    _readable(path)


npy_header = st.fixed_dictionaries({
    "descr": st.one_of(st.sampled_from(["<f4", "<f2", "|V2", "<i8", "|b1", "<c8", "|O", "<U3", ">f4", "xx"]), ints),
    "fortran_order": st.one_of(st.booleans(), ints),
    "shape": st.one_of(st.tuples(), st.tuples(st.integers(0, 4)), st.tuples(st.integers(-1, 4), st.integers(0, 3)),
                       ints),
})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(headers=st.lists(st.tuples(st.sampled_from(["a", "b", "params/a", "a"]), npy_header,
                                  st.binary(max_size=40)), max_size=3),
       tail=st.sampled_from([b"", b"\0", b"PK\x05\x06"]))
def test_npz_member_parser(headers, tail, tmp_path):
    import warnings
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, head, data in headers:
            text = repr(head).encode("latin1", "replace")
            text += b" " * (-(len(text) + 11) % 64) + b"\n"
            z.writestr(name + ".npy", b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + data)
    path = tmp_path / "f.npz"
    path.write_bytes(buf.getvalue() + tail)
    _readable(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode),
                      st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n)))
def test_json_reader(text, tmp_path):
    from clawconvert.errors import ClawError
    from clawconvert.io.readers import read_json_file
    path = tmp_path / "c.json"
    path.write_bytes(text)
    try:
        read_json_file(path)
    except ClawError as e:
        assert "\n" not in str(e) and str(path) in str(e)
