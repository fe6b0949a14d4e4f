"""The torch-free .pth writer and reader (clawconvert.io.torchzip) against torch.save / torch.load."""
from __future__ import annotations

import collections
import os
import pickle

import numpy as np
import pytest
import torch

from clawconvert.errors import ClawError
from clawconvert.io.dtypes import as_numpy, as_torch, dtype_of
from clawconvert.io.readers import TorchPickleStore
from clawconvert.io.torchzip import TorchZipWriter, open_state_dict, read_state_dict_index

TENSORS = collections.OrderedDict([
    ("a", torch.randn(3, 5)), ("b.bf16", torch.randn(7).to(torch.bfloat16)), ("c.half", torch.randn(2, 2).half()),
    ("scalar", torch.tensor(2.5)), ("empty", torch.zeros(0, 3)), ("ids", torch.arange(4)),
    ("flag", torch.tensor([True, False])), ("big", torch.randn(300, 300)),
])


def test_written_files_load_in_torch_with_mmap_and_weights_only(tmp_path):
    path = tmp_path / "x.pth"
    w = TorchZipWriter(path, [(k, tuple(v.shape), dtype_of(v.dtype)) for k, v in TENSORS.items()])
    for k, v in TENSORS.items():
        w.write(k, as_numpy(v))
    w.close()
    for kw in ({"mmap": True}, {}):
        got = torch.load(path, weights_only=True, **kw)
        assert list(got) == list(TENSORS)
        for k, v in TENSORS.items():
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_torch_save_files_are_read_without_torch_and_equal_torch_load(tmp_path):
    path = tmp_path / "sd.pth"
    shared = torch.randn(10)
    sd = collections.OrderedDict(TENSORS, **{"module.view": shared[2:6]})   # a view into a larger storage
    torch.save(sd, path)
    index = read_state_dict_index(path)                                        # headers only: the pickle and zip
    assert list(index) == list(sd)
    store = open_state_dict(path)
    assert not isinstance(store, TorchPickleStore) and hasattr(store, "byte_range")
    for k, v in sd.items():
        assert torch.equal(as_torch(store.read(k)), v), k


@pytest.mark.parametrize("case", ["legacy", "noncontiguous", "wrapped", "parameter"])
def test_anything_else_falls_back_to_torch_load(tmp_path, case):
    path = tmp_path / "x.pth"
    if case == "legacy":
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    elif case == "noncontiguous":
        torch.save({"w": torch.randn(3, 4).T}, path)
    elif case == "wrapped":
        torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, path)
    else:
        torch.save({"w": torch.nn.Parameter(torch.ones(2))}, path)
    store = open_state_dict(path)
    assert set(store.keys()) == {"w"}
    assert isinstance(store, TorchPickleStore) == (case != "parameter")   # a Parameter is still plain data


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(1), "x": Evil()}, path, pickle_module=pickle)
    with pytest.raises(ClawError, match="refused"):
        open_state_dict(path)
