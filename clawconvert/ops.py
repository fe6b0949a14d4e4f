"""The closed vocabulary of tensor ops a mapping table may use, each with its inverse.

An op turns a list of *format* tensors into a list of *canonical* tensors (``load``) and
back (``save``); ``load_shapes`` / ``save_shapes`` do the same for shapes, so a whole
conversion is planned and checked from file headers before any data is read.  ``save`` is
the exact inverse of ``load``: ``save(load(x)) == x`` bit for bit (tested for every op).

=========================  =========================================  =====================
table spelling             load (format -> canonical)                 save (inverse)
=========================  =========================================  =====================
``transpose``              swap the two axes of a matrix               transpose
``permute: [3, 2, 0, 1]``  permute axes                                inverse permutation
``reshape: {format: S1,    reshape S1 -> S2                            reshape S2 -> S1
  canonical: S2}``
``squeeze: D``             drop axis D (of size 1)                     unsqueeze D
``unsqueeze: D``           add an axis of size 1 at D                  squeeze D
``split: {dim, sizes}``    1 format tensor -> N canonical tensors      concat
``concat: {dim, sizes}``   N format tensors -> 1 canonical tensor      split
``constant: [{eye: N},     no format tensor -> fixed canonical          check the tensor IS
  {zeros: [S...]}]``       tensors (a format that has no text head:     that constant, store
                           the canonical form is an identity Linear)    nothing
``absent: {zeros: [S...]}`` no format tensor -> the framework's initial  store nothing, whatever
                           value (timm has no DINOv2 mask token)        it holds (the family
                                                                        says so in a note)
``fold: {dim: D}``         [a', b'] -> [a, b]: a = a', b = [-0.0; b']   a' = a + b[0], b' = b[1:]
                           (timm register models fold the class         (exact in function; see
                           position into the class token)               :class:`Fold`)
``masked_split: {parts: N, [t, mask] -> the kept parts of t; mask must  t with zeros in the
  keep: [i, ...]}``        be 1 on them and 0 elsewhere (DINOv3's qkv   masked parts, and the
                           bias_mask zeroes the k bias)                 mask (:class:`MaskedSplit`)
``rope_periods: {theta:    a format tensor that is a function of the    computed from the
  NAME, head_dim: EXPR}``  config: nothing canonical (DINOv3's RoPE     config (``derived:``
                           periods buffer)                              entries of a table)
``add: C``                 subtract C (the format stores w + C:         add C, in float32
                           llama.cpp's Gemma RMSNorm weights are 1 + w)  (exact in function)
=========================  =========================================  =====================

Shapes and sizes may be expressions over the family's named dimensions (``D``,
``heads * head_dim``), evaluated by :func:`evaluate`.  Several ops in a list compose left to
right on load and right to left on save.
"""
from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .errors import ClawError
from .io.dtypes import cast, copy_into, dtype_of, float32

Shape = tuple[int, ...]

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv, ast.Div: operator.floordiv,
}


def evaluate(expr: Any, dims: dict[str, int]) -> int:
    """Evaluate an integer or an arithmetic expression over named dimensions."""
    if isinstance(expr, bool):
        raise ClawError(f"size expression {expr!r} is not a number")
    if isinstance(expr, int):
        return expr
    text = str(expr)
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ClawError(f"bad size expression {text!r} in mapping table") from e

    def ev(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in dims:
                raise ClawError(f"size expression {text!r} uses unknown dimension '{node.id}'")
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ClawError(f"size expression {text!r}: only + - * // and names are allowed")

    return ev(tree)


def _shape(spec: Sequence[Any], dims: dict[str, int]) -> Shape:
    return tuple(evaluate(s, dims) for s in spec)


class Op:
    """One invertible step.  Subclasses set ``arity_in`` (format side) and ``arity_out``."""

    name = "op"
    arity_in = 1   # tensors on the format side
    arity_out = 1  # tensors on the canonical side
    keeps_bytes = False  # the output's bytes are the input's, in order (reshape, squeeze)

    def load(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    def save(self, ys: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError

    # shapes are computed by running the op on zero-byte stand-ins (stride-0 views of one
    # byte): every op here only views, splits or joins, so the same code checks and plans
    def load_shapes(self, shapes: list[Shape]) -> list[Shape]:
        return [tuple(t.shape) for t in self.load([_Standin(s) for s in shapes])]

    def save_shapes(self, shapes: list[Shape]) -> list[Shape]:
        return [tuple(t.shape) for t in self.save([_Standin(s) for s in shapes])]

    def __repr__(self) -> str:
        return self.name


class _Standin:
    """A shape without data, for planning: supports what the ops call on an array."""

    def __init__(self, shape: Shape):
        self.shape = tuple(int(d) for d in shape)
        self.ndim = len(self.shape)

    def transpose(self, perm):
        return _Standin(tuple(self.shape[p] for p in perm))

    def reshape(self, shape):
        shape = tuple(shape)
        if math.prod(shape) != math.prod(self.shape):
            raise ClawError(f"cannot reshape {self.shape} into {shape}")
        return _Standin(shape)


def _split_along(t, sizes: list[int], dim: int) -> list:
    if isinstance(t, _Standin):
        return [_Standin(t.shape[:dim] + (s,) + t.shape[dim + 1:]) for s in sizes]
    return np.split(t, np.cumsum(sizes)[:-1].tolist(), axis=dim)


def _join_along(ts: list, dim: int):
    first = ts[0].shape
    for t in ts[1:]:
        if len(t.shape) != len(first) or any(a != b for i, (a, b) in enumerate(zip(t.shape, first)) if i != dim):
            raise ClawError(f"concat: shapes {[tuple(x.shape) for x in ts]} differ outside axis {dim}")
    if isinstance(ts[0], _Standin):
        return _Standin(first[:dim] + (sum(t.shape[dim] for t in ts),) + first[dim + 1:])
    if any(t.dtype != ts[0].dtype for t in ts):
        return np.concatenate(ts, axis=dim)
    out = np.empty(first[:dim] + (sum(t.shape[dim] for t in ts),) + first[dim + 1:], dtype=ts[0].dtype)
    at = 0
    for t in ts:   # parts are often transposed views (big_vision q, k, v kernels): tiled copies
        copy_into(out[(slice(None),) * dim + (slice(at, at + t.shape[dim]),)], t)
        at += t.shape[dim]
    return out


class Permute(Op):
    name = "permute"

    def __init__(self, perm: Sequence[int]):
        self.perm = tuple(int(p) for p in perm)
        if sorted(self.perm) != list(range(len(self.perm))):
            raise ClawError(f"permute: {list(perm)} is not a permutation")
        self.inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))

    def _check(self, t) -> None:
        if t.ndim != len(self.perm):
            raise ClawError(f"permute {list(self.perm)} needs a {len(self.perm)}-d tensor, got shape {tuple(t.shape)}")

    def load(self, xs):
        self._check(xs[0])
        return [xs[0].transpose(self.perm)]

    def save(self, ys):
        self._check(ys[0])
        return [ys[0].transpose(self.inverse)]


class Transpose(Permute):
    name = "transpose"

    def __init__(self, _: Any = None):
        super().__init__((1, 0))


class Reshape(Op):
    name = "reshape"
    keeps_bytes = True

    def __init__(self, spec: dict, dims: dict[str, int]):
        if not isinstance(spec, dict) or set(spec) != {"format", "canonical"}:
            raise ClawError("reshape needs {format: [...], canonical: [...]} so that it can be inverted")
        self.format_shape = _shape(spec["format"], dims)
        self.canonical_shape = _shape(spec["canonical"], dims)

    @staticmethod
    def _to(t, shape: Shape, other: Shape):
        if tuple(t.shape) != other:
            raise ClawError(f"reshape: expected shape {other}, got {tuple(t.shape)}")
        return t.reshape(shape)

    def load(self, xs):
        return [self._to(xs[0], self.canonical_shape, self.format_shape)]

    def save(self, ys):
        return [self._to(ys[0], self.format_shape, self.canonical_shape)]


class Squeeze(Op):
    name = "squeeze"
    keeps_bytes = True

    def __init__(self, dim: int):
        self.dim = int(dim)

    def load(self, xs):
        t = xs[0]
        if t.ndim <= self.dim or t.shape[self.dim] != 1:
            raise ClawError(f"squeeze: axis {self.dim} of shape {tuple(t.shape)} is not of size 1")
        return [t.reshape(t.shape[:self.dim] + t.shape[self.dim + 1:])]

    def save(self, ys):
        t = ys[0]
        if not 0 <= self.dim <= t.ndim:
            raise ClawError(f"unsqueeze: axis {self.dim} does not exist for shape {tuple(t.shape)}")
        return [t.reshape(t.shape[:self.dim] + (1,) + t.shape[self.dim:])]


class Unsqueeze(Squeeze):
    name = "unsqueeze"

    def load(self, xs):
        return Squeeze.save(self, xs)

    def save(self, ys):
        return Squeeze.load(self, ys)


class Split(Op):
    """One format tensor holds several canonical ones side by side (``in_proj`` = q, k, v)."""

    name = "split"

    def __init__(self, spec: dict, dims: dict[str, int], parts: int):
        spec = spec if isinstance(spec, dict) else {"dim": 0 if spec is None else spec}
        self.dim = int(spec.get("dim", 0))
        sizes = spec.get("sizes")
        self.sizes = None if sizes is None else [evaluate(s, dims) for s in sizes]
        self.parts = parts
        if self.sizes is not None and len(self.sizes) != parts:
            raise ClawError(f"split: {len(self.sizes)} sizes for {parts} tensors")

    def _split(self, t) -> list:
        total = t.shape[self.dim] if t.ndim > self.dim else None
        sizes = self.sizes
        if sizes is None:
            if total is None or total % self.parts:
                raise ClawError(f"split: axis {self.dim} of shape {tuple(t.shape)} does not split into {self.parts} equal parts")
            sizes = [total // self.parts] * self.parts
        if total != sum(sizes):
            raise ClawError(f"split: axis {self.dim} of shape {tuple(t.shape)} is not {' + '.join(map(str, sizes))}")
        return _split_along(t, sizes, self.dim)

    def _concat(self, ts: list):
        if self.sizes is not None:
            got = [t.shape[self.dim] for t in ts]
            if got != self.sizes:
                raise ClawError(f"concat: parts have sizes {got} along axis {self.dim}, expected {self.sizes}")
        return _join_along(ts, self.dim)

    @property
    def arity_out(self):  # type: ignore[override]
        return self.parts

    def part_span(self, shape: Shape, index: int) -> tuple[int, int] | None:
        """(element offset, element count) of part ``index`` inside the input, when the parts
        are consecutive runs of its bytes (every axis before the split axis has size 1)."""
        if any(d != 1 for d in shape[:self.dim]):
            return None
        parts = self.load_shapes([shape])
        inner = math.prod(shape[self.dim + 1:])
        offset = sum(p[self.dim] for p in parts[:index]) * inner
        return offset, math.prod(parts[index])

    def load(self, xs):
        return self._split(xs[0])

    def save(self, ys):
        return [self._concat(list(ys))]


class Concat(Split):
    """Several format tensors are one canonical tensor (OpenCLIP ``q`` + ``kv`` = HF ``in_proj``)."""

    name = "concat"
    arity_out = 1  # type: ignore[assignment]

    @property
    def arity_in(self):  # type: ignore[override]
        return self.parts

    def load(self, xs):
        return [self._concat(list(xs))]

    def save(self, ys):
        return self._split(ys[0])


class Constant(Op):
    """Canonical tensors a format does not store because they are fixed by construction.

    big_vision's i18n SigLIP has no text head where transformers' ``SiglipModel`` always has
    one: the canonical form of "no head" is an identity ``Linear`` (``eye`` weight, ``zeros``
    bias).  ``load`` makes them from nothing; ``save`` stores nothing and refuses unless the
    canonical tensor is exactly that constant, so no information is ever dropped.
    """

    name = "constant"
    arity_in = 0

    def __init__(self, spec: Any, dims: dict[str, int], parts: int):
        items = spec if isinstance(spec, list) else [spec]
        self.consts: list[tuple[str, Shape]] = []
        for item in items:
            if not isinstance(item, dict) or len(item) != 1 or next(iter(item)) not in ("eye", "zeros"):
                raise ClawError(f"constant: write {{eye: N}} or {{zeros: [shape]}} (got {item!r})")
            (kind, arg), = item.items()
            if kind == "eye":
                n = evaluate(arg, dims)
                self.consts.append(("eye", (n, n)))
            else:
                self.consts.append(("zeros", _shape(arg if isinstance(arg, list) else [arg], dims)))
        if len(self.consts) != parts:
            raise ClawError(f"constant: {len(self.consts)} constants for {parts} tensors")

    @property
    def arity_out(self):  # type: ignore[override]
        return len(self.consts)

    @staticmethod
    def _make(kind: str, shape: Shape) -> np.ndarray:
        return np.eye(shape[0], dtype=np.float32) if kind == "eye" else np.zeros(shape, dtype=np.float32)

    def load(self, xs):
        return [self._make(kind, shape) for kind, shape in self.consts]

    def save(self, ys):
        for y, (kind, shape) in zip(ys, self.consts):
            if tuple(y.shape) != shape or not np.array_equal(np.asarray(y, dtype=np.float32), self._make(kind, shape)):
                what = "an identity matrix" if kind == "eye" else "all zeros"
                raise ClawError(f"constant: a {tuple(y.shape)} tensor that is not {what} "
                                f"has no place in this format")
        return []

    def load_shapes(self, shapes):
        return [shape for _, shape in self.consts]

    def save_shapes(self, shapes):
        for got, (kind, shape) in zip(shapes, self.consts):
            if tuple(got) != shape:
                raise ClawError(f"constant: expected a {kind} tensor of shape {shape}, got {tuple(got)}")
        return []


class Absent(Constant):
    """A canonical tensor the format has no place for and the framework's forward never reads
    (DINOv2's ``mask_token``: only masked-image-modelling training uses it; timm's ViT has none).

    ``load`` gives the framework's own initial value; ``save`` stores nothing, whatever the
    tensor holds.  This is the one op that can drop information, so a family that uses it says
    so in :meth:`~clawconvert.families.Family.target_notes` when the value was not the default.
    """

    name = "absent"

    def __init__(self, spec: Any, dims: dict[str, int], parts: int):
        super().__init__(spec, dims, parts)
        if any(kind != "zeros" for kind, _ in self.consts):
            raise ClawError("absent: write {zeros: [shape]}")

    def save(self, ys):
        for y, (_, shape) in zip(ys, self.consts):
            if tuple(y.shape) != shape:
                raise ClawError(f"absent: expected a tensor of shape {shape}, got {tuple(y.shape)}")
        return []


class Fold(Op):
    """The format adds the first entry of ``b`` (along ``dim``) into ``a`` and stores ``b`` without it.

    timm's DINOv2 register models (``no_embed_class``) store ``cls_token + pos_embed[:, 0]`` as
    their class token and only the patch positions: the class token and its position are always
    added together, so the sum is all a forward pass needs.  ``load`` gives ``a = a'`` and
    ``b = [-0.0; b']``; ``save`` gives ``a' = a + b[0]`` (half types computed in float32 and rounded
    once, as torch's own addition is) and ``b' = b[1:]``.

    * format -> canonical -> format is exact bit for bit: ``x + (-0.0) == x`` for every x, the
      negative zero included (a positive zero would turn ``-0.0`` into ``+0.0``);
    * canonical -> format -> canonical is exact in function only: how the sum was split between
      ``a`` and ``b[0]`` is not stored, so the class position comes back as ``-0.0`` and the class
      token as the rounded sum; every forward pass (which computes that same sum) is unchanged.
    """

    name = "fold"
    arity_in = 2
    arity_out = 2

    def __init__(self, spec: Any):
        spec = spec if isinstance(spec, dict) else {"dim": spec}
        if set(spec) - {"dim"}:
            raise ClawError("fold: write {dim: D}")
        self.dim = int(spec.get("dim", 1))

    def _check(self, a, b, extra: int) -> None:
        d = self.dim
        if a.ndim != b.ndim or a.ndim <= d or a.shape[d] != 1 or a.shape[:d] + a.shape[d + 1:] != b.shape[:d] + b.shape[d + 1:]:
            raise ClawError(f"fold: shapes {tuple(a.shape)} and {tuple(b.shape)} do not fold along axis {d}")
        if b.shape[d] < extra:
            raise ClawError(f"fold: axis {d} of {tuple(b.shape)} is empty")

    def load(self, xs):
        a, b = xs
        self._check(a, b, 0)
        if isinstance(a, _Standin):
            return [a, _Standin(b.shape[:self.dim] + (b.shape[self.dim] + 1,) + b.shape[self.dim + 1:])]
        first = np.full(a.shape, -0.0, dtype=b.dtype)
        return [a, np.concatenate([first, b], axis=self.dim)]

    def save(self, ys):
        a, b = ys
        self._check(a, b, 1)
        d = self.dim
        if isinstance(a, _Standin):
            return [a, _Standin(b.shape[:d] + (b.shape[d] - 1,) + b.shape[d + 1:])]
        head = b[(slice(None),) * d + (slice(0, 1),)]
        rest = b[(slice(None),) * d + (slice(1, None),)]
        wide = a.dtype if a.dtype.itemsize >= 4 else float32.np    # half types add in float32, as torch does
        total = cast(a.astype(wide) + head.astype(wide), dtype_of(a.dtype))
        return [total, rest]


class MaskedSplit(Op):
    """A fused tensor stored beside a 0/1 mask that switches some of its parts off in every forward pass.

    facebookresearch DINOv3's ``LinearKMaskedBias`` stores ``qkv.bias`` (3D) and ``qkv.bias_mask``
    (1 on q and v, 0 on k) and adds ``bias * bias_mask``: the k bias is never used, and transformers'
    ``DINOv3ViTModel`` (``key_bias: false``) and timm (a zero ``k_bias`` buffer) have none.  ``load``
    checks the mask is exactly 1 on the kept parts and 0 on the others (a NaN mask, never
    initialised, is refused) and gives the kept parts; ``save`` writes zeros in the masked parts
    and the mask, in the tensor's dtype.

    * canonical -> format -> canonical is exact bit for bit;
    * format -> canonical -> format is exact when the masked parts held zeros, otherwise in
      function only (every forward pass multiplies them by 0); the family says so in a note.
    """

    name = "masked_split"
    arity_in = 2

    def __init__(self, spec: Any, parts: int):
        if not isinstance(spec, dict) or set(spec) - {"parts", "keep"} or "keep" not in spec:
            raise ClawError("masked_split: write {parts: N, keep: [i, ...]}")
        self.parts = int(spec.get("parts", 3))
        self.keep = [int(i) for i in spec["keep"]]
        if sorted(set(self.keep)) != self.keep or not all(0 <= i < self.parts for i in self.keep):
            raise ClawError(f"masked_split: keep {self.keep} is not an increasing list of parts below {self.parts}")
        if len(self.keep) != parts:
            raise ClawError(f"masked_split: keeps {len(self.keep)} parts for {parts} tensors")

    @property
    def arity_out(self):  # type: ignore[override]
        return len(self.keep)

    def _size(self, shape: Shape) -> int:
        if len(shape) != 1 or shape[0] % self.parts:
            raise ClawError(f"masked_split: shape {tuple(shape)} does not split into {self.parts} equal parts")
        return shape[0] // self.parts

    def _pattern(self, n: int, dtype) -> np.ndarray:
        out = np.zeros(n * self.parts, dtype=dtype)
        for i in self.keep:
            out[i * n:(i + 1) * n] = 1
        return out

    def load(self, xs):
        t, mask = xs
        n = self._size(t.shape)
        if tuple(mask.shape) != tuple(t.shape):
            raise ClawError(f"masked_split: the mask's shape {tuple(mask.shape)} is not the tensor's {tuple(t.shape)}")
        if isinstance(t, _Standin):
            return [_Standin((n,)) for _ in self.keep]
        if not np.array_equal(np.asarray(mask, dtype=np.float32), self._pattern(n, np.float32)):
            raise ClawError(f"masked_split: the mask is not 1 on parts {self.keep} of {self.parts} and 0 elsewhere "
                            f"(a mask that was never initialised holds NaN)")
        return [t[i * n:(i + 1) * n] for i in self.keep]

    def save(self, ys):
        shapes = {tuple(y.shape) for y in ys}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ClawError(f"masked_split: parts of shapes {[tuple(y.shape) for y in ys]} are not equal vectors")
        n = int(ys[0].shape[0])
        if isinstance(ys[0], _Standin):
            return [_Standin((n * self.parts,)), _Standin((n * self.parts,))]
        out = np.zeros(n * self.parts, dtype=ys[0].dtype)
        for i, y in zip(self.keep, ys):
            copy_into(out[i * n:(i + 1) * n], y)
        return [out, self._pattern(n, ys[0].dtype)]


def rope_periods(theta: float, head_dim: int) -> np.ndarray:
    """DINOv3's RoPE periods ``theta ** (2 i / (head_dim / 2))``, ``i < head_dim / 4``, as float32.

    facebookresearch's ``RopePositionEmbedding`` computes them with torch in float32 (the
    exponent rounded to float32, then ``pow``); here the power of that exponent is computed in
    float64 and rounded once.  For theta 100 and head widths 16, 32, 64 and 128 (every published
    DINOv3) the bytes equal torch's; elsewhere they may differ from torch's ``pow`` in the last bit.
    """
    n = head_dim // 4
    exponent = (2 * np.arange(n, dtype=np.float32)) / np.float32(head_dim // 2)
    return np.power(np.float64(np.float32(theta)), exponent.astype(np.float64)).astype(np.float32)


class RopePeriods(Op):
    """A format tensor that is a function of the config alone, with nothing canonical beside it.

    facebookresearch DINOv3 stores its RoPE periods as a persistent buffer (``rope_embed.periods``);
    transformers and timm compute RoPE from ``rope_theta`` and store nothing.  ``load`` checks the
    shape (and, given data, the values) and gives nothing: the family reads ``rope_theta`` from the
    buffer when it reads the config.  ``save`` computes it (:func:`rope_periods`).  Tables list it
    under ``derived:``, not ``tensors:``.
    """

    name = "rope_periods"
    arity_in = 1
    arity_out = 0

    def __init__(self, spec: Any, dims: dict[str, Any]):
        if not isinstance(spec, dict) or set(spec) != {"theta", "head_dim"}:
            raise ClawError("rope_periods: write {theta: PARAM, head_dim: SIZE}")
        theta = dims.get(str(spec["theta"]))
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise ClawError(f"rope_periods: theta names param '{spec['theta']}', which is not a number")
        self.theta = float(theta)
        self.head_dim = evaluate(spec["head_dim"], dims)
        if self.head_dim <= 0 or self.head_dim % 4:
            raise ClawError(f"rope_periods: head width {self.head_dim} is not a positive multiple of 4")

    def load(self, xs):
        (t,) = xs
        if tuple(t.shape) != (self.head_dim // 4,):
            raise ClawError(f"rope_periods: shape {tuple(t.shape)}, expected ({self.head_dim // 4},) for "
                            f"{self.head_dim}-wide heads")
        if not isinstance(t, _Standin):
            got = np.asarray(t, dtype=np.float64)
            want = rope_periods(self.theta, self.head_dim).astype(np.float64)
            rtol = 1e-6 if t.dtype.itemsize >= 4 else 1e-2
            if not np.allclose(got, want, rtol=rtol, atol=0):
                raise ClawError(f"rope_periods: the stored periods are not {self.theta:g} ** (4 i / {self.head_dim})")
        return []

    def save(self, ys):
        if ys:
            raise ClawError("rope_periods: takes no canonical tensor")
        return [rope_periods(self.theta, self.head_dim)]

    def save_shapes(self, shapes):
        if shapes:
            raise ClawError("rope_periods: takes no canonical tensor")
        return [(self.head_dim // 4,)]


class Add(Op):
    """The format stores ``w + C`` where the canonical form stores ``w``.

    Gemma's RMSNorm multiplies by ``1 + w`` and keeps ``w``; llama.cpp's norm multiplies by its
    weight, so its converter stores ``w + 1``.  Computed in float32 (the export's working type):
    exact in function, and bit for bit wherever ``(w + C) - C == w`` in float32 (not always,
    which is why this op is not on the bit-exact list of the tests).
    """

    name = "add"

    def __init__(self, spec: Any):
        if isinstance(spec, bool) or not isinstance(spec, (int, float)):
            raise ClawError(f"add: write a number (got {spec!r})")
        self.value = float(spec)

    def load(self, xs):
        if isinstance(xs[0], _Standin):
            return [xs[0]]
        return [np.asarray(xs[0], dtype=np.float32) - np.float32(self.value)]

    def save(self, ys):
        if isinstance(ys[0], _Standin):
            return [ys[0]]
        return [np.asarray(ys[0], dtype=np.float32) + np.float32(self.value)]


@dataclass
class Chain:
    """Ops applied in order on load, in reverse order (each inverted) on save."""

    ops: list[Op]

    def load(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        for op in self.ops:
            xs = op.load(xs)
        return xs

    def save(self, ys: list[np.ndarray]) -> list[np.ndarray]:
        for op in reversed(self.ops):
            ys = op.save(ys)
        return ys

    def load_shapes(self, shapes: list[Shape]) -> list[Shape]:
        for op in self.ops:
            shapes = op.load_shapes(shapes)
        return shapes

    def load_span(self, shape: Shape, index: int) -> tuple[int, int] | None:
        """Where canonical tensor ``index`` lies in the one format tensor of this shape, as
        (element offset, element count), when loading only reshapes it or cuts it into
        consecutive runs (``in_proj`` -> q, k, v); None when an op moves elements."""
        span = (0, math.prod(shape))
        shapes = [tuple(shape)]
        for op in self.ops:
            if op.keeps_bytes and len(shapes) == 1:
                shapes = op.load_shapes(shapes)
            elif isinstance(op, Split) and not isinstance(op, Concat) and len(shapes) == 1:
                part = op.part_span(shapes[0], index)
                if part is None:
                    return None
                span = (span[0] + part[0], part[1])
                shapes = [op.load_shapes(shapes)[index]]
                index = 0
            else:
                return None
        return span if index == 0 and len(shapes) == 1 else None

    @property
    def keeps_bytes(self) -> bool:
        """True when saving only reshapes (the format tensor's bytes are the canonical one's)."""
        return all(op.keeps_bytes for op in self.ops)

    def save_shapes(self, shapes: list[Shape]) -> list[Shape]:
        for op in reversed(self.ops):
            shapes = op.save_shapes(shapes)
        return shapes

    def __repr__(self) -> str:
        return " -> ".join(map(repr, self.ops)) or "rename"


# table spelling -> constructor(argument, dims, n_format, n_canonical)
OPS: dict[str, Callable[[Any, dict[str, int], int, int], Op]] = {
    "transpose": lambda a, d, nf, nc: Transpose(a),
    "permute": lambda a, d, nf, nc: Permute(a),
    "reshape": lambda a, d, nf, nc: Reshape(a, d),
    "squeeze": lambda a, d, nf, nc: Squeeze(a),
    "unsqueeze": lambda a, d, nf, nc: Unsqueeze(a),
    "split": lambda a, d, nf, nc: Split(a, d, nc),
    "concat": lambda a, d, nf, nc: Concat(a, d, nf),
    "constant": lambda a, d, nf, nc: Constant(a, d, nc),
    "absent": lambda a, d, nf, nc: Absent(a, d, nc),
    "fold": lambda a, d, nf, nc: Fold(a),
    "masked_split": lambda a, d, nf, nc: MaskedSplit(a, nc),
    "rope_periods": lambda a, d, nf, nc: RopePeriods(a, d),
    "add": lambda a, d, nf, nc: Add(a),
}


def build_chain(spec: Any, dims: dict[str, int], n_format: int, n_canonical: int) -> Chain:
    """Parse a table's ``op:`` value: a name, ``{name: arg}``, or a list of those."""
    if spec is None:
        items: list[Any] = []
    elif isinstance(spec, list):
        items = spec
    else:
        items = [spec]
    ops: list[Op] = []
    for item in items:
        if isinstance(item, str):
            name, arg = item, None
        elif isinstance(item, dict) and len(item) == 1:
            (name, arg), = item.items()
        else:
            raise ClawError(f"cannot read op {item!r}: write a name or {{name: argument}}")
        if name not in OPS:
            raise ClawError(f"unknown op '{name}' (known: {', '.join(OPS)})")
        ops.append(OPS[name](arg, dims, n_format, n_canonical))
    arity = n_format
    for op in ops:
        if op.arity_in != arity:
            raise ClawError(f"op {op.name} takes {op.arity_in} tensors but gets {arity}")
        arity = op.arity_out
    if arity != n_canonical:
        raise ClawError(f"ops {[o.name for o in ops]} turn {n_format} tensors into {arity}, table names {n_canonical}")
    return Chain(ops)
