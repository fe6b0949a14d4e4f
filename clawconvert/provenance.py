"""The manifest every output directory carries: what made it, from what, and file hashes.

``clawconvert_manifest.json`` records the tool version, the command line, the source's
identity (path or hub id, format, family, fingerprint), the mapping tables used (name and
sha256), the output dtype, verification figures when ``--verify`` ran, and the sha256 of
every other file in the directory.  The hub model card is written from it and
``clawconvert verify --manifest DIR`` re-checks it.
"""
from __future__ import annotations

import contextvars
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import __version__

MANIFEST = "clawconvert_manifest.json"

# the command line being run, set by the CLI (``main(argv)`` may be called in-process, where
# sys.argv is the host program's); None when called through the Python API
COMMAND_LINE: contextvars.ContextVar[str | None] = contextvars.ContextVar("clawconvert_command_line", default=None)


def _command_line() -> str:
    line = COMMAND_LINE.get()
    if line is not None:
        return line
    return "python API (" + " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:200] + ")"


# sha256 computed while a file was written (the safetensors writer hashes as it goes), keyed
# by the file's identity so that a file changed since is hashed again
_KNOWN_HASHES: dict[tuple[str, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int]:
    st = os.stat(path)
    return (str(Path(path).absolute()), st.st_size, st.st_mtime_ns, st.st_ino)


def remember_hash(path: Path, digest: str) -> None:
    _KNOWN_HASHES[_identity(path)] = digest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    known = _KNOWN_HASHES.get(_identity(path))
    if known is not None:
        return known
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(path: Path) -> str:
    """A cheap identity of a source: names, sizes and the first/last MiB of each file.

    Hashing a multi-GB checkpoint in full would double the cost of a conversion; this catches
    any re-save, truncation or header edit while reading at most 2 MiB per file.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def write_manifest(out_dir: Path, record: dict[str, Any]) -> Path:
    """Write the manifest last, covering every file already in ``out_dir``."""
    out_dir = Path(out_dir)
    files = {str(p.relative_to(out_dir)): sha256_file(p)
             for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {
        "tool": "clawconvert",
        "version": __version__,
        "command": record.pop("command", None) or _command_line(),
        **record,
        "files": files,
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())
