"""Security: checkpoints are data, never code.

* Pickles load with ``weights_only=True``: a REAL malicious pickle (its ``__reduce__`` runs
  ``exec`` to write a marker file) is refused with a clear one-line message in every
  container it can hide in (torch zip, legacy torch, raw pickle, HF ``pytorch_model.bin``,
  a training checkpoint's extra entry, a PEFT adapter), and the marker never appears.
  ``--unsafe-pickle`` is the only way around it, and it warns (the marker then appears:
  proof the pickle is real).
* ``.npz`` object arrays (numpy's pickles) are refused.
* Paths from an index cannot leave their directory (``..``, absolute, symlinks out), while
  the Hugging Face cache's own symlinks into ``blobs/`` still open.
* Remote code is never run: ``auto_map`` in config.json / tokenizer_config.json with a
  Python file beside it converts (or fails) without importing it.
* A Hub token from the environment appears in no output, message or manifest.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES, assert_one_line_error, tree_hash

TINY = FIXTURES / "openclip_tiny"


class Evil:
    """Unpickling this runs ``exec``, which writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def tiny_state() -> dict[str, torch.Tensor]:
    return load_file(str(TINY / "open_clip_model.safetensors"))


def tiny_config(tmp_path: Path) -> Path:
    cfg = json.loads((TINY / "open_clip_config.json").read_text())["model_cfg"]
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    return path


def assert_refused(r, path: Path, marker: Path) -> None:
    assert_one_line_error(r, str(path), "refused", "--unsafe-pickle")
    assert "weights_only" in r.err
    assert not marker.exists(), "the pickle's code ran"


@pytest.mark.parametrize("container", ["torch-zip", "torch-legacy", "raw-pickle", "nested-in-training-checkpoint"])
def test_malicious_pickle_is_refused_and_never_runs(container, tmp_path, cli):
    marker = tmp_path / "MARKER"
    evil = Evil(marker)
    path = tmp_path / ("epoch_1.pt" if container != "raw-pickle" else "model.bin")
    if container == "torch-zip":
        torch.save({"state_dict": evil}, path)
    elif container == "torch-legacy":
        torch.save({"state_dict": evil}, path, _use_new_zipfile_serialization=False)
    elif container == "raw-pickle":
        path.write_bytes(pickle.dumps({"state_dict": evil}))
    else:  # a real training checkpoint, with the payload in an innocent-looking entry
        torch.save({"epoch": 1, "state_dict": tiny_state(), "optimizer": {"hook": evil}}, path)
    before = tree_hash(path)
    cfg = tiny_config(tmp_path)
    for argv in (["inspect", path, "--model-config", cfg],
                 ["convert", path, tmp_path / "out", "--to", "hf", "--model-config", cfg]):
        assert_refused(cli(*argv), path, marker)
    assert not (tmp_path / "out").exists()
    assert tree_hash(path) == before


def test_unsafe_pickle_is_the_only_way_round_and_it_warns(tmp_path, cli):
    marker = tmp_path / "MARKER"
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": tiny_state(), "optimizer": {"hook": Evil(marker)}}, path)
    cfg = tiny_config(tmp_path)
    assert_refused(cli("convert", path, tmp_path / "safe", "--to", "hf", "--model-config", cfg), path, marker)
    r = cli("convert", path, tmp_path / "out", "--to", "hf", "--model-config", cfg, "--unsafe-pickle")
    assert r.code == 0, r.err
    warning = [ln for ln in r.err.splitlines() if "warning" in ln]
    assert warning and str(path) in warning[0] and "--unsafe-pickle" in warning[0] and "runs any code" in warning[0]
    assert marker.read_text() == "pwned"  # the pickle really was malicious: only the flag let it run


def test_malicious_pytorch_model_bin_in_an_hf_directory(tmp_path, cli):
    hf = tmp_path / "hf"
    assert cli("convert", TINY, hf, "--to", "hf").code == 0
    state = load_file(str(hf / "model.safetensors"))
    (hf / "model.safetensors").unlink()
    marker = tmp_path / "MARKER"
    torch.save({**state, "evil": Evil(marker)}, hf / "pytorch_model.bin")
    for argv in (["inspect", hf], ["convert", hf, tmp_path / "out", "--to", "openclip"], ["verify", TINY, hf]):
        assert_refused(cli(*argv), hf / "pytorch_model.bin", marker)


def test_malicious_adapter_bin_is_refused(tmp_path, cli):
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    base = tmp_path / "base"
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": str(base)}))
    marker = tmp_path / "MARKER"
    torch.save({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": Evil(marker)},
               adapter / "adapter_model.bin")
    r = cli("merge-lora", base, adapter, tmp_path / "out")
    assert_refused(r, adapter / "adapter_model.bin", marker)
    assert not (tmp_path / "out").exists()


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path, cli):
    marker = tmp_path / "MARKER"
    path = tmp_path / "siglip.npz"
    src = dict(np.load(FIXTURES / "big_vision" / "siglip_tiny.npz"))
    src["params/evil"] = np.array([Evil(marker)], dtype=object)
    np.savez(path, **src)
    r = cli("inspect", path)
    assert_one_line_error(r, str(path), "params/evil", "Python objects")
    assert not marker.exists()


# ------------------------------------------------------------------------------------
# paths from an index stay inside their directory
# ------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path, cli) -> Path:
    out = tmp_path / "sharded"
    assert cli("convert", TINY, out, "--to", "hf", "--max-shard-size", "1MB").code == 0
    return out


def _point_first_shard_at(index_dir: Path, target: str) -> str:
    path = index_dir / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    path.write_text(json.dumps(index))
    return first


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-out", "nested-dotdot"])
def test_index_paths_cannot_escape(how, sharded, tmp_path, cli):
    outside = tmp_path / "outside"
    outside.mkdir()
    first = sorted(set(json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"].values()))[0]
    shutil.move(sharded / first, outside / first)
    if how == "dotdot":
        _point_first_shard_at(sharded, f"../outside/{first}")
    elif how == "absolute":
        _point_first_shard_at(sharded, str(outside / first))
    elif how == "nested-dotdot":
        _point_first_shard_at(sharded, f"sub/../../outside/{first}")
    else:
        os.symlink(outside / first, sharded / first)
    before = tree_hash(outside)
    r = cli("convert", sharded, tmp_path / "out", "--to", "openclip")
    assert_one_line_error(r, "model.safetensors.index.json", "escapes its directory")
    assert not (tmp_path / "out").exists() and tree_hash(outside) == before


def test_hf_cache_symlinks_into_blobs_still_open(sharded, tmp_path, cli):
    """snapshots/<rev>/<file> -> ../../blobs/<sha>, the layout huggingface_hub writes."""
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in sharded.iterdir():
        blob = blobs / f"sha-{f.name}"
        shutil.copy(f, blob)
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    r = cli("convert", snap, tmp_path / "out", "--to", "openclip")
    assert r.code == 0, r.err


# ------------------------------------------------------------------------------------
# remote code is data, never run
# ------------------------------------------------------------------------------------
def test_auto_map_custom_code_is_never_imported(tmp_path, cli):
    hf = tmp_path / "hf"
    assert cli("convert", TINY, hf, "--to", "hf").code == 0
    marker = tmp_path / "MARKER"
    code = f"open({str(marker)!r}, 'w').write('imported')\n"
    for name in ("modeling_evil.py", "configuration_evil.py", "tokenization_evil.py"):
        (hf / name).write_text(code)
    for cfg_name, auto in (("config.json", {"AutoConfig": "configuration_evil.EvilConfig",
                                           "AutoModel": "modeling_evil.EvilModel"}),
                           ("tokenizer_config.json", {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})):
        cfg = json.loads((hf / cfg_name).read_text())
        cfg["auto_map"] = auto
        (hf / cfg_name).write_text(json.dumps(cfg))
    for argv in (["inspect", hf], ["convert", hf, tmp_path / "oc", "--to", "openclip", "--verify"],
                 ["verify", TINY, hf]):
        r = cli(*argv)
        assert r.code in (0, 2), r.err
        assert "Traceback" not in r.err
    assert not marker.exists()


def test_the_package_never_asks_for_remote_code():
    import clawconvert
    root = Path(clawconvert.__file__).parent
    hits = [f"{p.relative_to(root)}" for p in root.rglob("*.py") if "trust_remote_code=True" in p.read_text()]
    assert not hits, hits


def test_hub_token_never_appears_in_outputs_or_messages(tmp_path, cli, monkeypatch):
    token = "hf_SENTINELtoken0123456789abcdefghijkl"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    texts = []
    for argv in (["convert", TINY, tmp_path / "out", "--to", "hf"], ["verify", "--manifest", tmp_path / "out"],
                 ["convert", tmp_path / "missing", tmp_path / "x", "--to", "hf"],
                 ["inspect", tmp_path / "out"]):
        r = cli(*argv)
        texts += [r.out, r.err]
    for p in (tmp_path / "out").rglob("*"):
        if p.is_file():
            texts.append(p.read_bytes().decode("utf-8", "replace"))
    assert not [t for t in texts if token in t]
