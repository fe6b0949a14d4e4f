"""Start-up: a command costs little more than the interpreter and numpy.

``clawconvert inspect`` on the fixture reads two small files; it must stay within 3x
``python -c "import numpy"`` measured in the same run (issue 18).  Both run alternately, several
times, and the medians are compared, so a busy machine slows both alike.  Modules are
byte-compiled first (into a temporary ``PYTHONPYCACHEPREFIX``), as an installed wheel is.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
RUNS = 7
LIMIT = 3.0


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp_path / "pycache")
    return env


def _command() -> list[str]:
    script = Path(sys.executable).parent / "clawconvert"   # the console script an install puts beside python
    return [str(script)] if script.is_file() else [sys.executable, "-m", "clawconvert"]


def _seconds(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)
    return time.perf_counter() - start


def test_inspect_costs_at_most_three_times_importing_numpy(tmp_path):
    env = _env(tmp_path)
    numpy_cmd = [sys.executable, "-c", "import numpy"]
    inspect_cmd = _command() + ["inspect", str(FIX / "openclip_tiny")]
    _seconds(inspect_cmd, env)   # writes the byte code
    numpy_s, inspect_s = [], []
    for _ in range(RUNS):
        numpy_s.append(_seconds(numpy_cmd, env))
        inspect_s.append(_seconds(inspect_cmd, env))
    ratio = statistics.median(inspect_s) / statistics.median(numpy_s)
    assert ratio <= LIMIT, (f"inspect took {statistics.median(inspect_s):.3f} s, {ratio:.2f}x "
                            f"`import numpy` ({statistics.median(numpy_s):.3f} s); medians of {RUNS}")


IMPORTED = """
import json, sys
from clawconvert.cli import main
code = main(json.loads(sys.argv[1]))
print(json.dumps([code, "ml_dtypes" in sys.modules]))
"""


def _imports_ml_dtypes(*argv) -> bool:
    res = subprocess.run([sys.executable, "-c", IMPORTED, json.dumps([str(a) for a in argv])],
                         capture_output=True, text=True, cwd=ROOT)
    code, imported = json.loads(res.stdout.strip().splitlines()[-1])
    assert code == 0, res.stderr[-2000:]
    return imported


def test_ml_dtypes_is_imported_only_for_bfloat16_or_float8(tmp_path):
    assert not _imports_ml_dtypes("inspect", FIX / "openclip_tiny")
    assert not _imports_ml_dtypes("convert", FIX / "openclip_tiny", tmp_path / "fp16", "--to", "hf", "--dtype", "fp16")
    assert _imports_ml_dtypes("convert", FIX / "openclip_tiny", tmp_path / "bf16", "--to", "hf", "--dtype", "bf16")


def test_clip_bpe_files_are_built_once_and_equal_a_fresh_build(tmp_path, monkeypatch):
    from clawconvert.families.clip import BPE_FILES, build_clip_bpe_files, write_clip_tokenizer

    fresh, first, second, uncached = (tmp_path / n for n in ("fresh", "first", "second", "uncached"))
    for d in (fresh, first, second, uncached):
        d.mkdir()
    build_clip_bpe_files(fresh)
    monkeypatch.setenv("CLAWCONVERT_CACHE", str(tmp_path / "cache"))
    write_clip_tokenizer(first, 77)
    assert [p.name for p in (tmp_path / "cache").iterdir()][0].startswith("clip-bpe-")
    start = time.perf_counter()
    write_clip_tokenizer(second, 77)
    assert time.perf_counter() - start < 0.1   # copies, no build (about 0.2 s)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("CLAWCONVERT_CACHE", str(tmp_path / "not-a-folder"))   # unwritable: built in place
    write_clip_tokenizer(uncached, 77)
    for name in BPE_FILES:
        want = (fresh / name).read_bytes()
        assert all((d / name).read_bytes() == want for d in (first, second, uncached)), name
