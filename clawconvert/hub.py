"""Hugging Face Hub: push output directories with a provenance model card; read ``hf-hub:`` sources.

Everything goes through huggingface_hub's own API (``create_repo``, ``create_branch``,
``create_commit``, ``resolve_revision``, ``snapshot_download``), so endpoints, the large-file
path (Xet or LFS), the cache layout and the environment (``HF_TOKEN``, ``HF_HOME``,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``) behave exactly as in every other Hub tool.

For commands:

* :func:`resolve_source` turns a SRC argument into a local path (downloading ``hf-hub:org/name
  [@revision]`` into the HF cache) plus provenance for the manifest;
* :func:`add_push_option` adds ``--push-to REPO_ID`` and ``--private`` to a subcommand;
  :func:`maybe_push` pushes its output directory afterwards when ``--push-to`` was given;
* :func:`push` is what ``clawconvert push`` runs; :func:`plan_push` is its local half.

Tokens are never printed, logged or written: every message that leaves this module passes
through :func:`redact`, and the card is built from the manifest only.  Hub and network
failures become one :class:`~clawconvert.errors.ClawError` line; local files are never written.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ClawError
from .modelcard import build_card
from .provenance import MANIFEST, read_manifest, sha256_file

HUB_PREFIX = "hf-hub:"
CARD = "README.md"

# Files a checkpoint needs besides its weights: configs, tokenizers, preprocessing.
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model", "*.spm", "*.tiktoken", "*.jinja", "*.yaml", "*.yml"]
# Weight files in order of preference: the first kind a repo has is the one downloaded.
WEIGHT_PATTERNS = [["*.safetensors"], ["*.npz"], ["*.bin", "*.pt", "*.pth", "*.ckpt"]]

# Never uploaded from an output directory: VCS data, hub caches, clawconvert's temporaries.
_SKIP_PARTS = (".git", "__pycache__")
_SKIP_PREFIXES = (".clawconvert-tmp-", ".DS_Store")


# --------------------------------------------------------------------------------------------
# tokens and errors


def _known_tokens() -> list[str]:
    """Token values that must never appear in output: HF_TOKEN and the stored login token.

    Read directly (environment and token file) rather than through ``get_token()``, which may
    exchange an OIDC token over the network: a dry run must contact nothing.
    """
    values = [os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    with contextlib.suppress(Exception):
        from huggingface_hub import constants

        values.append(Path(constants.HF_TOKEN_PATH).read_text())
    return [v.strip() for v in values if v and len(v.strip()) >= 4]


def redact(text: str) -> str:
    """``text`` with any known token value and any ``Bearer ...`` credential replaced by ***."""
    for token in _known_tokens():
        text = text.replace(token, "***")
    return re.sub(r"(?i)(bearer\s+)[^\s'\",)]+", r"\1***", text)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err`` and its ``__cause__`` / ``__context__`` chain (huggingface_hub wraps upload errors)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        # follow the chain Python's own traceback would show: the explicit cause, else the context
        err = err.__cause__ if err.__cause__ is not None else (  # type: ignore[assignment]
            None if err.__suppress_context__ else err.__context__)


def _explain(err: BaseException, action: str, repo_id: str, revision: str | None,
             reading: bool = False) -> str:
    """One line saying what failed and what to do, for any error a Hub call can raise."""
    import httpx2
    from huggingface_hub import constants, errors as hf

    rev = revision or "main"
    offline_kinds = (hf.OfflineModeIsEnabled, hf.RevisionResolutionError, hf.LocalEntryNotFoundError)
    if constants.is_offline_mode() and any(isinstance(c, offline_kinds) for c in _causes(err)):
        if reading:
            return (f"{action}: HF_HUB_OFFLINE is set and the local Hugging Face cache has no complete "
                    f"copy of {repo_id}@{rev}")
        return f"{action}: HF_HUB_OFFLINE is set; unset it to reach the Hub"
    for cause in _causes(err):
        if isinstance(cause, hf.RevisionNotFoundError):
            return f"{action}: revision '{rev}' does not exist in {repo_id}"
        if isinstance(cause, hf.GatedRepoError):
            return f"{action}: {repo_id} is gated: accept its conditions on the Hub, then use a token of that account"
        if isinstance(cause, hf.RepositoryNotFoundError):
            return (f"{action}: repository {repo_id} not found at {_endpoint()}, or not visible with the "
                    "current token (private repos need HF_TOKEN or `hf auth login`)")
        if isinstance(cause, hf.RemoteEntryNotFoundError):
            return f"{action}: a file is missing from {repo_id}@{rev} ({_first_line(cause.server_message)})"
        if isinstance(cause, hf.HfHubHTTPError) and _status(cause) is not None:
            code, server = _status(cause), _first_line(cause.server_message)
            if code == 401:
                how = ("the token in HF_TOKEN or from `hf auth login` was rejected" if _known_tokens()
                       else "no token found: set HF_TOKEN or run `hf auth login`")
                return f"{action}: the Hub refused the credentials (401 Unauthorized): {how}"
            if code == 403:
                return (f"{action}: permission denied (403 Forbidden{': ' + server if server else ''}); "
                        f"the token needs write access to {repo_id.split('/')[0]}")
            reason = getattr(cause.response, "reason_phrase", "") or ""
            detail = f": {server}" if server else ""
            return f"{action}: the Hub answered {code} {reason}{detail}".replace("  ", " ")
        if isinstance(cause, hf.RevisionResolutionError):
            return (f"{action}: cannot resolve revision '{rev}': the Hub cannot be reached and the local "
                    "cache has no copy of it")
        if isinstance(cause, hf.IncompleteSnapshotError):
            return (f"{action}: the cached copy of {repo_id}@{rev} is incomplete and the Hub cannot be "
                    "reached to complete it")
        if isinstance(cause, hf.LocalEntryNotFoundError):
            return (f"{action}: {repo_id}@{rev} is not in the local Hugging Face cache and the Hub cannot "
                    "be reached (check the network, HF_ENDPOINT and HF_HUB_OFFLINE)")
        if isinstance(cause, httpx2.TransportError):
            return f"{action}: cannot reach the Hub at {_endpoint()} ({cause.__class__.__name__}: {_first_line(str(cause))})"
        if isinstance(cause, hf.HFValidationError):
            return f"{action}: {_first_line(str(cause))}"
    message = f"{action}: {err.__class__.__name__}: {_first_line(str(err))}"
    if "xet" in message.lower() and "HF_HUB_DISABLE_XET" not in message:
        message += (" (this Hub endpoint does not seem to serve Xet storage: set HF_HUB_DISABLE_XET=1 "
                    "to upload large files through LFS)")
    return message


@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, revision: str | None = None, *, suffix: str = "",
                reading: bool = False) -> Iterator[None]:
    """Turn any exception from a Hub call into one redacted ClawError line.

    The original exception is not chained (``from None``): a careless server may have echoed a
    credential into it, and ``--debug`` prints chained tracebacks.
    """
    try:
        yield
    except ClawError:
        raise
    except Exception as err:  # huggingface_hub, httpx2 and OS errors: all become one line
        raise ClawError(redact(_explain(err, action, repo_id, revision, reading) + suffix)) from None


def repo_id_problem(repo_id: str) -> str | None:
    """Why ``repo_id`` cannot be pushed to (None when it can): it must be a valid 'namespace/name'."""
    from huggingface_hub.utils import validate_repo_id

    if repo_id.count("/") != 1:
        return f"the repo id must be 'namespace/name' (for example your-name/clip-vit-b-32), got '{repo_id}'"
    try:
        validate_repo_id(repo_id)
    except ValueError as err:
        return _first_line(str(err))
    return None


def _validate_repo_id(repo_id: str, what: str) -> None:
    problem = repo_id_problem(repo_id)
    if problem:
        raise ClawError(f"{what}: {problem}")


def repo_id_arg(value: str) -> str:
    """argparse ``type=`` for a push target: a bad id fails at parse time, before any work."""
    problem = repo_id_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


# --------------------------------------------------------------------------------------------
# reading sources from the Hub


def is_hub_source(src: str | os.PathLike) -> bool:
    """Whether a SRC argument names a Hub repo (``hf-hub:org/name[@revision]``)."""
    return isinstance(src, str) and src.startswith(HUB_PREFIX)


def parse_hub_source(src: str) -> tuple[str, str | None]:
    """``hf-hub:org/name@rev`` -> ``("org/name", "rev")``; the revision is None when not given."""
    body = src[len(HUB_PREFIX):] if is_hub_source(src) else src
    repo_id, _, revision = body.partition("@")
    repo_id = repo_id.strip().strip("/")
    if not repo_id:
        raise ClawError(f"'{src}': expected hf-hub:namespace/name[@revision]")
    if "@" in body and not revision:
        raise ClawError(f"'{src}': empty revision after '@'")
    from huggingface_hub.utils import validate_repo_id

    with _hub_errors(f"'{src}'", repo_id, revision):
        validate_repo_id(repo_id)
    return repo_id, revision or None


def select_checkpoint_files(files: Iterable[str]) -> list[str]:
    """The files a checkpoint needs among a repo's: configs and tokenizers, plus one kind of weights.

    Weights are taken in order of preference (safetensors, then big_vision npz, then pickles), so a
    repo that ships both ``model.safetensors`` and ``pytorch_model.bin`` downloads only the first.
    """
    files = sorted(files)
    chosen = [f for f in files if any(fnmatch(f, p) for p in CONFIG_PATTERNS)]
    for patterns in WEIGHT_PATTERNS:
        weights = [f for f in files if any(fnmatch(f, p) for p in patterns)]
        if weights:
            return chosen + weights
    return chosen


def _hub_unreachable(err: BaseException) -> bool:
    """Whether a Hub call failed because the Hub cannot be reached (offline mode, network, 5xx)."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(err, (hf.OfflineModeIsEnabled, hf.RevisionResolutionError, httpx2.TransportError)):
        return not isinstance(err, httpx2.ProxyError)   # a misconfigured proxy is not an unreachable Hub
    return isinstance(err, hf.HfHubHTTPError) and (_status(err) or 0) >= 500


def _storage_folder(repo_id: str) -> Path:
    """``models--org--name`` in the Hugging Face cache (``HF_HUB_CACHE``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE).expanduser() / repo_folder_name(repo_id=repo_id, repo_type="model")


def _cached_commit(repo_id: str, revision: str | None) -> str:
    """The commit ``revision`` names in the local cache, without the network: a sha as is, a branch
    or tag from ``refs/``; a copy of the cache with no ``refs/`` and one snapshot: that snapshot."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    rev = revision or "main"
    if REGEX_COMMIT_HASH.fullmatch(rev):
        return rev
    storage = _storage_folder(repo_id)
    ref = storage / "refs" / rev
    if ref.is_file():
        return ref.read_text().strip()
    snapshots = sorted(p.name for p in (storage / "snapshots").glob("*") if p.is_dir())
    if revision is None and len(snapshots) == 1 and not (storage / "refs").is_dir():
        return snapshots[0]
    if not snapshots:
        raise ClawError(f"the local Hugging Face cache has no copy of {repo_id}@{rev} (nothing in {storage})")
    raise ClawError(f"the local Hugging Face cache does not know which commit {repo_id}@{rev} is (no refs/{rev} in "
                    f"{storage}); it holds snapshot{'s' if len(snapshots) > 1 else ''} "
                    f"{', '.join(s[:12] for s in snapshots)}: name one with hf-hub:{repo_id}@<commit>")


def _files_on_disk(folder: Path) -> tuple[list[str], list[str]]:
    """(files present, links whose blob is missing) of a snapshot folder, as repo paths."""
    present, dangling = [], []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file():
            present.append(rel)
        elif path.is_symlink():
            dangling.append(rel)
    return present, dangling


def _missing_shards(folder: Path, present: set[str], selected: list[str]) -> list[str]:
    """Shards a selected ``*.index.json`` lists that the snapshot does not hold."""
    missing: list[str] = []
    for index in (f for f in selected if f.endswith(".index.json") and f in present):
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            shards = set(json.loads((folder / index).read_text()).get("weight_map", {}).values())
            base = index.rpartition("/")[0]
            missing += sorted(f"{base}/{s}" if base else s for s in shards
                              if (f"{base}/{s}" if base else s) not in present)
    return missing


def _from_cache(repo_id: str, revision: str | None, commit: str | None,
                allow_patterns: list[str] | None) -> tuple[Path, str]:
    """The snapshot folder of ``repo_id@revision`` served from the local cache alone, and its commit.

    The files come from the cached tree listing when huggingface_hub 2.x wrote one, else from
    the snapshot folder itself (``hf_hub_download``, ``from_pretrained``, open_clip and older
    huggingface_hub write none; neither does a copy made by hand).  What the checkpoint needs
    and the cache lacks is named: files of the listing, shards of an index, links to missing
    blobs, or weights never downloaded.
    """
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.utils import filter_repo_objects

    commit = commit or _cached_commit(repo_id, revision)
    folder = _storage_folder(repo_id) / "snapshots" / commit
    if not folder.is_dir():
        raise ClawError(f"the local Hugging Face cache has no copy of {repo_id}@{revision or 'main'} "
                        f"(no snapshot of commit {commit[:12]} in {folder.parent})")
    present, dangling = _files_on_disk(folder)
    listing = present + dangling
    with contextlib.suppress(Exception):   # huggingface_hub 2.x: the repo's own file list at that commit
        listing = [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
    if allow_patterns is None:
        wanted = select_checkpoint_files(listing)
    else:
        wanted = list(filter_repo_objects(listing, allow_patterns=allow_patterns))
    have = set(present)
    missing = [f for f in wanted if f not in have] + _missing_shards(folder, have, wanted)
    weights = [f for f in wanted if any(fnmatch(f, p) for kind in WEIGHT_PATTERNS for p in kind)]
    if allow_patterns is None and not weights:
        missing.append("the weights (*.safetensors, *.npz or a torch pickle)")
    if missing:
        held = f"; it holds {', '.join(present[:8])}{' ...' if len(present) > 8 else ''}" if present else ""
        raise ClawError(f"the cached snapshot of {repo_id}@{revision or 'main'} "
                        f"(commit {commit[:12]}) lacks {', '.join(missing[:4])}"
                        f"{f' and {len(missing) - 4} more' if len(missing) > 4 else ''}{held}",
                        details=[f"missing: {m}" for m in missing] if len(missing) > 4 else [])
    return folder, commit


def resolve_source(src: str, allow_patterns: list[str] | None = None) -> tuple[Path, dict[str, str]]:
    """A local path for SRC, and its Hub provenance.

    A local SRC comes back as ``(Path(src), {})``.  ``hf-hub:org/name[@revision]`` is resolved to
    a commit and downloaded with ``snapshot_download`` into the normal Hugging Face cache
    (``HF_HOME`` / ``HF_HUB_CACHE``), and comes back as ``(snapshot_dir, {"hub_repo": "org/name",
    "hub_revision": "<commit sha>"})``.  With ``HF_HUB_OFFLINE=1``, or when the Hub cannot be
    reached, it is served from the cache alone (:func:`_from_cache`), whichever tool filled it.

    ``allow_patterns`` are the glob patterns of the files the command needs.  When None, the
    checkpoint's files are chosen from the repo listing (:func:`select_checkpoint_files`):
    configs and tokenizers plus one kind of weights; pass ``["*"]`` to download everything.
    """
    if not is_hub_source(src):
        return Path(src).expanduser(), {}
    repo_id, revision = parse_hub_source(src)
    from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    api = HfApi(library_name="clawconvert", library_version=__version__)
    action = f"cannot read {src}"
    with _hub_errors(action, repo_id, revision, reading=True):
        commit, listing = None, None
        if not constants.is_offline_mode():
            try:
                commit = api.resolve_revision(repo_id, revision=revision).resolved
                with contextlib.suppress(Exception):
                    listing = [f.path for f in get_cached_repo_tree(repo_id, revision=commit)]
                if listing is None:   # one request: list_repo_files retries for 23 s when the Hub is down
                    listing = [f.rfilename for f in api.repo_info(repo_id, revision=commit).siblings or []]
            except Exception as err:
                if not _hub_unreachable(err):
                    raise
        if listing is None:   # offline, or the Hub is unreachable: the local cache, whoever filled it
            try:
                folder, commit = _from_cache(repo_id, revision, commit, allow_patterns)
            except ClawError as err:
                why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the Hub cannot be reached"
                raise ClawError(f"{action}: {why} and {err}", err.details) from None
            return folder, {"hub_repo": repo_id, "hub_revision": commit}
        patterns = allow_patterns
        if patterns is None:
            selected = select_checkpoint_files(listing)
            if not selected:
                raise ClawError(f"{action}: {repo_id}@{commit[:12]} has no checkpoint files (configs, "
                                f"safetensors, npz or pickles); it holds: {', '.join(sorted(listing)[:12])}")
            patterns = [glob.escape(f) for f in selected]
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=patterns,
                                        library_name="clawconvert", library_version=__version__))
    present = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()] \
        if folder.is_dir() else []
    if not list(filter_repo_objects(present, allow_patterns=patterns)):
        raise ClawError(f"{action}: no file of {repo_id}@{commit[:12]} matches {', '.join(patterns)}")
    return folder, {"hub_repo": repo_id, "hub_revision": commit}


# --------------------------------------------------------------------------------------------
# pushing


@dataclass(frozen=True)
class PlannedFile:
    """One file of a push: where it goes in the repo and where its bytes come from."""

    path_in_repo: str
    size: int
    sha256: str
    local: Path | None  # None: generated in memory (the model card)
    note: str = ""


@dataclass
class PushPlan:
    """Everything a push would upload, decided locally (no network)."""

    out_dir: Path
    repo_id: str
    revision: str | None
    files: list[PlannedFile]
    card: str | None  # the generated README.md, None when the directory has its own
    manifest: dict[str, Any] | None

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_url: str
    commit_oid: str
    pr_url: str | None = None
    files: list[str] = field(default_factory=list)


def _skipped(rel: Path) -> bool:
    parts = rel.parts
    return (any(p in _SKIP_PARTS for p in parts) or any(p.startswith(_SKIP_PREFIXES) for p in parts)
            or rel.as_posix().startswith(".cache/huggingface"))


def _read_manifest(out_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = read_manifest(out_dir)
    except (ValueError, OSError) as err:
        raise ClawError(f"{out_dir / MANIFEST} is unreadable ({err}); re-run the command that made "
                        f"{out_dir}") from None
    if manifest is not None and not isinstance(manifest, dict):
        raise ClawError(f"{out_dir / MANIFEST} is not a JSON object; re-run the command that made {out_dir}")
    return manifest


def _architectures(out_dir: Path) -> list[str]:
    """``architectures`` of the output's transformers config.json, when there is a readable one."""
    try:
        value = json.loads((out_dir / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return []
    return [a for a in value if isinstance(a, str)] if isinstance(value, list) else []


def plan_push(out_dir: str | os.PathLike, repo_id: str, *, revision: str | None = None) -> PushPlan:
    """Decide what pushing ``out_dir`` to ``repo_id`` uploads, without touching the network.

    Every file is hashed once and checked against ``clawconvert_manifest.json``: a file the
    manifest lists that is missing or changed stops the push (the card would describe other
    bytes).  Files the manifest does not list are uploaded and marked as such.  ``README.md``
    is generated from the manifest unless the directory already has one.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ClawError(f"{out_dir}: not a directory (push uploads a directory written by clawconvert)")
    _validate_repo_id(repo_id, f"cannot push to '{repo_id}'")
    manifest = _read_manifest(out_dir)
    recorded = manifest.get("files") if manifest else None
    recorded = recorded if isinstance(recorded, dict) else {}

    files: list[PlannedFile] = []
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if not path.is_file() or _skipped(rel):
            continue
        name = rel.as_posix()
        digest = sha256_file(path)
        note = ""
        if name == MANIFEST:
            note = "provenance manifest"
        elif name == CARD:
            note = "your model card, kept as is"
        elif manifest is not None and name not in recorded:
            note = "not listed in the manifest"
        files.append(PlannedFile(name, path.stat().st_size, digest, path, note))

    present = {f.path_in_repo: f.sha256 for f in files}
    missing = sorted(p for p in recorded if p not in present)
    changed = sorted(p for p, h in recorded.items() if p in present and present[p] != h)
    if missing or changed:
        raise ClawError(
            f"{out_dir} no longer matches its {MANIFEST}: {len(missing)} file(s) missing, "
            f"{len(changed)} changed since it was written; re-run the command that made it",
            [f"missing: {p}" for p in missing] + [f"changed: {p}" for p in changed])
    if not files:
        raise ClawError(f"{out_dir}: nothing to push (the directory is empty)")

    card = None
    if CARD not in present:
        card = redact(build_card(manifest, repo_id, [f.path_in_repo for f in files] + [CARD],
                                 _architectures(out_dir)))
        data = card.encode()
        files.append(PlannedFile(CARD, len(data), hashlib.sha256(data).hexdigest(), None,
                                 "model card, written by clawconvert"))
        files.sort(key=lambda f: f.path_in_repo)
    return PushPlan(out_dir, repo_id, revision, files, card, manifest)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"  # pragma: no cover


def describe_plan(plan: PushPlan, *, create_pr: bool = False) -> str:
    """The file list a push prints (and a dry run prints before the card)."""
    where = f"a pull request against {plan.revision or 'main'}" if create_pr else f"branch {plan.revision or 'main'}"
    width = max(len(f.path_in_repo) for f in plan.files)
    lines = [f"{plan.out_dir} -> {plan.repo_id} ({where}) at {_endpoint()}"]
    for f in plan.files:
        note = f"  {f.note}" if f.note else ""
        lines.append(f"  {f.path_in_repo:<{width}}  {_human(f.size):>9}{note}")
    lines.append(f"{len(plan.files)} files, {_human(plan.total_size)}")
    return "\n".join(lines)


def _default_message(plan: PushPlan) -> str:
    command = (plan.manifest or {}).get("command")
    if isinstance(command, str) and command.strip():
        return redact(f"Upload output of `{command.strip()}` (clawconvert {__version__})")[:200]
    return f"Upload {plan.out_dir.name} with clawconvert {__version__}"


@contextlib.contextmanager
def _quiet_hub(quiet: bool) -> Iterator[None]:
    """With ``quiet``: no huggingface_hub progress bars or warnings, restored afterwards."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars, logging as hf_logging)

    bars_were_off, verbosity = are_progress_bars_disabled(), hf_logging.get_verbosity()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if not bars_were_off:
            enable_progress_bars()


def push(out_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         commit_message: str | None = None, create_pr: bool = False, dry_run: bool = False,
         quiet: bool = False, echo: Callable[[str], None] | None = None) -> PushResult | None:
    """Push ``out_dir`` to ``repo_id`` as one commit, with a model card; None for a dry run.

    Creates the repo when missing (``private`` applies only then) and the branch ``revision``
    when missing, unless ``create_pr``, which opens a pull request against ``revision`` (or
    main) instead of committing to it.  The commit is atomic: if anything fails, nothing is
    committed, and the local directory is never written to.  ``echo`` receives the report
    lines (default: print to stdout).
    """
    say = echo or (lambda line: print(line, flush=True))
    plan = plan_push(out_dir, repo_id, revision=revision)
    say(describe_plan(plan, create_pr=create_pr))
    if dry_run:
        if plan.card is not None:
            say(f"----- {CARD} (model card that would be written) -----")
            say(plan.card.rstrip("\n"))
            say(f"----- end of {CARD} -----")
        else:
            say(f"{CARD}: the directory's own model card is uploaded unchanged")
        say("dry run: nothing was sent to the Hub")
        return None

    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(library_name="clawconvert", library_version=__version__)
    action = f"cannot push to {repo_id}"
    operations = []
    for f in plan.files:
        op = CommitOperationAdd(path_in_repo=f.path_in_repo,
                                path_or_fileobj=str(f.local) if f.local is not None else plan.card.encode())
        op.upload_info.sha256 = bytes.fromhex(f.sha256)  # hashed once already, by plan_push
        operations.append(op)
    with _quiet_hub(quiet):
        with _hub_errors(action, repo_id, revision):
            api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision and not create_pr:
            with _hub_errors(action, repo_id, revision):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        with _hub_errors(action, repo_id, revision, suffix="; nothing was committed"):
            info = api.create_commit(repo_id, operations, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or _default_message(plan))
    result = PushResult(repo_id, revision or "main", str(info.commit_url), str(info.oid), info.pr_url,
                        [f.path_in_repo for f in plan.files])
    if result.pr_url:
        say(f"opened pull request {result.pr_url} (commit {result.commit_oid[:12]})")
    else:
        say(f"pushed to {repo_id}@{result.revision}: {result.commit_url}")
    return result


# --------------------------------------------------------------------------------------------
# --push-to on other commands


def add_push_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--push-to REPO_ID`` and ``--private`` (a "hub" option group) to a subcommand."""
    g = parser.add_argument_group("hub")
    g.add_argument("--push-to", metavar="REPO_ID", default=None, type=repo_id_arg,
                   help="after success, push the output directory to this Hugging Face Hub repo "
                        "(namespace/name) with a provenance model card; token from HF_TOKEN or "
                        "`hf auth login` (see `clawconvert push --help`)")
    g.add_argument("--private", action="store_true",
                   help="with --push-to: create the repo as private (an existing repo keeps its visibility)")


def maybe_push(args: argparse.Namespace, out_dir: Path) -> None:
    """Push ``out_dir`` when the command was given ``--push-to``; otherwise do nothing.

    Call it after the output directory and its manifest are complete.  Failures raise
    ClawError; the output directory stays as written either way.
    """
    repo_id = getattr(args, "push_to", None)
    if not repo_id:
        return
    push(out_dir, repo_id, private=bool(getattr(args, "private", False)),
         quiet=bool(getattr(args, "quiet", False)))
