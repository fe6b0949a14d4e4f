"""A config that contradicts the weights is diagnosed: the first line names the config fields
that disagree, in the source's own spelling, with the sizes inferred from the weights; a few
example tensors follow, and ``--debug`` lists them all."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from clawconvert.diagnosis import contradicted_fields
from clawconvert.engine import EXAMPLES
from clawconvert.hfconfig import Field
from conftest import assert_one_line_error

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "openclip_tiny"


@pytest.fixture
def src(tmp_path) -> Path:
    d = tmp_path / "src"
    shutil.copytree(FIX, d)
    return d


def _edit_config(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _lines(err: str) -> list[str]:
    return err.strip().splitlines()


def test_wrong_openclip_width_is_named_in_the_first_line(src, tmp_path, cli):
    _edit_config(src / "open_clip_config.json", lambda c: c["model_cfg"]["vision_cfg"].update(width=64))
    r = cli("convert", src, tmp_path / "out", "--to", "hf")
    assert_one_line_error(r)
    lines = _lines(r.err)
    # heads are not in the shapes: the width is what the weights need changed, head_width stays
    assert lines[0].endswith(": vision_cfg.width is 64 but the weights say 32 (40 tensors)"), lines[0]
    assert len(lines) == 1 + EXAMPLES + 1 and "--debug lists them all" in lines[-1]
    assert all("shape contradicts the config" in line for line in lines[1:-1])
    assert not (tmp_path / "out").exists()

    full = cli("convert", src, tmp_path / "out", "--to", "hf", "--debug")
    detail = [line for line in _lines(full.err) if line.startswith("  - ")]
    assert len(detail) == 40 and not any("more" in line for line in detail)


def test_several_fields_and_the_sizes_the_weights_give(src, tmp_path, cli):
    def edit(c):
        c["model_cfg"]["embed_dim"] = 16
        c["model_cfg"]["vision_cfg"]["mlp_ratio"] = 4.0
        c["model_cfg"]["text_cfg"]["vocab_size"] = 1000
    _edit_config(src / "open_clip_config.json", edit)
    r = cli("convert", src, tmp_path / "out", "--to", "hf")
    assert_one_line_error(r, "embed_dim is 16 but the weights say 24 (2 tensors)",
                          "vision_cfg.mlp_ratio is 4.0 but the weights say 2.0 (6 tensors)",
                          "text_cfg.vocab_size is 1000 but the weights say 49408 (1 tensor)")


def test_hf_config_fields_are_named_as_config_json_spells_them(tmp_path, cli):
    assert cli("convert", FIX, tmp_path / "hf", "--to", "hf").code == 0
    def edit(c):
        c["vision_config"]["hidden_size"] = 64
        c["text_config"]["intermediate_size"] = 48
    _edit_config(tmp_path / "hf" / "config.json", edit)
    r = cli("extract-text", tmp_path / "hf", tmp_path / "text")   # the diagnosis covers every planner user
    assert_one_line_error(r, "text_config.intermediate_size is 48 but the weights say 32 (6 tensors)")
    assert "vision_config" not in _lines(r.err)[0]   # the text tower alone is read
    r = cli("convert", tmp_path / "hf", tmp_path / "oc", "--to", "openclip")
    assert_one_line_error(r, "text_config.intermediate_size is 48 but the weights say 32 (6 tensors)",
                          "vision_config.hidden_size is 64 but the weights say 32 (38 tensors)")


def test_one_odd_tensor_is_that_tensors_problem_not_the_configs(src, tmp_path, cli):
    weights = load_file(str(src / "open_clip_model.safetensors"))
    weights["visual.proj"] = weights["visual.proj"][:, :20].copy()   # text_projection still says 24
    weights["visual.positional_embedding"] = weights["visual.positional_embedding"][:16].copy()  # grid^2+1: no field
    save_file(weights, str(src / "open_clip_model.safetensors"))
    r = cli("convert", src, tmp_path / "out", "--to", "hf")
    assert_one_line_error(r, "2 shape contradicts the config", "visual.proj", "visual.positional_embedding")
    assert " is 24 but" not in r.err


def test_contradicted_fields_takes_the_size_most_tensors_give():
    w = Field(64, "vision_config.hidden_size")
    shapes = [("a", (32,), (w,)), ("b", (32, 8), (w, 8)), ("c", (64,), (w,)), ("d", (7,), (7,))]
    assert contradicted_fields(shapes) == {"vision_config.hidden_size": (64, 32, ["a", "b"])}
    assert contradicted_fields(shapes[1:]) == {}   # one against one: the config stands
