"""Fuzz every reader with random corruption of valid fixtures.

    .venv/bin/python tools/fuzz.py                     # 1000 cases per format, 2 workers
    .venv/bin/python tools/fuzz.py --cases 200 --formats safetensors npz --json out.json

Formats: ``safetensors`` (an OpenCLIP directory's weights), ``index`` (a sharded HF
directory: its ``model.safetensors.index.json`` or a shard), ``pt`` (a training checkpoint,
torch zip format), ``npz`` (a big_vision SigLIP archive), ``json`` (``open_clip_config.json``
or ``config.json``).  Each case copies a valid fixture, corrupts one file (bit flips, byte
overwrites, truncation, insertion, deletion, structure-aware edits of JSON headers, zip
members and pickles, another format's bytes under the right name, an empty file, a
directory in its place) and then runs:

* the reader (``open_tensors`` and every tensor read),
* ``clawconvert inspect`` and ``clawconvert convert`` in-process.

A case passes when every step either succeeds or stops with exit code 2 and one line that
starts ``clawconvert: error:`` and names a file of the case; with no traceback and no exit 3;
with the source's bytes unchanged; with no output left under the destination name on a
refusal (and an intact manifest on success); within the time bound; and with no write
outside the case's temporary directory (an audit hook watches every open-for-writing,
rename, removal and directory creation).

Cases run in worker processes; a case over its time bound is a hang: the worker is killed
and replaced.  Figures are printed per format: cases, accepted (the corruption left a valid
model, e.g. a flipped bit in weight data), refused cleanly, unclear refusals (not naming
the file), tracebacks, hangs, writes outside.  ``tests/test_fuzz.py`` runs a short version
in-process.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
FORMATS = ("safetensors", "index", "pt", "npz", "json")
OUTCOMES = ("accepted", "refused", "unclear", "traceback", "hang", "outside_write", "source_changed", "partial_output")
BAD = ("traceback", "hang", "outside_write", "source_changed", "partial_output")


# ------------------------------------------------------------------------------------
# base fixtures (valid models every case starts from)
# ------------------------------------------------------------------------------------
def build_bases(base: Path) -> dict[str, dict[str, Any]]:
    """Valid inputs per format: {fmt: {"dir": Path, "targets": [relative files to corrupt], ...}}."""
    import torch
    from safetensors.torch import load_file

    sys.path.insert(0, str(FIXTURES))
    from make_fixtures import TINY_CLIP  # noqa: E402

    base.mkdir(parents=True, exist_ok=True)
    bases: dict[str, dict[str, Any]] = {}
    quiet = contextlib.redirect_stdout(io.StringIO())

    # OpenCLIP directory (safetensors + open_clip_config.json)
    oc = base / "openclip"
    if not oc.exists():
        shutil.copytree(FIXTURES / "openclip_tiny", oc)
    bases["safetensors"] = {"dir": oc, "targets": ["open_clip_model.safetensors"], "to": "openclip"}

    # sharded HF directory
    hf = base / "hf_sharded"
    if not hf.exists():
        from clawconvert.cli import main
        with quiet:
            assert main(["convert", str(oc), str(hf), "--to", "hf", "--max-shard-size", "1MB", "--quiet"]) == 0
        (hf / "clawconvert_manifest.json").unlink()
    shards = sorted(p.name for p in hf.glob("model-*.safetensors"))
    assert len(shards) > 1, shards
    bases["index"] = {"dir": hf, "targets": ["model.safetensors.index.json"] * 4 + shards, "to": "openclip"}

    # training checkpoint (torch zip) + model config file
    pt = base / "pt"
    if not pt.exists():
        pt.mkdir()
        sd = load_file(str(oc / "open_clip_model.safetensors"))
        torch.save({"epoch": 1, "name": "fuzz", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
                   pt / "epoch_1.pt")
        (pt / "model.json").write_text(json.dumps(TINY_CLIP))
    bases["pt"] = {"dir": pt, "targets": ["epoch_1.pt"], "to": "openclip", "file": "epoch_1.pt",
                   "extra": ["--model-config", "model.json"]}

    # big_vision .npz
    bv = base / "npz"
    if not bv.exists():
        bv.mkdir()
        shutil.copy(FIXTURES / "big_vision" / "siglip_tiny.npz", bv / "siglip_tiny.npz")
    bases["npz"] = {"dir": bv, "targets": ["siglip_tiny.npz"], "to": "hf", "file": "siglip_tiny.npz"}

    # JSON configs: an OpenCLIP directory and an HF directory (unsharded)
    js = base / "json"
    if not js.exists():
        js.mkdir()
        shutil.copytree(oc, js / "oc")
        from clawconvert.cli import main
        with quiet:
            assert main(["convert", str(oc), str(js / "hf"), "--to", "hf", "--quiet"]) == 0
        (js / "hf" / "clawconvert_manifest.json").unlink()
        for f in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
            (js / "hf" / f).unlink(missing_ok=True)  # keeps every case small; configs are what is fuzzed
    bases["json"] = {"dir": js, "targets": ["oc/open_clip_config.json", "oc/open_clip_config.json", "hf/config.json",
                                            "hf/config.json", "hf/preprocessor_config.json"], "to": "openclip"}
    return bases


# ------------------------------------------------------------------------------------
# mutations
# ------------------------------------------------------------------------------------
JSON_VALUES: list[Any] = [0, -1, 1, 2, 3, 7, 2**31, 2**63, 10**12, -10**9, 0.5, 1e308, -1e-9, float("nan"),
                          "", "x", "gelu", "../../etc/passwd", None, True, False, [], {}, [1, 2], {"a": 1},
                          [[[[]]]], "model.safetensors", "/etc/passwd"]


def _json_dumps(obj: Any) -> str:
    return json.dumps(obj, allow_nan=True)


def _walk(obj: Any, path=()) -> list[tuple]:
    out = [path]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _walk(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _walk(v, path + (i,))
    return out


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


def mutate_json_obj(obj: Any, rng: random.Random, extra_values: list[Any] = ()) -> tuple[Any, str]:
    """One structural edit of a parsed JSON value."""
    obj = json.loads(_json_dumps(obj))
    paths = _walk(obj)
    path = rng.choice(paths)
    values = JSON_VALUES + list(extra_values)
    op = rng.choice(["set", "set", "set", "delete", "add", "swap_type", "renamekey", "nudge"])
    if not path:
        return rng.choice(values + [[obj], "text"]), "root"
    parent, key = _get(obj, path[:-1]), path[-1]
    cur = parent[key]
    if op == "delete":
        del parent[key]
        return obj, f"delete {'/'.join(map(str, path))}"
    if op == "add" and isinstance(cur, dict):
        cur[rng.choice(["x", "__metadata__", "shape", "dtype", "model_type", "weight_map"])] = rng.choice(values)
        return obj, f"add under {'/'.join(map(str, path))}"
    if op == "renamekey" and isinstance(parent, dict):
        other = rng.choice(list(parent))
        val = parent.pop(key)
        parent[other if other != key else f"{key}_"] = val
        return obj, f"rename {'/'.join(map(str, path))}"
    if op == "nudge" and isinstance(cur, (int, float)) and not isinstance(cur, bool):
        parent[key] = cur + rng.choice([-1, 1, -8, 8, cur, -cur]) if isinstance(cur, int) else cur * rng.choice([0, -1, 2, 1e6])
        return obj, f"nudge {'/'.join(map(str, path))}"
    if op == "swap_type":
        parent[key] = str(cur) if not isinstance(cur, str) else [cur]
        return obj, f"retype {'/'.join(map(str, path))}"
    parent[key] = rng.choice(values)
    return obj, f"set {'/'.join(map(str, path))}"


def mutate_bytes(data: bytes, rng: random.Random, hot: tuple[int, int] | None = None) -> tuple[bytes, str]:
    """One generic corruption; ``hot`` is a byte range (e.g. a header) hit more often."""
    b = bytearray(data)
    n = len(b)

    def pos() -> int:
        if hot and rng.random() < 0.6 and hot[1] > hot[0]:
            return rng.randrange(hot[0], min(hot[1], n)) if min(hot[1], n) > hot[0] else rng.randrange(max(n, 1))
        if rng.random() < 0.2:  # zip directories and trailers live at the end
            return max(0, n - 1 - rng.randrange(min(n, 2048) or 1))
        return rng.randrange(max(n, 1))

    op = rng.choice(["flip", "flip", "overwrite", "truncate", "extend", "delete", "insert", "duplicate", "zero"])
    if n == 0:
        return bytes(rng.randrange(256) for _ in range(16)), "fill-empty"
    if op == "flip":
        k = rng.choice([1, 1, 2, 4, 8])
        for _ in range(k):
            i = pos()
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"flip {k} bit(s)"
    if op == "overwrite":
        i = pos()
        k = rng.choice([1, 2, 4, 8, 16])
        val = rng.choice([b"\x00", b"\xff", bytes([rng.randrange(256)])])
        b[i:i + k] = (val * k)[:k] if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(k))
        return bytes(b[:n]), f"overwrite {k} at {i}"
    if op == "truncate":
        cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(n), n - 1, n // 2, pos()])
        return bytes(b[:cut]), f"truncate to {cut}"
    if op == "extend":
        k = rng.choice([1, 8, 100, 4096])
        return bytes(b) + bytes(rng.randrange(256) for _ in range(k)), f"extend by {k}"
    if op == "delete":
        i = pos()
        k = rng.choice([1, 4, 64, 1024])
        del b[i:i + k]
        return bytes(b), f"delete {k} at {i}"
    if op == "insert":
        i = pos()
        k = rng.choice([1, 4, 64])
        b[i:i] = bytes(rng.randrange(256) for _ in range(k))
        return bytes(b), f"insert {k} at {i}"
    if op == "duplicate":
        i = pos()
        k = rng.choice([8, 64, 512])
        b[i:i] = b[i:i + k]
        return bytes(b), f"duplicate {k} at {i}"
    i = pos()
    k = rng.choice([8, 256, 4096])
    b[i:i + k] = bytes(min(k, n - i))
    return bytes(b), f"zero {k} at {i}"


def mutate_json_text(text: bytes, rng: random.Random, extra_values: list[Any] = ()) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.6:
        try:
            obj = json.loads(text)
        except ValueError:
            return mutate_bytes(text, rng)
        new, what = mutate_json_obj(obj, rng, extra_values)
        return _json_dumps(new).encode(), what
    if r < 0.7:
        depth = rng.choice([100, 2000, 100000])
        return b"[" * depth + b"]" * depth, f"nesting {depth}"
    if r < 0.8:  # a duplicate key, textually
        s = text.decode("utf-8", "replace")
        i = s.find('"', 1)
        j = s.find('"', i + 1)
        if i > 0 and j > i:
            key = s[i:j + 1]
            s = s[:1] + f"{key}: {rng.choice(['1', 'null', '[]', '{}'])}, " + s[1:]
            return s.encode(), "duplicate key"
    if r < 0.85:
        return rng.choice([b"\xef\xbb\xbf" + text, b"\xff\xfe" + text, text.replace(b'"', b"'", 3),
                           b"null", b"[]", b'"text"', b"1e999999"]), "text-level"
    return mutate_bytes(text, rng)


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if len(data) < 8:
        return mutate_bytes(data, rng)
    n = int.from_bytes(data[:8], "little")
    if rng.random() < 0.5 and 8 + n <= len(data):
        try:
            header = json.loads(data[8:8 + n])
        except ValueError:
            return mutate_bytes(data, rng, hot=(0, 8 + n))
        names = [k for k in header if k != "__metadata__"]
        extra = [rng.choice(names)] if names else []
        if names and rng.random() < 0.6:  # aim at one entry's fields
            name = rng.choice(names)
            e = header[name]
            field_ = rng.choice(["dtype", "shape", "data_offsets"])
            choices = {"dtype": ["F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "C64", "U16", "f32", 3, None],
                       "shape": [[], [0], [1], [2**40, 2**40], [-1], [True], [1.5], e["shape"][::-1],
                                 e["shape"] + [1], e["shape"][:-1], [x * 2 for x in e["shape"]], [2**63]],
                       "data_offsets": [[0, 0], [0, 4], e["data_offsets"][::-1], [e["data_offsets"][0], e["data_offsets"][1] + 4],
                                        [e["data_offsets"][0] + 4, e["data_offsets"][1] + 4], [0], [-4, 0], [0.0, 4.0]]}[field_]
            e[field_] = rng.choice(choices)
            what = f"header {field_} of {name}"
            if rng.random() < 0.2:  # a second name for the same entry
                header[rng.choice(names)] = e
                what += " + alias"
        else:
            header, what = mutate_json_obj(header, rng, extra)
            what = "header " + what
        raw = _json_dumps(header).encode()
        if rng.random() < 0.2:  # and keep the old length prefix
            return data[:8] + raw + data[8 + n:], what + " (stale length)"
        raw += b" " * (-len(raw) % 8)
        return len(raw).to_bytes(8, "little") + raw + data[8 + n:], what
    return mutate_bytes(data, rng, hot=(0, 8 + n))


def _rezip(data: bytes, rng: random.Random, mutate_member: Callable[[str, bytes], tuple[bytes | None, str]]) -> tuple[bytes, str]:
    """Rewrite a zip with one member changed (CRCs recomputed, so the payload itself is what is tested)."""
    try:
        zin = zipfile.ZipFile(io.BytesIO(data))
        infos = zin.infolist()
    except Exception:
        return mutate_bytes(data, rng)
    target = rng.choice(infos)
    out = io.BytesIO()
    what = ""
    import warnings
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name": on purpose
        for info in infos:
            payload = zin.read(info)
            if info is target:
                payload, what = mutate_member(info.filename, payload)
                if payload is None:
                    continue
                if rng.random() < 0.1:  # and stored twice
                    zout.writestr(info.filename + "", payload)
            zinfo = zipfile.ZipInfo(info.filename, date_time=info.date_time)
            zout.writestr(zinfo, payload)
    return out.getvalue(), what


def mutate_pt(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        return mutate_bytes(data, rng)

    def member(name: str, payload: bytes) -> tuple[bytes | None, str]:
        if rng.random() < 0.1:
            return None, f"drop member {name}"
        if name.endswith("data.pkl"):
            return mutate_pickle(payload, rng)
        new, what = mutate_bytes(payload, rng)
        return new, f"member {name}: {what}"
    return _rezip(data, rng, member)


def mutate_pickle(payload: bytes, rng: random.Random) -> tuple[bytes, str]:
    r = rng.random()
    if r < 0.3:  # swap a safe global for a dangerous one, the way an attack would
        for old in (b"collections\nOrderedDict", b"torch._utils\n_rebuild_tensor_v2"):
            if old in payload:
                new = rng.choice([b"posix\nsystem", b"builtins\neval", b"builtins\nexec", b"os\nremove",
                                  b"shutil\nrmtree", b"subprocess\nPopen", b"builtins\ngetattr"])
                shown = old.decode().replace("\n", ".") + " -> " + new.decode().replace("\n", ".")
                return payload.replace(old, new, 1), f"pickle global {shown}"
    new, what = mutate_bytes(payload, rng)
    return new, f"data.pkl: {what}"


def mutate_npz(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    if rng.random() < 0.5:
        return mutate_bytes(data, rng)

    def member(name: str, payload: bytes) -> tuple[bytes | None, str]:
        r = rng.random()
        if r < 0.1:
            return None, f"drop member {name}"
        if r < 0.6 and payload[:6] == b"\x93NUMPY":  # edit the .npy header dict
            hl = int.from_bytes(payload[8:10], "little") if payload[6] == 1 else int.from_bytes(payload[8:12], "little")
            start = 10 if payload[6] == 1 else 12
            head = payload[start:start + hl].decode("latin1")
            edits = [("'<f4'", rng.choice(["'<f2'", "'<f8'", "'|O'", "'<c8'", "'<U4'", "'|V2'", "'<i8'", "'>f4'", "'xyz'"])),
                     ("'fortran_order': False", rng.choice(["'fortran_order': True", "'fortran_order': 1"])),
                     ("(", rng.choice(["(2**40, ", "(-1, ", "(0, ", "(1, ", "((), ", "(1e3, "]))]
            a, b = rng.choice(edits)
            new = head.replace(a, b, 1)
            raw = new.encode("latin1")
            raw += b" " * max(0, hl - len(raw))
            return payload[:start] + raw[:max(hl, len(raw))] + payload[start + hl:], f"member {name} header: {a} -> {b}"
        new, what = mutate_bytes(payload, rng)
        return new, f"member {name}: {what}"
    return _rezip(data, rng, member)


MUTATORS: dict[str, Callable[[bytes, random.Random, str], tuple[bytes, str]]] = {
    "safetensors": lambda d, r, f: mutate_safetensors(d, r),
    "index": lambda d, r, f: (mutate_json_text(d, r, ["../model-00001-of-00002.safetensors", "/etc/passwd",
                                                      "nonexistent.safetensors", "model-00002-of-00003.safetensors",
                                                      "sub/../model-00001-of-00003.safetensors"])
                              if f.endswith(".json") else mutate_safetensors(d, r)),
    "pt": lambda d, r, f: mutate_pt(d, r),
    "npz": lambda d, r, f: mutate_npz(d, r),
    "json": lambda d, r, f: mutate_json_text(d, r),
}


# ------------------------------------------------------------------------------------
# write audit
# ------------------------------------------------------------------------------------
class WriteAudit:
    """An audit hook recording file-system writes outside the allowed directory while armed."""

    _installed: "WriteAudit | None" = None

    def __init__(self) -> None:
        self.allowed: str | None = None
        self.hits: list[str] = []

    @classmethod
    def get(cls) -> "WriteAudit":
        if cls._installed is None:
            cls._installed = WriteAudit()
            sys.addaudithook(cls._installed._hook)
        return cls._installed

    @contextlib.contextmanager
    def armed(self, allowed: Path):
        self.allowed, self.hits = os.path.realpath(allowed), []
        try:
            yield self.hits
        finally:
            self.allowed = None

    # event -> positions of (path, dir_fd) pairs in its arguments
    DIR_FD = {"os.remove": [(0, 1)], "os.rmdir": [(0, 1)], "os.mkdir": [(0, 2)], "os.rename": [(0, 2), (1, 3)],
              "os.symlink": [(1, 2)], "os.link": [(0, 2), (1, 3)], "os.chmod": [(0, 2)], "os.chown": [(0, 3)],
              "os.utime": [(0, 3)], "os.truncate": [(0, None)], "shutil.rmtree": [(0, None)],
              "shutil.copyfile": [(1, None)], "shutil.move": [(0, None), (1, None)], "shutil.copytree": [(1, None)]}

    def _check(self, event: str, p: Any, dir_fd: Any = None) -> None:
        if isinstance(p, int) or p is None:
            return
        try:
            s = os.fsdecode(p)
            if not os.path.isabs(s) and isinstance(dir_fd, int) and dir_fd >= 0:
                s = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), s)
            s = os.path.realpath(os.path.abspath(s))
        except Exception:
            return
        if s.startswith(("/dev/", "/proc/")):
            return
        if s != self.allowed and not s.startswith(self.allowed + os.sep):
            self.hits.append(f"{event} {s}")

    def _hook(self, event: str, args: tuple) -> None:
        if self.allowed is None:
            return
        if event == "open":
            path, mode, flags = (list(args) + [None, None, None])[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
            if writing:
                self._check(event, path)
        elif event in self.DIR_FD:
            for pi, fi in self.DIR_FD[event]:
                if pi < len(args):
                    self._check(event, args[pi], args[fi] if fi is not None and fi < len(args) else None)


# ------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    fmt: str
    index: int
    mutation: str
    outcome: str
    steps: dict[str, str] = field(default_factory=dict)
    message: str = ""
    detail: str = ""
    seconds: float = 0.0


class CaseTimeout(BaseException):
    """Raised by the alarm inside a case (BaseException, so library code cannot swallow it)."""


def _tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
        elif p.is_dir():
            h.update(b"<dir>")
    return h.hexdigest()


def make_case(fmt: str, index: int, seed: int, bases: dict, cases_root: Path) -> tuple[Path, dict, str, str]:
    """Copy the base fixture into a fresh case directory and corrupt one file."""
    rng = random.Random(f"{seed}:{fmt}:{index}")
    spec = bases[fmt]
    case = cases_root / f"{fmt}-{index}"
    if case.exists():
        shutil.rmtree(case)
    shutil.copytree(spec["dir"], case / "src")
    target = rng.choice(spec["targets"])
    path = case / "src" / target
    data = path.read_bytes()
    r = rng.random()
    if r < 0.03:
        path.write_bytes(b"")
        what = "empty file"
    elif r < 0.05:
        path.unlink()
        path.mkdir()
        what = "directory in its place"
    elif r < 0.08:  # another format's bytes under the right name
        donors = [b for b in (FIXTURES / "openclip_tiny" / "open_clip_model.safetensors",
                              FIXTURES / "big_vision" / "siglip_tiny.npz",
                              FIXTURES / "openclip_tiny" / "open_clip_config.json",
                              bases["pt"]["dir"] / "epoch_1.pt") if b.suffix != path.suffix]
        donor = rng.choice(donors)
        shutil.copy(donor, path)
        what = f"{donor.suffix} bytes under the name {path.name}"
    else:
        new, what = MUTATORS[fmt](data, rng, target)
        path.write_bytes(new)
    return case, spec, target, what


def _names_a_file(message: str, case: Path, target: str) -> bool:
    return str(case) in message or Path(target).name in message


def run_steps(fmt: str, case: Path, spec: dict, target: str) -> tuple[str, dict[str, str], str, str]:
    """Reader, inspect, convert; returns (outcome, steps, first error line, detail)."""
    from clawconvert.cli import main
    from clawconvert.errors import ClawError
    from clawconvert.io.readers import open_tensors

    src = case / "src"
    entry = src / spec["file"] if "file" in spec else src
    if fmt == "json":
        entry = src / target.split("/")[0]
    extra = [str(src / a) if a.endswith(".json") else a for a in spec.get("extra", [])]
    steps: dict[str, str] = {}
    first_error = ""
    worst = "accepted"

    def note(outcome: str) -> None:
        nonlocal worst
        order = ["accepted", "refused", "unclear", "partial_output", "source_changed", "outside_write", "traceback", "hang"]
        if order.index(outcome) > order.index(worst):
            worst = outcome

    # 1. the reader itself (for the weights formats)
    if fmt != "json":
        reader_path = src / target if not target.endswith(".json") or fmt == "index" else entry
        if fmt == "index":
            reader_path = src / "model.safetensors.index.json"
        try:
            with open_tensors(reader_path) as store:
                for name in store.keys():
                    store.read(name)
            steps["reader"] = "ok"
        except ClawError as e:
            msg = str(e)
            first_error = first_error or msg
            ok_name = _names_a_file(msg, case, target) and "\n" not in msg
            steps["reader"] = "refused" if ok_name else "unclear"
            note(steps["reader"])
        except CaseTimeout:
            raise
        except Exception as e:
            steps["reader"] = "traceback"
            note("traceback")
            return worst, steps, f"{e.__class__.__name__}: {e}", traceback.format_exc()

    # 2. inspect and convert, through the CLI as a user runs them
    out = case / "out"
    for step, argv in (("inspect", ["inspect", str(entry), *extra]),
                       ("convert", ["convert", str(entry), str(out), "--to", spec["to"], "--quiet", *extra])):
        err, sout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(sout):
            try:
                code = main(argv)
            except CaseTimeout:
                raise
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 2
            except BaseException as e:  # noqa: BLE001 - anything escaping main is a bug
                steps[step] = "traceback"
                note("traceback")
                return worst, steps, f"{e.__class__.__name__}: {e}", traceback.format_exc()
        text = err.getvalue()
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("clawconvert: warning")
                 and not ln.startswith("clawconvert: note")]
        if code == 0:
            steps[step] = "ok"
            if step == "convert":
                from clawconvert.integrity import check_manifest
                if not check_manifest(out).ok:
                    steps[step] = "partial_output"
                    note("partial_output")
            continue
        if code != 2 or "Traceback" in text or "internal error" in text:
            steps[step] = "traceback"
            note("traceback")
            return worst, steps, (lines[0] if lines else f"exit {code}"), text[-4000:]
        first = lines[0] if lines else ""
        first_error = first_error or first
        clean = first.startswith("clawconvert: error: ") and _names_a_file(first, case, target)
        steps[step] = "refused" if clean else "unclear"
        note(steps[step])
        if step == "convert" and (out.exists() or out.is_symlink()):
            steps[step] = "partial_output"
            note("partial_output")
    return worst, steps, first_error, ""


def run_case(fmt: str, index: int, seed: int, bases: dict, cases_root: Path, timeout: float) -> CaseResult:
    t0 = time.monotonic()
    case, spec, target, what = make_case(fmt, index, seed, bases, cases_root)
    before = _tree_hash(case / "src")
    audit = WriteAudit.get()
    old_handler = None
    use_alarm = hasattr(signal, "setitimer") and timeout > 0
    if use_alarm:
        def _alarm(signum, frame):
            raise CaseTimeout()
        old_handler = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    import tempfile
    old_tmp = tempfile.tempdir
    tempfile.tempdir = str(case)
    try:
        with audit.armed(case) as hits:
            outcome, steps, message, detail = run_steps(fmt, case, spec, target)
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except CaseTimeout:
        outcome, steps, message, detail = "hang", {}, f"over {timeout:g} s", traceback.format_exc()[-3000:]
        hits = []
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
        tempfile.tempdir = old_tmp
    if outcome not in ("traceback", "hang"):
        if hits:
            outcome, detail = "outside_write", "\n".join(hits[:20])
        elif _tree_hash(case / "src") != before:
            outcome = "source_changed"
    stray = [p.name for p in case.iterdir() if p.name.startswith(".clawconvert-tmp-")]
    if stray and outcome not in BAD:
        outcome, detail = "partial_output", f"temporary directories left behind: {stray}"
    shutil.rmtree(case, ignore_errors=True)
    return CaseResult(fmt, index, what, outcome, steps, message[:300], detail, round(time.monotonic() - t0, 3))


# ------------------------------------------------------------------------------------
# the dedicated command: worker processes, hard time limits, figures
# ------------------------------------------------------------------------------------
def _worker(conn, root: str, seed: int, timeout: float) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import warnings
    warnings.simplefilter("ignore")
    rootp = Path(root)
    bases = build_bases(rootp / "base")
    for fmt in FORMATS:  # warm up: the first conversion pays for importing open_clip/transformers models
        run_case(fmt, -1, seed, bases, rootp / "cases" / f"warm-{os.getpid()}", 0)
    conn.send(("ready", None))
    while True:
        job = conn.recv()
        if job is None:
            return
        fmt, index = job
        res = run_case(fmt, index, seed, bases, rootp / "cases" / str(os.getpid()), timeout)
        conn.send(("done", asdict(res)))


def run_all(formats: list[str], cases: int, seed: int, workers: int, timeout: float, root: Path,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    root.mkdir(parents=True, exist_ok=True)
    # build the bases once, in a throwaway worker, so the workers only copy
    jobs = [(f, i) for i in range(cases) for f in formats]
    results: list[dict] = []
    pending = list(reversed(jobs))

    def start():
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_worker, args=(child, str(root), seed, timeout), daemon=True)
        p.start()
        kind, _ = parent.recv()
        assert kind == "ready"
        return {"p": p, "conn": parent, "job": None, "since": 0.0}

    pool = [start() for _ in range(workers)]
    t0 = time.monotonic()
    last = t0
    while pending or any(w["job"] for w in pool):
        for w in pool:
            if w["job"] is None and pending:
                w["job"] = pending.pop()
                w["since"] = time.monotonic()
                w["conn"].send(w["job"])
        for i, w in enumerate(pool):
            if w["job"] is None:
                continue
            if w["conn"].poll(0.01):
                try:
                    kind, res = w["conn"].recv()
                except EOFError:  # the worker died (e.g. killed by the OOM killer)
                    results.append(asdict(CaseResult(w["job"][0], w["job"][1], "?", "traceback",
                                                     message="worker died")))
                    pool[i] = start()
                    continue
                results.append(res)
                w["job"] = None
            elif time.monotonic() - w["since"] > timeout + 10 or not w["p"].is_alive():
                fmt, index = w["job"]
                outcome = "hang" if w["p"].is_alive() else "traceback"
                w["p"].kill()
                w["p"].join()
                results.append(asdict(CaseResult(fmt, index, "?", outcome, message=f"worker killed after {timeout + 10:g} s"
                                                  if outcome == "hang" else "worker died")))
                pool[i] = start()
        if time.monotonic() - last > 30:
            last = time.monotonic()
            log(f"  {len(results)}/{len(jobs)} cases, {time.monotonic() - t0:.0f} s")
    for w in pool:
        w["conn"].send(None)
        w["p"].join(5)
    return summarize(results, time.monotonic() - t0)


def summarize(results: list[dict], seconds: float) -> dict[str, Any]:
    per: dict[str, dict[str, int]] = {}
    for r in results:
        row = per.setdefault(r["fmt"], {k: 0 for k in ("cases",) + OUTCOMES})
        row["cases"] += 1
        row[r["outcome"]] += 1
    bad = [r for r in results if r["outcome"] in BAD or r["outcome"] == "unclear"]
    return {"per_format": per, "seconds": round(seconds, 1), "problems": bad}


def format_table(summary: dict[str, Any]) -> str:
    cols = ("cases", "accepted", "refused", "unclear", "traceback", "hang", "outside_write", "source_changed",
            "partial_output")
    lines = ["| format | " + " | ".join(c.replace("_", " ") for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for fmt, row in summary["per_format"].items():
        lines.append(f"| {fmt} | " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000, help="cases per format (default 1000)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--root", type=Path, help="working directory (default: a fresh temporary one, removed after)")
    ap.add_argument("--json", type=Path, help="write figures and every problem case here")
    args = ap.parse_args(argv)
    import tempfile
    root = args.root or Path(tempfile.mkdtemp(prefix="clawconvert-fuzz-"))
    try:
        summary = run_all(args.formats, args.cases, args.seed, args.workers, args.timeout, root,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    print(format_table(summary))
    print(f"\n{sum(r['cases'] for r in summary['per_format'].values())} cases in {summary['seconds']} s "
          f"(seed {args.seed}, {args.workers} workers, {args.timeout:g} s per case)")
    for p in summary["problems"][:30]:
        print(f"- {p['fmt']} #{p['index']} [{p['outcome']}] {p['mutation']}: {p['message']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return 1 if any(p["outcome"] in BAD for p in summary["problems"]) else 0


if __name__ == "__main__":
    sys.exit(main())
