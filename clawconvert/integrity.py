"""Re-checking an output against its manifest, and scanning weights for NaN / Inf.

:func:`check_manifest` is what ``clawconvert verify --manifest DIR`` runs: every file the
manifest lists is hashed again (sha256) and compared; files that appeared since, files that
are gone and files whose bytes changed are reported.  A manifest that is not the one
clawconvert writes (bad JSON, a path leaving the directory, a malformed hash) is itself a
finding, never a crash.

:func:`nonfinite_in_dir` opens every weights file an output holds (safetensors, sharded
indexes, ``.npz``; never pickles) and lists tensors holding NaN or Inf.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ClawError
from .provenance import MANIFEST, sha256_file

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class ManifestReport:
    directory: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    intact: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)      # problems with the manifest itself

    @property
    def ok(self) -> bool:
        return not (self.changed or self.added or self.removed or self.invalid)

    def problems(self) -> list[str]:
        return ([f"manifest: {p}" for p in self.invalid] + [f"changed: {p}" for p in self.changed]
                + [f"added (not in the manifest): {p}" for p in self.added]
                + [f"removed (listed in the manifest, missing): {p}" for p in self.removed])

    def summary(self) -> str:
        if self.ok:
            src = (self.manifest.get("source") or {}) if isinstance(self.manifest.get("source"), dict) else {}
            origin = f" from {src['path']}" if isinstance(src.get("path"), str) else ""
            return (f"manifest OK: {self.directory}: {len(self.intact)} files intact (sha256), written by "
                    f"clawconvert {self.manifest.get('version', '?')}{origin}")
        counts = [f"{len(v)} {k}" for k, v in (("changed", self.changed), ("added", self.added),
                                               ("removed", self.removed)) if v]
        if self.invalid:
            counts.insert(0, "the manifest itself is not valid")
        return f"{self.directory}: does not match its manifest: {', '.join(counts)}"


def _files_on_disk(directory: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for f in sorted(files):
            rel = (Path(root) / f).relative_to(directory).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return out


def check_manifest(directory: str | os.PathLike) -> ManifestReport:
    """Hash every file again and compare with ``clawconvert_manifest.json``."""
    directory = Path(directory)
    if not directory.exists():
        raise ClawError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise ClawError(f"{directory}: not a directory (verify --manifest takes an output directory)")
    path = directory / MANIFEST
    if not path.exists():
        raise ClawError(f"{directory}: no {MANIFEST} (not a clawconvert output, or its manifest was removed)")
    report = ManifestReport(directory)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError:
        manifest = None
        report.invalid.append(f"{MANIFEST} is not valid JSON (nested too deeply)")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        manifest = None
        report.invalid.append(f"{MANIFEST} cannot be read as JSON ({str(e).splitlines()[0][:120]})")
    if manifest is not None and not isinstance(manifest, dict):
        report.invalid.append(f"{MANIFEST} is not a JSON object")
        manifest = None
    files = manifest.get("files") if manifest else None
    if manifest is not None and not isinstance(files, dict):
        report.invalid.append(f"{MANIFEST} has no 'files' table")
        files = None
    report.manifest = manifest or {}
    on_disk = _files_on_disk(directory)
    if files is None:
        report.added = on_disk  # nothing is vouched for
        return report
    listed: set[str] = set()
    for rel, digest in files.items():
        shown = rel[:200]
        norm = os.path.normpath(rel) if rel else ""
        if (not rel or "\0" in rel or os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep)
                or norm == MANIFEST or "\\" in rel):
            report.invalid.append(f"lists '{shown}', which is not a file inside the directory")
            continue
        if not isinstance(digest, str) or not _HEX64.match(digest):
            report.invalid.append(f"lists '{shown}' with a malformed sha256 ({str(digest)[:80]!r})")
            listed.add(Path(norm).as_posix())
            continue
        rel_posix = Path(norm).as_posix()
        listed.add(rel_posix)
        p = directory / norm
        if not p.is_file():
            report.removed.append(shown)
            continue
        try:
            now = sha256_file(p)
        except OSError as e:
            report.changed.append(f"{shown} (cannot be read: {e.strerror or e})")
            continue
        if now == digest:
            report.intact.append(shown)
        else:
            report.changed.append(f"{shown} (sha256 {digest[:12]}... recorded, {now[:12]}... now)")
    report.added = [f for f in on_disk if f not in listed]
    return report


WEIGHT_SUFFIXES = (".safetensors", ".npz")


def nonfinite_in_dir(directory: Path, names: list[str] | None = None) -> list[str]:
    """One line per tensor holding NaN/Inf in the weights files of an output directory."""
    from .io.readers import READERS, scan_nonfinite

    directory = Path(directory)
    names = names if names is not None else _files_on_disk(directory)
    problems = []
    for rel in names:
        if not rel.endswith(WEIGHT_SUFFIXES):
            continue
        p = directory / rel
        if not p.is_file():
            continue
        with READERS[p.suffix.lower()](p) as store:
            problems += scan_nonfinite(store)
    return problems


# ------------------------------------------------------------------------------------
# a config read from a file must describe a buildable model before anything is built from it
# ------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else e.__class__.__name__)[:200]


def check_config(family: Any, config: Any, store: Any, origin: Path | str) -> None:
    """Refuse (naming ``origin``) a config that cannot describe the weights in ``store``.

    * a layer count above the number of tensors can only be corruption (and building the
      model's shapes would loop over it);
    * the family's canonical shapes must build from the config (transformers raises
      ZeroDivisionError, KeyError, TypeError ... on nonsense values: those become one line).
    """
    n = len(store)

    def walk(d: dict, where: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{where}{k}.")
            elif (isinstance(k, str) and k.endswith("layers") and isinstance(v, int) and not isinstance(v, bool)
                  and (v < 0 or v > max(n, 1))):
                raise ClawError(f"{origin}: {where}{k} = {v}, but the weights hold {n} tensors in all")

    try:
        data = config.to_dict()
    except Exception as e:
        raise ClawError(f"{origin}: not a usable {family.name} config ({e.__class__.__name__}: {_first_line(e)})") from e
    walk(data, "")
    try:
        family.canonical_shapes(config)   # formulas over the config: no transformers (nor its warnings)
    except ClawError as e:
        raise (e if str(origin) in str(e) else ClawError(f"{origin}: {e}", e.details)) from e
    except Exception as e:  # transformers' constructors on nonsense values
        raise ClawError(f"{origin}: the config describes no buildable {family.name} model "
                        f"({e.__class__.__name__}: {_first_line(e)})") from e
