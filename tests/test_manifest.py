"""Verifiable outputs: every output carries a manifest that ``verify --manifest`` re-checks.

An intact output exits 0; a changed byte, an added file, a removed file, or a hand-edited
manifest (bad JSON, a path leaving the directory, a malformed hash) exits 1 and lists what
differs; a directory without a manifest is exit 2.  ``verify A B`` keeps working as before.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FIXTURES

TINY = FIXTURES / "openclip_tiny"
MANIFEST = "clawconvert_manifest.json"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    from clawconvert.cli import main
    root = tmp_path_factory.mktemp("manifest")
    out = {}
    for name, argv in (("hf", ["--to", "hf"]), ("sharded", ["--to", "hf", "--max-shard-size", "1MB"]),
                       ("openclip", ["--to", "openclip"])):
        assert main(["convert", str(TINY), str(root / name), *argv, "--quiet"]) == 0
        out[name] = root / name
    return out


@pytest.fixture
def output(made, tmp_path) -> Path:
    dst = tmp_path / "out"
    shutil.copytree(made["sharded"], dst)
    return dst


def test_manifest_records_what_made_the_output(made):
    m = json.loads((made["hf"] / MANIFEST).read_text())
    assert m["tool"] == "clawconvert" and m["version"]
    assert m["command"].startswith("clawconvert convert ") and "--to hf" in m["command"]  # the argv given to main()
    assert m["source"]["format"] == "openclip" and len(m["source"]["fingerprint"]) == 64
    assert {t["name"] for t in m["tables"]} == {"clip/openclip", "clip/hf"}
    files = sorted(p.name for p in made["hf"].iterdir() if p.name != MANIFEST)
    assert sorted(m["files"]) == files and all(len(h) == 64 for h in m["files"].values())


@pytest.mark.parametrize("kind", ["hf", "sharded", "openclip"])
def test_intact_outputs_pass(kind, made, cli):
    r = cli("verify", "--manifest", made[kind])
    assert r.code == 0, r.err
    assert r.out.startswith("manifest OK: ") and "files intact" in r.out


def test_a_changed_byte_is_detected(output, cli):
    shard = output / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight: a valid file, silently different numbers
    shard.write_bytes(bytes(data))
    r = cli("verify", "--manifest", output)
    assert r.code == 1
    assert "1 changed" in r.err.splitlines()[0] and "changed: model-00002-of-00003.safetensors" in r.err


def test_added_removed_and_changed_files_are_all_listed(output, cli):
    (output / "vocab.json").unlink()
    (output / "notes.txt").write_text("added by hand")
    (output / "sub").mkdir()
    (output / "sub" / "x.bin").write_bytes(b"\0")
    cfg = json.loads((output / "config.json").read_text())
    cfg["projection_dim"] = 7
    (output / "config.json").write_text(json.dumps(cfg))
    r = cli("verify", "--manifest", output)
    assert r.code == 1
    first = r.err.splitlines()[0]
    assert first.startswith("clawconvert: error: ") and str(output) in first
    assert "1 changed, 2 added, 1 removed" in first
    assert "changed: config.json" in r.err
    assert "added (not in the manifest): notes.txt" in r.err and "added (not in the manifest): sub/x.bin" in r.err
    assert "removed (listed in the manifest, missing): vocab.json" in r.err
    assert "Traceback" not in r.err


@pytest.mark.parametrize("edit,words", [
    (lambda m: m["files"].update({"config.json": "0" * 64}), "changed: config.json"),
    (lambda m: m["files"].update({"../../etc/passwd": "0" * 64}), "not a file inside the directory"),
    (lambda m: m["files"].update({"/etc/passwd": "0" * 64}), "not a file inside the directory"),
    (lambda m: m["files"].update({"config.json": "not-a-hash"}), "malformed sha256"),
    (lambda m: m.pop("files"), "no 'files' table"),
    (lambda m: m.update(files=["config.json"]), "no 'files' table"),
])
def test_a_hand_edited_manifest_is_detected(edit, words, output, cli):
    m = json.loads((output / MANIFEST).read_text())
    edit(m)
    (output / MANIFEST).write_text(json.dumps(m))
    r = cli("verify", "--manifest", output)
    assert r.code == 1 and words in r.err and "Traceback" not in r.err, r.err


@pytest.mark.parametrize("text", ["", "{", "[]", "null", "[" * 50000 + "]" * 50000, "\xff\xfe"])
def test_a_corrupt_manifest_file_is_a_finding_not_a_crash(text, output, cli):
    (output / MANIFEST).write_bytes(text.encode("latin1"))
    r = cli("verify", "--manifest", output)
    assert r.code == 1 and "manifest:" in r.err and "Traceback" not in r.err, r.err


def test_not_an_output(tmp_path, cli):
    r = cli("verify", "--manifest", tmp_path)
    assert r.code == 2 and MANIFEST in r.err and str(tmp_path) in r.err
    r = cli("verify", "--manifest", tmp_path / "missing")
    assert r.code == 2 and "no such directory" in r.err
    (tmp_path / "f").write_text("x")
    r = cli("verify", "--manifest", tmp_path / "f")
    assert r.code == 2 and "not a directory" in r.err


def test_usage_errors(made, cli):
    r = cli("verify", TINY, made["hf"], "--manifest", made["hf"])
    assert r.code == 2 and "not both" in r.err
    r = cli("verify")
    assert r.code == 2 and "--manifest" in r.err


def test_merge_lora_outputs_carry_a_checkable_manifest(tmp_path, cli):
    """Every command that writes an output: merge-lora's manifest re-checks the same way."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32, max_position_embeddings=16)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(tmp_path / "base")
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    assert cli("merge-lora", tmp_path / "base", tmp_path / "adapter", tmp_path / "merged").code == 0
    assert cli("verify", "--manifest", tmp_path / "merged").code == 0
    (tmp_path / "merged" / "config.json").write_text("{}")
    assert cli("verify", "--manifest", tmp_path / "merged").code == 1


def test_extract_outputs_carry_a_checkable_manifest(tmp_path, cli):
    from test_faults import COMMANDS
    if "extract-visual" not in COMMANDS:
        pytest.skip("extract-visual not in this build")
    assert cli("extract-visual", TINY, tmp_path / "vis").code == 0
    assert cli("verify", "--manifest", tmp_path / "vis").code == 0


def test_verify_two_checkpoints_still_works(made, cli):
    r = cli("verify", TINY, made["hf"])
    assert r.code == 0 and "verify OK" in r.out
    r = cli("verify", TINY, made["hf"], "--no-check-finite")
    assert r.code == 0
