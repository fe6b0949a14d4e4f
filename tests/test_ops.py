"""Every op's inverse returns its input bit-exact, and shape rules agree with the data path.

The ops run on numpy arrays; the tests build inputs and expected results with torch (an
independent implementation of permute / split / cat) and compare through zero-copy views.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clawconvert.errors import ClawError
from clawconvert.io.dtypes import as_numpy, as_torch
from clawconvert.ops import OPS, build_chain, evaluate

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def roundtrip(spec, xs, n_canonical, dims=None):
    """Run ``spec`` forward and back on numpy views of the torch tensors ``xs``; returns torch."""
    chain = build_chain(spec, dims or {}, len(xs), n_canonical)
    ys = chain.load([as_numpy(x) for x in xs])
    assert [tuple(y.shape) for y in ys] == chain.load_shapes([tuple(x.shape) for x in xs])
    back = [as_torch(b) for b in chain.save(ys)]
    assert chain.save_shapes([tuple(y.shape) for y in ys]) == [tuple(x.shape) for x in xs]
    ys = [as_torch(y) for y in ys]
    assert len(back) == len(xs)
    for a, b in zip(xs, back):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a, b)
        assert a.contiguous().view(-1).view(torch.uint8).tolist() == b.contiguous().view(-1).view(torch.uint8).tolist()
    return ys


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_roundtrip_is_bit_exact(dtype):
    x = torch.randn(5, 7).to(dtype)
    (y,) = roundtrip("transpose", [x], 1)
    assert y.shape == (7, 5) and torch.equal(y, x.T)


def test_permute_hwio_to_oihw_and_back():
    x = torch.randn(4, 4, 3, 8)  # big_vision conv kernel HWIO
    (y,) = roundtrip({"permute": [3, 2, 0, 1]}, [x], 1)
    assert y.shape == (8, 3, 4, 4)
    assert torch.equal(y[5, 1, 2, 3], x[2, 3, 1, 5])


def test_reshape_with_dimension_expressions():
    x = torch.randn(8, 2, 4)  # (D, H, hd) as in big_vision q kernels
    (y,) = roundtrip({"reshape": {"format": ["D", "H", "hd"], "canonical": ["D", "H * hd"]}}, [x], 1,
                     {"D": 8, "H": 2, "hd": 4})
    assert y.shape == (8, 8)


def test_squeeze_unsqueeze():
    roundtrip({"squeeze": 0}, [torch.randn(1, 5, 3)], 1)
    roundtrip({"unsqueeze": 0}, [torch.randn(5)], 1)


def test_split_into_qkv_and_concat_back():
    x = torch.randn(12, 4)
    q, k, v = roundtrip("split", [x], 3)
    assert torch.equal(q, x[:4]) and torch.equal(k, x[4:8]) and torch.equal(v, x[8:])


def test_split_with_sizes_from_config():
    x = torch.randn(10)
    a, b = roundtrip({"split": {"dim": 0, "sizes": ["D", "2 * D"]}}, [torch.randn(9)], 2, {"D": 3})
    assert a.shape == (3,) and b.shape == (6,)
    with pytest.raises(ClawError, match="not 3 \\+ 6"):
        build_chain({"split": {"dim": 0, "sizes": ["D", "2 * D"]}}, {"D": 3}, 1, 2).load([x])


def test_concat_q_and_kv_into_in_proj():
    q, kv = torch.randn(4, 4), torch.randn(8, 4)
    (y,) = roundtrip({"concat": {"dim": 0, "sizes": ["D", "2 * D"]}}, [q, kv], 1, {"D": 4})
    assert torch.equal(y, torch.cat([q, kv]))


def test_chain_of_ops_inverts_in_reverse_order():
    x = torch.randn(6, 2, 3)
    roundtrip([{"reshape": {"format": [6, 2, 3], "canonical": [6, 6]}}, "transpose"], [x], 1)


def test_unknown_op_and_wrong_arity_are_refused():
    with pytest.raises(ClawError, match="unknown op"):
        build_chain("frobnicate", {}, 1, 1)
    with pytest.raises(ClawError, match="turn 1 tensors into 1, table names 3"):
        build_chain("transpose", {}, 1, 3)
    with pytest.raises(ClawError, match="not a permutation"):
        build_chain({"permute": [0, 0]}, {}, 1, 1)
    with pytest.raises(ClawError, match="only"):
        evaluate("__import__('os')", {})


def test_vocabulary_is_closed_and_all_ops_tested():
    assert set(OPS) == {"transpose", "permute", "reshape", "squeeze", "unsqueeze", "split", "concat", "constant",
                        "absent", "fold", "masked_split", "rope_periods", "add"}


def test_add_stores_w_plus_c_and_takes_it_off_again():
    """llama.cpp's Gemma norms: the format holds 1 + w (convert_hf_to_gguf.py Gemma3Model.norm_shift)."""
    w = np.random.default_rng(0).standard_normal(64).astype(np.float32) * 0.1
    chain = build_chain({"add": 1}, {}, 1, 1)
    (stored,) = chain.save([w])
    assert np.array_equal(stored, w + np.float32(1))
    (back,) = chain.load([stored])
    assert np.abs(back - w).max() <= 1e-7
    assert chain.save_shapes([(64,)]) == [(64,)]
    with pytest.raises(ClawError, match="write a number"):
        build_chain({"add": "one"}, {}, 1, 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_split_keeps_the_unmasked_parts_and_checks_the_mask(dtype):
    """DINOv3's qkv bias and bias_mask: torch's own bias * mask is what the kept parts stand for."""
    spec = {"masked_split": {"parts": 3, "keep": [0, 2]}}
    bias = torch.randn(12).to(dtype)
    mask = torch.cat([torch.ones(4), torch.zeros(4), torch.ones(4)]).to(dtype)
    bias[4:8] = 0                                  # trained k third: its gradient is masked, it stays at 0
    q, v = roundtrip(spec, [bias, mask], 2)
    assert torch.equal(torch.cat([q, torch.zeros(4, dtype=dtype), v]), bias * mask)
    chain = build_chain(spec, {}, 2, 2)
    bias[4:8] = 3.0                                # a non-zero k third: dropped, the same function
    f_bias, f_mask = (as_torch(t) for t in chain.save(chain.load([as_numpy(bias), as_numpy(mask)])))
    assert torch.equal(f_bias * f_mask, bias * mask) and torch.equal(f_mask, mask)
    for bad in (torch.full((12,), float("nan")), torch.ones(12)):
        with pytest.raises(ClawError, match="not 1 on parts"):
            chain.load([as_numpy(bias), as_numpy(bad.to(dtype))])
    with pytest.raises(ClawError, match="equal parts"):
        chain.load_shapes([(10,), (10,)])
    with pytest.raises(ClawError, match="keeps 1 parts for 2"):
        build_chain({"masked_split": {"keep": [1]}}, {}, 2, 2)


@pytest.mark.parametrize("head", [16, 32, 64, 128])
def test_rope_periods_are_the_bytes_facebookresearch_computes(head):
    """RopePositionEmbedding._init_weights in float32 (torch) for every published DINOv3 head width, theta 100."""
    chain = build_chain({"rope_periods": {"theta": "rope_theta", "head_dim": "hd"}}, {"rope_theta": 100.0, "hd": head}, 1, 0)
    want = 100.0 ** (2 * torch.arange(head // 4, dtype=torch.float32) / (head // 2))
    (got,) = chain.save([])
    assert torch.equal(as_torch(got), want) and chain.save_shapes([]) == [(head // 4,)]
    assert chain.load([as_numpy(want)]) == [] and chain.load_shapes([(head // 4,)]) == []
    with pytest.raises(ClawError, match="not 100"):
        chain.load([as_numpy(want * 1.01)])
    with pytest.raises(ClawError, match="expected"):
        chain.load_shapes([(head // 4 + 1,)])
    with pytest.raises(ClawError, match="not a number"):
        build_chain({"rope_periods": {"theta": "hd", "head_dim": 8}}, {"hd": True}, 1, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_absent_makes_zeros_and_stores_nothing_whatever_it_holds(dtype):
    chain = build_chain({"absent": {"zeros": [1, "D"]}}, {"D": 4}, 0, 1)
    (m,) = (as_torch(t) for t in chain.load([]))
    assert torch.equal(m, torch.zeros(1, 4)) and chain.load_shapes([]) == [(1, 4)]
    assert chain.save([as_numpy(torch.randn(1, 4).to(dtype))]) == []   # the family notes the loss
    with pytest.raises(ClawError, match="shape"):
        chain.save([as_numpy(torch.zeros(2, 4))])
    with pytest.raises(ClawError, match="zeros"):
        build_chain({"absent": {"eye": 3}}, {}, 0, 1)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 5), dtype=st.sampled_from(DTYPES))
def test_property_fold_roundtrip_from_the_format_is_bit_exact(n, d, dtype):
    cls = torch.randn(1, 1, d).to(dtype)
    cls[0, 0, 0] = -0.0          # x + (-0.0) keeps every x, the negative zero included
    cls_c, pos_c = roundtrip({"fold": {"dim": 1}}, [cls, torch.randn(1, n, d).to(dtype)], 2)
    assert pos_c.shape == (1, n + 1, d) and torch.equal(cls_c, cls)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fold_from_the_canonical_side_is_exact_in_function(dtype):
    """torch computes the same class-token input (cls + its position) from both forms."""
    chain = build_chain({"fold": {"dim": 1}}, {}, 2, 2)
    cls, pos = torch.randn(1, 1, 8).to(dtype), torch.randn(1, 5, 8).to(dtype)
    f_cls, f_pos = (as_torch(t) for t in chain.save([as_numpy(cls), as_numpy(pos)]))
    assert torch.equal(f_cls, cls + pos[:, :1]) and torch.equal(f_pos, pos[:, 1:])
    c_cls, c_pos = (as_torch(t) for t in chain.load([as_numpy(f_cls), as_numpy(f_pos)]))
    assert torch.equal(c_cls + c_pos[:, :1], cls + pos[:, :1]) and torch.equal(c_pos[:, 1:], pos[:, 1:])
    with pytest.raises(ClawError, match="fold"):
        chain.save_shapes([(1, 2, 8), (1, 5, 8)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_constant_makes_identity_head_and_stores_nothing(dtype):
    chain = build_chain({"constant": [{"eye": "T"}, {"zeros": ["T"]}]}, {"T": 3}, 0, 2)
    w, b = (as_torch(t) for t in chain.load([]))
    assert torch.equal(w, torch.eye(3)) and torch.equal(b, torch.zeros(3))
    assert chain.load_shapes([]) == [(3, 3), (3,)] and chain.save_shapes([(3, 3), (3,)]) == []
    assert chain.save([as_numpy(w.to(dtype)), as_numpy(b.to(dtype))]) == []   # inverse: nothing to store
    with pytest.raises(ClawError, match="not an identity"):       # never drops information
        chain.save([as_numpy(w * 2), as_numpy(b)])
    with pytest.raises(ClawError, match="not all zeros"):
        chain.save([as_numpy(w), as_numpy(b + 1)])


shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, data=st.data(), dtype=st.sampled_from(DTYPES))
def test_property_permute_roundtrip(shape, data, dtype):
    perm = data.draw(st.permutations(list(range(len(shape)))))
    roundtrip({"permute": list(perm)}, [torch.randn(shape).to(dtype)], 1)


@settings(max_examples=60, deadline=None)
@given(parts=st.integers(1, 4), size=st.integers(1, 4), rest=shapes, dtype=st.sampled_from(DTYPES))
def test_property_split_concat_roundtrip(parts, size, rest, dtype):
    x = torch.randn([parts * size] + rest).to(dtype)
    roundtrip("split", [x], parts)
    roundtrip("concat", list(torch.split(x, size)), 1) if parts > 1 else None


@settings(max_examples=60, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(DTYPES))
def test_property_reshape_flatten_roundtrip(shape, dtype):
    n = 1
    for s in shape:
        n *= s
    roundtrip({"reshape": {"format": shape, "canonical": [n]}}, [torch.randn(shape).to(dtype)], 1)


@pytest.mark.parametrize("spec,shape,n,dims", [
    ("split", (12, 4), 3, {}),                                        # OpenCLIP in_proj -> q, k, v
    ({"split": {"dim": 0, "sizes": ["D", "2 * D"]}}, (9,), 2, {"D": 3}),
    ([{"reshape": {"format": [1, 6, 4], "canonical": [6, 4]}}, "split"], (1, 6, 4), 2, {}),
    ({"squeeze": 0}, (1, 5, 3), 1, {}),
    ({"split": {"dim": 1}}, (1, 6, 2), 3, {}),                         # leading axis of size 1
])
def test_load_span_names_the_bytes_each_part_is_made_of(spec, shape, n, dims):
    """The engine copies such parts as byte ranges; the range must hold exactly the part."""
    chain = build_chain(spec, dims, 1, n)
    x = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
    for i, part in enumerate(chain.load([x])):
        offset, count = chain.load_span(shape, i)
        assert np.array_equal(x.reshape(-1)[offset:offset + count], part.reshape(-1))


@pytest.mark.parametrize("spec,shape,n", [("transpose", (3, 4), 1), ({"split": {"dim": 1}}, (2, 6), 3),
                                          ({"permute": [1, 0, 2]}, (2, 3, 4), 1)])
def test_load_span_refuses_ops_that_move_elements(spec, shape, n):
    chain = build_chain(spec, {}, 1, n)
    assert all(chain.load_span(shape, i) is None for i in range(n))
