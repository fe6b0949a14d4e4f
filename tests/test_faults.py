"""The fault matrix: every bad input and every bad destination, across every command.

Each input fault is run through every command that reads that input (convert, inspect,
verify, extract-visual, extract-text, merge-lora where they apply).  Every case must end
with exit code 2 and one line ``clawconvert: error: <file>: <problem>`` naming the file,
no traceback, nothing under the destination name, no temporary directory left behind, and
the source's bytes unchanged (hashed before and after).

Destination faults: exists without --overwrite, --overwrite keeping the old output until
the new one is complete, destination equal to / inside / containing the source, a
read-only parent, spaces and non-ASCII in paths, a full disk (an ENOSPC raised in the
middle of writing), a KeyboardInterrupt, and a process killed with SIGKILL mid-write.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, ROOT, tree_hash

TINY = FIXTURES / "openclip_tiny"
NPZ = FIXTURES / "big_vision" / "siglip_tiny.npz"
ST = "open_clip_model.safetensors"


def _parser_commands() -> set[str]:
    from clawconvert.cli import build_parser
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices)


COMMANDS = _parser_commands()


# ------------------------------------------------------------------------------------
# shared, valid material (built once)
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    from clawconvert.cli import main
    root = tmp_path_factory.mktemp("faults-base")
    out = {"openclip": TINY, "npz": NPZ}
    hf = root / "hf"
    assert main(["convert", str(TINY), str(hf), "--to", "hf", "--quiet"]) == 0
    out["hf"] = hf
    sharded = root / "sharded"
    assert main(["convert", str(TINY), str(sharded), "--to", "hf", "--max-shard-size", "1MB", "--quiet"]) == 0
    out["sharded"] = sharded
    pt = root / "pt"
    pt.mkdir()
    sd = load_file(str(TINY / ST))
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, pt / "epoch_1.pt")
    (pt / "model.json").write_text(json.dumps(json.loads((TINY / "open_clip_config.json").read_text())["model_cfg"]))
    out["pt"] = pt
    return out


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return dst


def _edit_bytes(path: Path, fn: Callable[[bytes], bytes]) -> None:
    path.write_bytes(fn(path.read_bytes()))


def _to_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "x").write_text("a directory where a file belongs")


def _st_header(data: bytes) -> tuple[int, dict]:
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8:8 + n])


def _st_with_header(data: bytes, header_text: str) -> bytes:
    n = int.from_bytes(data[:8], "little")
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + data[8 + n:]


def _st_edit_header(fn: Callable[[dict], None]) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        _, header = _st_header(data)
        fn(header)
        return _st_with_header(data, json.dumps(header))
    return edit


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _f32_to_f16(header: dict) -> None:
    header[_first_tensor(header)]["dtype"] = "F16"


def _overlap(header: dict) -> None:
    sizes: dict[int, str] = {}
    for k, e in header.items():
        if k == "__metadata__":
            continue
        size = e["data_offsets"][1] - e["data_offsets"][0]
        if size in sizes:
            e["data_offsets"] = list(header[sizes[size]]["data_offsets"])
            return
        sizes[size] = k
    raise AssertionError("no two tensors of one size")


def _duplicate_name(data: bytes) -> bytes:
    n, header = _st_header(data)
    name = _first_tensor(header)
    text = data[8:8 + n].decode().rstrip()
    entry = json.dumps(header[name])
    return _st_with_header(data, text[:-1] + f',"{name}":{entry}}}')


# ------------------------------------------------------------------------------------
# input faults: (id, base, file to corrupt, corruption, expected words, commands that read it)
# ------------------------------------------------------------------------------------
ALL = ("convert", "inspect", "verify", "extract-visual", "extract-text")
NPZ_CMDS = ("convert", "inspect", "verify")
UNDETECTED = "cannot tell its format"  # big_vision's detector does not say why a broken .npz is not one

INPUT_FAULTS = [
    # safetensors
    ("st-truncated-data", "openclip", ST, lambda p: _edit_bytes(p, lambda d: d[:-1000]), ["truncated"], ALL),
    ("st-truncated-header", "openclip", ST, lambda p: _edit_bytes(p, lambda d: d[:100]), ["truncated"], ALL),
    ("st-flipped-header-byte", "openclip", ST, lambda p: _edit_bytes(p, lambda d: d[:8] + b"\x00" + d[9:]),
     ["corrupt safetensors header"], ALL),
    ("st-dtype-vs-data-length", "openclip", ST, lambda p: _edit_bytes(p, _st_edit_header(_f32_to_f16)),
     ["F16", "data span"], ALL),
    ("st-duplicate-tensor-name", "openclip", ST, lambda p: _edit_bytes(p, _duplicate_name), ["duplicate key"], ALL),
    ("st-overlapping-tensors", "openclip", ST, lambda p: _edit_bytes(p, _st_edit_header(_overlap)), ["overlap"], ALL),
    ("st-trailing-bytes", "openclip", ST, lambda p: _edit_bytes(p, lambda d: d + b"\x00" * 24),
     ["bytes after the last tensor"], ALL),
    ("st-empty", "openclip", ST, lambda p: p.write_bytes(b""), ["empty file"], ALL),
    ("st-directory", "openclip", ST, _to_dir, ["is a directory"], ALL),
    ("st-wrong-format-npz", "openclip", ST, lambda p: shutil.copy(NPZ, p), ["not a safetensors file"], ALL),
    ("st-wrong-format-json", "openclip", ST, lambda p: p.write_text('{"a": 1}' * 10), ["not a safetensors file"], ALL),
    # sharded index
    ("index-missing-shard", "sharded", "model-00001-of-00003.safetensors", lambda p: p.unlink(), ["is missing"], ALL),
    ("index-truncated-json", "sharded", "model.safetensors.index.json", lambda p: _edit_bytes(p, lambda d: d[:60]),
     ["invalid JSON"], ALL),
    ("index-tensor-listed-in-two-shards", "sharded", "model.safetensors.index.json",
     lambda p: _edit_bytes(p, lambda d: d.replace(b'"weight_map": {', b'"weight_map": {\n    "logit_scale": '
                                                  b'"model-00002-of-00003.safetensors",', 1)),
     ["duplicate key 'logit_scale'"], ALL),
    ("index-tensor-in-another-shard", "sharded", "model.safetensors.index.json", lambda p: _move_in_index(p, "logit_scale"),
     ["'logit_scale'", "model-0000"], ALL),
    ("tensor-stored-in-two-shards", "sharded", "model-00003-of-00003.safetensors",
     lambda p: _add_tensor(p, "logit_scale", torch.ones(())), ["'logit_scale' appears in both"], ALL),
    ("index-escapes-directory", "sharded", "model.safetensors.index.json",
     lambda p: _edit_bytes(p, lambda d: d.replace(b'"model-00001-of-00003', b'"../model-00001-of-00003')),
     ["escapes its directory"], ALL),
    ("index-empty-weight-map", "sharded", "model.safetensors.index.json",
     lambda p: p.write_text('{"metadata": {}, "weight_map": {}}'), ["weight_map is empty"], ALL),
    ("index-directory", "sharded", "model.safetensors.index.json", _to_dir, ["is a directory"], ALL),
    ("shard-truncated", "sharded", "model-00002-of-00003.safetensors", lambda p: _edit_bytes(p, lambda d: d[:-10]),
     ["truncated"], ALL),
    # torch zip
    ("pt-truncated", "pt", "epoch_1.pt", lambda p: _edit_bytes(p, lambda d: d[: len(d) // 2]),
     ["not a readable torch checkpoint"], ("convert", "inspect", "extract-visual", "extract-text")),
    ("pt-flipped-directory-bytes", "pt", "epoch_1.pt",
     lambda p: _edit_bytes(p, lambda d: d.replace(b"PK\x01\x02", b"PK\x09\x09", 1)),
     ["not a readable torch checkpoint"], ("convert", "inspect", "extract-visual", "extract-text")),
    ("pt-pickle-garbled", "pt", "epoch_1.pt", lambda p: _rezip_member(p, "data.pkl", lambda d: d[: len(d) // 3]),
     ["not a readable torch checkpoint"], ("convert", "inspect", "extract-visual", "extract-text")),
    ("pt-empty", "pt", "epoch_1.pt", lambda p: p.write_bytes(b""), ["empty file"],
     ("convert", "inspect", "extract-visual", "extract-text")),
    ("pt-wrong-format", "pt", "epoch_1.pt", lambda p: shutil.copy(TINY / ST, p), ["not a torch checkpoint"],
     ("convert", "inspect", "extract-visual", "extract-text")),
    ("pt-directory", "pt", "epoch_1.pt", _to_dir, ["cannot tell its format"], ("convert", "inspect", "extract-visual")),
    # npz
    ("npz-truncated", "npz", "siglip_tiny.npz", lambda p: _edit_bytes(p, lambda d: d[: len(d) - 5000]),
     [("not a valid .npz archive", UNDETECTED)], NPZ_CMDS),
    ("npz-member-shorter-than-header", "npz", "siglip_tiny.npz",
     lambda p: _rezip_member(p, "params/t.npy", _npy_grow_shape), ["truncated"], NPZ_CMDS),
    ("npz-flipped-data-byte", "npz", "siglip_tiny.npz", lambda p: _flip_member_data(p), ["CRC"],
     ("convert", "verify", "inspect --check-finite")),
    ("npz-duplicate-member", "npz", "siglip_tiny.npz", lambda p: _duplicate_member(p), ["stored twice"], NPZ_CMDS),
    ("npz-empty", "npz", "siglip_tiny.npz", lambda p: p.write_bytes(b""), [("empty file", UNDETECTED)], NPZ_CMDS),
    ("npz-wrong-format", "npz", "siglip_tiny.npz", lambda p: shutil.copy(TINY / ST, p),
     [("not a valid .npz", UNDETECTED)], NPZ_CMDS),
    # JSON configs
    ("openclip-config-truncated", "openclip", "open_clip_config.json", lambda p: _edit_bytes(p, lambda d: d[:40]),
     ["invalid JSON"], ALL),
    ("openclip-config-empty", "openclip", "open_clip_config.json", lambda p: p.write_bytes(b""), ["empty file"], ALL),
    ("openclip-config-not-object", "openclip", "open_clip_config.json", lambda p: p.write_text("[1, 2]"),
     ["not a JSON object"], ALL),
    ("openclip-config-wrong-format", "openclip", "open_clip_config.json", lambda p: shutil.copy(TINY / ST, p),
     ["not UTF-8"], ALL),
    ("openclip-config-deep-nesting", "openclip", "open_clip_config.json",
     lambda p: p.write_text("[" * 100000 + "]" * 100000), ["nested too deeply"], ALL),
    ("hf-config-truncated", "hf", "config.json", lambda p: _edit_bytes(p, lambda d: d[:50]), ["invalid JSON"], ALL),
    ("hf-config-null", "hf", "config.json", lambda p: p.write_text("null"), ["not a JSON object"], ALL),
    ("hf-config-directory", "hf", "config.json", _to_dir, ["is a directory"], ALL),
    ("hf-preprocessor-config-bad", "hf", "preprocessor_config.json", lambda p: p.write_text('{"image_mean": "x"}'),
     ["image_mean"], ("convert", "inspect", "verify")),
    # contradictions between files
    ("shapes-vs-config", "openclip", "open_clip_config.json",
     lambda p: _edit_json(p, lambda c: c["model_cfg"]["vision_cfg"].update(width=48)),
     ["shape contradicts the config"], ("convert", "extract-visual")),
    ("layers-vs-config", "hf", "config.json", lambda p: _edit_json(p, lambda c: c["text_config"].update(num_hidden_layers=3)),
     ["missing"], ("convert", "extract-text")),
    ("absurd-layer-count", "hf", "config.json",
     lambda p: _edit_json(p, lambda c: c["vision_config"].update(num_hidden_layers=10**12)),
     ["num_hidden_layers"], ALL),
    ("zero-head-width", "openclip", "open_clip_config.json",
     lambda p: _edit_json(p, lambda c: c["model_cfg"]["vision_cfg"].update(head_width=0)),
     ["not a valid OpenCLIP model config"], ALL),
]


def _move_in_index(path: Path, name: str) -> None:
    index = json.loads(path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][name] = next(s for s in shards if s != index["weight_map"][name])
    path.write_text(json.dumps(index))


def _add_tensor(path: Path, name: str, t: torch.Tensor) -> None:
    tensors = load_file(str(path))
    tensors[name] = t
    save_file(tensors, str(path), metadata={"format": "pt"})


def _widen_lora_a(path: Path, width: int) -> None:
    """An adapter trained for a wider model: its first lora_A takes ``width`` inputs."""
    tensors = load_file(str(path))
    name = sorted(k for k in tensors if "lora_A" in k)[0]
    tensors[name] = torch.zeros(tensors[name].shape[0], width)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _rezip_member(path: Path, suffix: str, fn: Callable[[bytes], bytes]) -> None:
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for info in src.infolist():
            data = src.read(info)
            z.writestr(info.filename, fn(data) if info.filename.endswith(suffix) else data)
    path.write_bytes(out.getvalue())


def _npy_grow_shape(data: bytes) -> bytes:
    head_len = int.from_bytes(data[8:10], "little")
    head = data[10:10 + head_len].decode("latin1")
    new = head.replace("'shape': ()", "'shape': (4,)").replace("'shape': (1,)", "'shape': (4,)")
    assert new != head, head
    new = new.encode("latin1")
    new = new + b" " * (head_len - len(new))
    return data[:10] + new[:head_len] + data[10 + head_len:]


def _flip_member_data(path: Path) -> None:
    z = zipfile.ZipFile(path)
    info = max(z.infolist(), key=lambda i: i.file_size)
    z.close()
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:  # the member's data sits after its local header
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    at = info.header_offset + 30 + n + m + info.file_size - 7
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def _duplicate_member(path: Path) -> None:
    import warnings
    src = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    first = src.infolist()[0]
    with zipfile.ZipFile(path, "a") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z.writestr(first.filename, src.read(first))


def _argv(command: str, src: Path, out: Path, kind: str, base: dict) -> list[str] | None:
    extra = ["--model-config", str(src.parent / "model.json")] if kind == "pt" else []
    name = command.split()[0]
    if name not in COMMANDS:
        return None
    if name == "convert":
        return ["convert", str(src), str(out), "--to", "openclip" if kind in ("hf", "sharded") else "hf", *extra]
    if name == "inspect":
        return ["inspect", str(src), *extra, *command.split()[1:]]
    if name == "verify":
        if kind == "pt":
            return None
        return ["verify", str(TINY if kind != "npz" else src), str(src if kind != "npz" else TINY)]
    if name in ("extract-visual", "extract-text"):
        return [name, str(src), str(out), *extra]
    raise AssertionError(command)


def run_fault(cli, argv: list[str], out: Path | None, words: list, named: Path, sources: list[Path]) -> str:
    before = [tree_hash(s) for s in sources]
    r = cli(*argv)
    assert r.code == 2, (argv, r.code, r.err)
    assert "Traceback" not in r.err and "internal error" not in r.err, r.err
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    first = lines[0]
    assert first.startswith("clawconvert: error: "), r.err
    assert all(ln.startswith("  ") for ln in lines[1:]), r.err  # details only, indented
    assert str(named) in first or named.name in first, (named, first)
    for w in words:  # a word, or a tuple of acceptable alternatives
        assert any(a in r.err for a in ((w,) if isinstance(w, str) else w)), (w, r.err)
    assert [tree_hash(s) for s in sources] == before, "a source changed"
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(".clawconvert-tmp-*"))
    return first


@pytest.mark.parametrize("fault", INPUT_FAULTS, ids=[f[0] for f in INPUT_FAULTS])
def test_input_fault(fault, base, tmp_path, cli):
    name, kind, rel, corrupt, words, commands = fault
    src_root = _copy(base[kind], tmp_path / "src" / base[kind].name)
    corrupt(src_root / rel if src_root.is_dir() else src_root)
    src = src_root / "epoch_1.pt" if kind == "pt" else src_root
    named = src_root / rel if src_root.is_dir() else src_root
    if name in ("index-missing-shard",):
        named = src_root / "model.safetensors.index.json"
    if name.startswith("shapes-") or name.startswith("layers-"):
        named = src_root  # the plan's error names the weights of this source
    ran = 0
    for command in commands:
        out = tmp_path / f"out-{command.split()[0]}"
        argv = _argv(command, src, out, kind, base)
        if argv is None:
            continue
        writes = command.split()[0] in ("convert", "extract-visual", "extract-text")
        run_fault(cli, argv, out if writes else None, words, named, [src_root])
        ran += 1
    assert ran


# ------------------------------------------------------------------------------------
# adapter faults (merge-lora)
# ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> dict[str, Path]:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("lora")
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(root / "base")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained(root / "adapter")
    return {"base": root / "base", "adapter": root / "adapter"}


ADAPTER_FAULTS = [
    ("adapter-weights-truncated", "adapter", "adapter_model.safetensors", lambda p: _edit_bytes(p, lambda d: d[:-16]),
     ["truncated"]),
    ("adapter-weights-empty", "adapter", "adapter_model.safetensors", lambda p: p.write_bytes(b""), ["empty file"]),
    ("adapter-weights-directory", "adapter", "adapter_model.safetensors", _to_dir, ["is a directory"]),
    ("adapter-config-invalid-json", "adapter", "adapter_config.json", lambda p: _edit_bytes(p, lambda d: d[:30]),
     ["adapter_config.json"]),
    ("adapter-rank-vs-config", "adapter", "adapter_config.json", lambda p: _edit_json(p, lambda c: c.update(r=3)),
     ["shape"]),
    ("adapter-shapes-vs-base", "adapter", "adapter_model.safetensors", lambda p: _widen_lora_a(p, 24), ["shape"]),
    ("base-weights-truncated", "base", "model.safetensors", lambda p: _edit_bytes(p, lambda d: d[:-4]),
     ["truncated"]),
]


@pytest.mark.skipif("merge-lora" not in COMMANDS, reason="merge-lora not in this build")
@pytest.mark.parametrize("fault", ADAPTER_FAULTS, ids=[f[0] for f in ADAPTER_FAULTS])
def test_adapter_fault(fault, lora, tmp_path, cli):
    name, which, rel, corrupt, words = fault
    base = _copy(lora["base"], tmp_path / "base")
    adapter = _copy(lora["adapter"], tmp_path / "adapter")
    target = (base if which == "base" else adapter) / rel
    corrupt(target)
    out = tmp_path / "out"
    named = target if name not in ("adapter-rank-vs-config", "adapter-shapes-vs-base") else adapter
    run_fault(cli, ["merge-lora", str(base), str(adapter), str(out)], out, words, named, [base, adapter])


# ------------------------------------------------------------------------------------
# NaN / Inf
# ------------------------------------------------------------------------------------
def test_nan_and_inf_are_reported(tmp_path, cli):
    src = _copy(TINY, tmp_path / "src")
    w = load_file(str(src / ST))
    w["visual.proj"][0, :3] = float("nan")
    w["ln_final.weight"][1] = float("inf")
    save_file(w, str(src / ST))
    before = tree_hash(src)
    # convert passes NaN through unless asked; --check-finite refuses, naming file and tensor
    first = run_fault(cli, ["convert", src, tmp_path / "out", "--to", "hf", "--check-finite"], tmp_path / "out",
                      [("NaN", "Inf"), "--check-finite"], src / ST, [src])
    assert "'ln_final.weight'" in first or "'visual.proj'" in first
    r = cli("inspect", src, "--check-finite")
    assert r.code == 2 and "3 NaN values" in r.err and "1 Inf value" in r.err, r.err
    assert cli("convert", src, tmp_path / "hf", "--to", "hf").code == 0
    # verify checks by default, both checkpoints, and lists every tensor
    r = cli("verify", TINY, tmp_path / "hf")
    assert r.code == 2 and "NaN" in r.err and "Inf" in r.err and "Traceback" not in r.err, r.err
    assert "model.safetensors" in r.err.splitlines()[0]
    r = cli("verify", "--manifest", tmp_path / "hf")
    assert r.code == 2 and "NaN" in r.err, r.err
    assert cli("verify", "--manifest", tmp_path / "hf", "--no-check-finite").code == 0
    assert tree_hash(src) == before


# ------------------------------------------------------------------------------------
# destinations
# ------------------------------------------------------------------------------------
def _no_leftovers(parent: Path) -> None:
    assert not list(parent.glob(".clawconvert-tmp-*")), list(parent.iterdir())


def test_existing_destination_is_refused_without_overwrite(tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for command in ("convert", "extract-visual"):
        if command not in COMMANDS:
            continue
        argv = [command, TINY, out] + (["--to", "hf"] if command == "convert" else [])
        r = cli(*argv)
        assert r.code == 2 and "already exists" in r.err and "--overwrite" in r.err and str(out) in r.err
        assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    _no_leftovers(tmp_path)


def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path, cli, monkeypatch):
    from clawconvert.io import writers
    out = tmp_path / "out"
    assert cli("convert", TINY, out, "--to", "openclip").code == 0
    old = tree_hash(out)
    seen = []
    real_write = writers.SafetensorsWriter.write

    def spying_write(self, name, tensor):
        seen.append(tree_hash(out))  # mid-write, the destination is still the complete old output
        return real_write(self, name, tensor)

    monkeypatch.setattr(writers.SafetensorsWriter, "write", spying_write)
    assert cli("convert", TINY, out, "--to", "hf", "--overwrite").code == 0
    assert seen and set(seen) == {old}
    assert (out / "config.json").exists() and not (out / "open_clip_config.json").exists()
    _no_leftovers(tmp_path)

    # and a failed overwrite leaves the old output exactly as it was
    new = tree_hash(out)

    def failing_write(self, name, tensor):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writers.SafetensorsWriter, "write", failing_write)
    r = cli("convert", TINY, out, "--to", "openclip", "--overwrite")
    assert r.code == 2 and "write failed" in r.err and str(out) in r.err
    assert tree_hash(out) == new
    _no_leftovers(tmp_path)


def test_overwrite_without_atomic_exchange_also_keeps_the_old_output(tmp_path, cli, monkeypatch):
    from clawconvert.io import atomic
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)  # file systems without renameat2
    out = tmp_path / "out"
    assert cli("convert", TINY, out, "--to", "openclip").code == 0
    assert cli("convert", TINY, out, "--to", "hf", "--overwrite").code == 0
    assert (out / "config.json").exists() and not (out / "open_clip_config.json").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
def test_destination_equal_to_inside_or_containing_the_source(where, tmp_path, cli):
    src = _copy(TINY, tmp_path / "models" / "src")
    dst = {"equal": src, "inside": src / "out", "contains": tmp_path / "models"}[where]
    before = tree_hash(tmp_path / "models")
    for command in ("convert", "extract-visual"):
        if command not in COMMANDS:
            continue
        r = cli(command, src, dst, *(["--to", "hf"] if command == "convert" else []), "--overwrite")
        assert r.code == 2 and "source" in r.err and str(dst) in r.err.splitlines()[0], r.err
        assert tree_hash(tmp_path / "models") == before


def test_read_only_parent(tmp_path, cli, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() != 0:
        parent.chmod(0o555)
    else:  # root ignores permission bits: present the parent as not writable
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if Path(p) == parent else real(p, m, *a, **k))
    try:
        r = cli("convert", TINY, parent / "out", "--to", "hf")
        assert r.code == 2 and "not writable" in r.err and str(parent) in r.err, r.err
        assert not (parent / "out").exists()
    finally:
        parent.chmod(0o755)


def test_temporary_directory_cannot_be_created(tmp_path, cli, monkeypatch):
    """What a read-only or full file system does to the first write (root cannot be stopped by mode bits)."""
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self.name.startswith(".clawconvert-tmp-"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    r = cli("convert", TINY, tmp_path / "out", "--to", "hf")
    assert r.code == 2 and "Read-only file system" in r.err and str(tmp_path) in r.err
    _no_leftovers(tmp_path)


def test_paths_with_spaces_and_non_ascii(tmp_path, cli):
    src = _copy(TINY, tmp_path / "my models" / "mödel ünïcødé 模型")
    out = tmp_path / "out dir" / "çonverted 出力"
    out.parent.mkdir()
    assert cli("convert", src, out, "--to", "hf").code == 0
    assert cli("verify", "--manifest", out).code == 0
    back = tmp_path / "out dir" / "bäck"
    assert cli("convert", out, back, "--to", "openclip").code == 0
    assert load_file(str(back / ST)).keys() == load_file(str(src / ST)).keys()
    (src / ST).write_bytes(b"")
    r = cli("convert", src, tmp_path / "out dir" / "x", "--to", "hf")
    assert r.code == 2 and str(src / ST) in r.err


def test_a_destination_name_near_the_file_system_limit(tmp_path, cli):
    out = tmp_path / ("m" * 250)
    assert cli("convert", TINY, out, "--to", "openclip").code == 0
    assert cli("verify", "--manifest", out).code == 0
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("when", ["first-tensor", "later-tensor", "close", "side-files"])
def test_disk_full_mid_write(when, tmp_path, cli, monkeypatch):
    from clawconvert.io import staged
    count = {"n": 0}
    enospc = OSError(errno.ENOSPC, "No space left on device")
    if when in ("first-tensor", "later-tensor"):
        budget = 0 if when == "first-tensor" else 1_000_000
        real_pwrite_all = staged.pwrite_all

        def pwrite_all(fd, data, offset, path):
            """The disk fills up after ``budget`` more bytes of tensor data."""
            count["n"] += memoryview(data).nbytes
            if count["n"] > budget:
                raise staged.with_file(OSError(errno.ENOSPC, "No space left on device"), path)
            return real_pwrite_all(fd, data, offset, path)
        monkeypatch.setattr(staged, "pwrite_all", pwrite_all)  # every output byte goes through it
    elif when == "close":
        monkeypatch.setattr(staged.os, "fsync", lambda fd: (_ for _ in ()).throw(enospc))
    else:
        real_write_text = Path.write_text

        def write_text(self, *a, **k):
            if self.name == "open_clip_config.json" and ".clawconvert-tmp-" in str(self):
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real_write_text(self, *a, **k)
        monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    before = tree_hash(TINY)
    r = cli("convert", TINY, out, "--to", "openclip")
    assert r.code == 2, r.err
    first = r.err.strip().splitlines()[0]
    assert first.startswith("clawconvert: error: ") and str(out) in first, first
    assert "No space left on device" in first and "disk is full" in first
    if when != "side-files":
        assert "open_clip_model.safetensors" in first
    assert not out.exists()
    _no_leftovers(tmp_path)
    assert tree_hash(TINY) == before


def test_keyboard_interrupt_mid_write(tmp_path, cli, monkeypatch):
    from clawconvert.io import writers
    monkeypatch.setattr(writers.SafetensorsWriter, "write", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    r = cli("convert", TINY, tmp_path / "out", "--to", "openclip")
    assert r.code == 130 and "nothing was written" in r.err
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path)


# ------------------------------------------------------------------------------------
# SIGKILL mid-write: a real process, a real kill
# ------------------------------------------------------------------------------------
SLOW_CONVERT = """
import sys, time
from pathlib import Path
from clawconvert.io import writers
state = {"n": 0}
def slowly(real):
    def method(self, name, *args):
        real(self, name, *args)
        state["n"] += 1
        if state["n"] == 5:  # partly written: tell the test, then keep going slowly
            Path(sys.argv[1]).write_text("writing")
            time.sleep(60)
    return method
writers.SafetensorsWriter.write = slowly(writers.SafetensorsWriter.write)
writers.SafetensorsWriter.copy_range = slowly(writers.SafetensorsWriter.copy_range)
from clawconvert.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def larger(tmp_path_factory) -> Path:
    """A synthetic OpenCLIP model of ~90 MB (ViT-B/32 widths, 2 layers per tower)."""
    import open_clip
    from make_fixtures import write_openclip_dir
    cfg = open_clip.get_model_config("ViT-B-32")
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "layers": 2}, "text_cfg": {**cfg["text_cfg"], "layers": 2}}
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**cfg)
    out = tmp_path_factory.mktemp("larger") / "src"
    write_openclip_dir(model, cfg, out)
    return out


@pytest.mark.parametrize("overwrite", [False, True])
def test_sigkill_mid_write_leaves_nothing_and_a_rerun_succeeds(overwrite, larger, tmp_path, cli):
    out = tmp_path / "out"
    if overwrite:
        assert cli("convert", TINY, out, "--to", "openclip").code == 0
        old = tree_hash(out)
    before = tree_hash(larger)
    flag = tmp_path / "writing"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = ["convert", str(larger), str(out), "--to", "hf", "--quiet"] + (["--overwrite"] if overwrite else [])
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, str(flag), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "conversion never started writing"
            time.sleep(0.05)
        temps = list(tmp_path.glob(".clawconvert-tmp-out-*"))
        assert temps and any((t / "out" / "model.safetensors").exists() for t in temps)  # really mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    # nothing partial under the destination name: absent, or the untouched old output
    if overwrite:
        assert tree_hash(out) == old
    else:
        assert not out.exists()
    assert list(tmp_path.glob(".clawconvert-tmp-out-*"))  # the killed process could not clean up
    # a re-run removes the dead process's temporary directory and succeeds
    r = cli("convert", larger, out, "--to", "hf", "--quiet", *(["--overwrite"] if overwrite else []))
    assert r.code == 0, r.err
    assert cli("verify", "--manifest", out).code == 0
    _no_leftovers(tmp_path)
    assert tree_hash(larger) == before


def test_stale_temporaries_of_live_processes_are_left_alone(tmp_path, cli):
    live = tmp_path / f".clawconvert-tmp-out-{os.getpid()}-0123abcd"
    live.mkdir()
    assert cli("convert", TINY, tmp_path / "out", "--to", "openclip").code == 0
    assert live.exists()  # this very process is alive: its directory may be in use


def test_an_overwrite_killed_between_its_two_renames_is_restored(tmp_path, cli):
    """Without renameat2 an overwrite renames twice; a kill in between leaves the old output parked."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    assert cli("convert", TINY, out, "--to", "openclip").code == 0
    old = tree_hash(out)
    parked = tmp_path / f".clawconvert-tmp-out-{dead.pid}-89abcdef"
    parked.mkdir()
    (parked / ".clawconvert-owner.json").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename,
                                                                "dst": "out", "payload": "out"}))
    os.rename(out, parked / "old")
    # the next run, even one that does not overwrite, first puts the old output back
    r = cli("convert", TINY, out, "--to", "hf")
    assert r.code == 2 and "already exists" in r.err and "restored the previous output" in r.err
    assert tree_hash(out) == old
    _no_leftovers(tmp_path)


def test_a_parked_output_is_never_deleted_when_the_name_is_taken(tmp_path, cli):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    parked = tmp_path / f".clawconvert-tmp-out-{dead.pid}-89abcdef"
    (parked / "old").mkdir(parents=True)
    (parked / "old" / "weights").write_text("the only copy")
    (tmp_path / "out").mkdir()  # someone made a new 'out' since
    r = cli("convert", TINY, tmp_path / "other", "--to", "openclip")
    assert r.code == 0 and "nothing was deleted" in r.err
    assert (parked / "old" / "weights").read_text() == "the only copy"
