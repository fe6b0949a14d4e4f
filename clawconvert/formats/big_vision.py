"""big_vision layout: one ``.npz`` of flat ``/``-joined keys, as Google releases SigLIP / SigLIP 2.

Reading accepts every released spelling and presents ONE layout to the tables:

* with or without the ``params/`` prefix (stripped);
* per-layer (``.../encoderblock_{i}/<leaf>``) or stacked ("scan": ``.../encoderblock/<leaf>``
  with a leading depth axis, SigLIP 2 text towers): stacked leaves are unstacked lazily, a
  layer's slice is read straight from its offset in the archive, never the whole stack;
* bfloat16 stored as 2-byte numpy void.

Writing produces one ``.npz`` in the released layout (``params/`` prefix, per-layer; stacked
with ``--stacked``, or only one tower stacked with ``--stacked txt`` as SigLIP 2 releases are).  bfloat16 is written as 2-byte void, the way JAX checkpoints carry it.
There is no config file: the family reads the architecture from the tensor shapes.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClawError
from ..families import Extras, Family, all_families
from ..io import dtypes
from ..io.dtypes import DType, as_numpy, cast, contiguous, dtype_of
from ..io.readers import NpzStore, TensorInfo, TensorStore
from . import Checkpoint, Format, SourceOptions

PREFIX = "params/"
# ".../encoderblock/<leaf>" (stacked) and ".../encoderblock_{i}/<leaf>" (per layer)
STACKED = re.compile(r"^(.*/)?encoderblock/(.+)$")
PER_LAYER = re.compile(r"^(.*/)?encoderblock_(\d+)/(.+)$")
SENTINELS = ("img/", "txt/", "params/img/", "params/txt/")   # one tower is enough to say "big_vision"


def _member_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


class BigVisionStore(TensorStore):
    """A big_vision ``.npz`` seen without ``params/`` and one tensor per layer."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.npz = NpzStore(path)
        names = self.npz.keys()
        prefixed = [n.startswith(PREFIX) for n in names]
        if any(prefixed) and not all(prefixed):
            odd = next(n for n, p in zip(names, prefixed) if not p)
            raise ClawError(f"{path}: some keys have the '{PREFIX}' prefix and some not (e.g. '{odd}')")
        self.prefix = PREFIX if names and all(prefixed) else ""
        self.stacked: dict[str, int] = {}            # stacked encoder ("img/Transformer/") -> depth
        self._where: dict[str, tuple[str, int | None]] = {}   # our key -> (npz member, layer)
        self._file = open(path, "rb")
        self._row_offsets: dict[str, tuple[int, int]] = {}    # npz member -> (data offset, bytes per layer)
        self._cache: tuple[str, np.ndarray] | None = None
        for name, info in self.npz.infos().items():
            key = name[len(self.prefix):]
            m = STACKED.match(key)
            if m is None:
                self._add(key, info.shape, info.dtype, name, None)
                continue
            encoder, leaf = m.group(1) or "", m.group(2)
            if not info.shape:
                raise ClawError(f"{path}: stacked tensor '{name}' has no layer axis")
            depth = info.shape[0]
            if self.stacked.setdefault(encoder, depth) != depth:
                raise ClawError(f"{path}: shapes contradict each other: the stacked layers under '{encoder}encoderblock/' "
                                f"disagree on depth ({self.stacked[encoder]} and {depth} in '{leaf}')")
            for i in range(depth):
                self._add(f"{encoder}encoderblock_{i}/{leaf}", info.shape[1:], info.dtype, name, i)

    def _add(self, key: str, shape, dtype, member: str, layer: int | None) -> None:
        if key in self._infos:
            raise ClawError(f"{self.path}: '{key}' is stored twice (per layer and stacked)")
        self._infos[key] = TensorInfo(key, tuple(shape), dtype, self.path)
        self._where[key] = (member, layer)

    @property
    def layout(self) -> str:
        return "stacked" if self.stacked else "per-layer"

    def _read(self, name: str, info: TensorInfo) -> np.ndarray:
        member, layer = self._where[name]
        if layer is None:
            return self.npz.read(member)
        arr = contiguous(self._read_layer(member, layer, info))
        if arr.dtype != info.dtype.np:  # 2-byte void (JAX bfloat16) or big-endian
            arr = arr.view(info.dtype.np) if arr.dtype.kind == "V" else arr.astype(info.dtype.np)
        return arr

    def _read_layer(self, member: str, layer: int, info: TensorInfo) -> np.ndarray:
        """One layer of a stacked member: a direct read at its offset when the member is stored
        uncompressed in C order (np.savez), otherwise the whole member once, kept for the next layer."""
        zinfo, shape, dtype, fortran = self.npz._members[member]
        if zinfo.compress_type == zipfile.ZIP_STORED and not fortran:
            if member not in self._row_offsets:
                self._row_offsets[member] = (self.npz.data_offset(zinfo), math.prod(shape[1:]) * dtype.itemsize)
            start, size = self._row_offsets[member]
            buf = np.empty(size, dtype=np.uint8)
            if os.preadv(self._file.fileno(), [memoryview(buf)], start + layer * size) != size:
                raise ClawError(f"{self.path}: member '{member}' is truncated")
            return np.frombuffer(buf, dtype=dtype).reshape(shape[1:])
        if self._cache is None or self._cache[0] != member:
            self._cache = (member, self.npz.read_numpy(member))
        return self._cache[1][layer]

    def checks_deferred(self):
        return self.npz.checks_deferred()

    def close(self) -> None:
        self._file.close()
        self.npz.close()


def _to_numpy(t: Any) -> np.ndarray:
    a = contiguous(as_numpy(t))
    if a.dtype.name == dtypes.bfloat16.name:  # JAX's way: 2-byte void (by name: a float32 array imports no ml_dtypes)
        return a.view(np.dtype("V2"))
    return a


def _numpy_dtype(dtype: DType) -> np.dtype:
    return np.dtype("V2") if dtype == dtypes.bfloat16 else dtype.np


TOWERS = ("img", "txt")


def stacked_towers(stacked: Any) -> set[str]:
    """``--stacked`` (both towers), ``--stacked txt`` (SigLIP 2 releases: text only) or ``img``."""
    if stacked in (False, None, ""):
        return set()
    if stacked is True:
        return set(TOWERS)
    towers = {t.strip() for t in str(stacked).split(",") if t.strip()}
    if not towers or towers - set(TOWERS):
        raise ClawError(f"--stacked takes img, txt or img,txt (got {stacked!r})")
    return towers


class BigVisionWriter:
    """Stream tensors into one released-layout ``.npz`` (zip64, uncompressed).

    Per-layer keys are written as they come.  With ``stacked``, every ``encoderblock_{i}/<leaf>``
    goes into its layer's place in a spill ``.npy`` beside the output, written at its offset;
    when the last layer of a leaf arrives the spill file is copied into the archive as
    ``encoderblock/<leaf>`` and removed.  Memory stays at one tensor either way.
    """

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], Any]], stacked: Any = False):
        self.path = Path(path)
        towers = stacked_towers(stacked)
        self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._planned = {name: (tuple(shape), dtype_of(dtype)) for name, shape, dtype in plan}
        self._groups: dict[str, dict[str, Any]] = {}   # stacked member -> spill state
        self._slot: dict[str, tuple[str, int]] = {}    # per-layer key -> (stacked member, layer)
        if towers:
            layers: dict[str, dict[int, str]] = {}
            for name in self._planned:
                m = PER_LAYER.match(name)
                if m and name.split("/", 1)[0] in towers:
                    member = f"{m.group(1) or ''}encoderblock/{m.group(3)}"
                    layers.setdefault(member, {})[int(m.group(2))] = name
            for member, by_layer in layers.items():
                if sorted(by_layer) != list(range(len(by_layer))):
                    raise ClawError(f"cannot stack '{member}': layers {sorted(by_layer)} are not 0..{len(by_layer) - 1}")
                shapes = {self._planned[n] for n in by_layer.values()}
                if len(shapes) != 1:
                    raise ClawError(f"cannot stack '{member}': its layers differ in shape or dtype")
                (shape, dtype), = shapes
                self._groups[member] = {"depth": len(by_layer), "shape": shape, "dtype": dtype, "left": len(by_layer),
                                        "spill": None, "offset": 0, "index": len(self._groups)}
                for i, n in by_layer.items():
                    self._slot[n] = (member, i)
        self._pending = set(self._planned)

    def write(self, name: str, tensor: Any) -> None:
        if name not in self._planned:
            raise ClawError(f"internal: tensor '{name}' was not planned for writing")
        shape, dtype = self._planned[name]
        if tuple(tensor.shape) != shape:
            raise ClawError(f"tensor '{name}' came out with shape {tuple(tensor.shape)}, planned {shape}")
        arr = _to_numpy(cast(as_numpy(tensor), dtype))
        self._pending.discard(name)
        if name not in self._slot:
            with self._zip.open(PREFIX + name + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, arr, allow_pickle=False)
            return
        member, layer = self._slot[name]
        g = self._groups[member]
        if g["spill"] is None:
            g["spill"] = self.path.parent / f".{self.path.name}.spill-{g['index']}.npy"
            with open(g["spill"], "wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(_numpy_dtype(dtype)), "fortran_order": False,
                          "shape": (g["depth"], *shape)}
                np.lib.format.write_array_header_2_0(f, header)
                g["offset"] = f.tell()  # layers arrive in order: no truncate (sparse files fill slowly)
        with open(g["spill"], "r+b") as f:
            f.seek(g["offset"] + layer * arr.nbytes)
            f.write(arr.tobytes())
        g["left"] -= 1
        if g["left"] == 0:
            with open(g["spill"], "rb") as src, self._zip.open(PREFIX + member + ".npy", "w", force_zip64=True) as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
            os.unlink(g["spill"])
            g["spill"] = None

    def close(self) -> list[Path]:
        self._zip.close()
        if self._pending:
            missing = sorted(self._pending)
            raise ClawError(f"{len(missing)} planned tensors were never written: {', '.join(missing[:5])}")
        return [self.path]

    def abort(self) -> None:
        self._zip.close()
        for g in self._groups.values():
            if g["spill"] is not None:
                Path(g["spill"]).unlink(missing_ok=True)


class BigVisionFormat(Format):
    name = "big_vision"
    description = "big_vision .npz (SigLIP / SigLIP 2 as Google releases them)"
    weights_name = "model"
    writes_file = True
    write_options = ("stacked",)

    def detect(self, path: Path) -> bool:
        if not path.is_file() or path.suffix.lower() != ".npz":
            return False
        names = _member_names(path)
        return bool(names) and any(n.startswith(SENTINELS) for n in names)

    def open(self, path: Path, options: SourceOptions) -> Checkpoint:
        if not path.is_file():
            raise ClawError(f"{path}: a big_vision checkpoint is one .npz file")
        store = BigVisionStore(path)
        family = next((f for f in all_families().values()
                       if "big_vision" in f.codecs and f.codecs["big_vision"].claims(store)), None)
        if family is None:
            raise ClawError(f"{path}: no model family reads this big_vision checkpoint")
        config = family.codec(self.name).read(store)
        vocab = config.text_config.vocab_size
        from ..families.siglip import tokenizer_note
        extras = Extras(tokenizer_note=tokenizer_note(vocab), source={"layout": store.layout})
        return Checkpoint(path, self.name, family, config, store, extras)

    def write_side_files(self, out: Path, family: Family, config: Any, extras: Extras) -> list[str]:
        return []  # the .npz is the whole checkpoint: no config, tokenizer or preprocessing files

    def writer(self, out: Path, plan: list, max_shard_size: int, metadata: dict | None = None, stacked: Any = False):
        if Path(out).suffix.lower() != ".npz":
            raise ClawError(f"{out.name}: a big_vision checkpoint is one .npz file: give DST a .npz name")
        return BigVisionWriter(out, plan, stacked=stacked)


FORMAT = BigVisionFormat()
