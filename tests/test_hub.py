"""Hub push and ``hf-hub:`` sources, against the loopback Hub of ``hub_server.py``.

Each test gets a fresh FakeHub, a private HF_HOME (cache, token file) and HF_ENDPOINT pointed at
the fake; huggingface_hub reads some settings at import, so the fixture patches
``huggingface_hub.constants`` too and restores everything afterwards.
"""
from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from clawconvert import __version__
from clawconvert.cli import main
from clawconvert.errors import ClawError
from clawconvert.hub import plan_push, push, resolve_source, select_checkpoint_files
from clawconvert.modelcard import build_card
from clawconvert.provenance import MANIFEST, write_manifest
from hub_server import FakeHub

GOOD_TOKEN = "hf_goodTokenValue1234567890"
BAD_TOKEN = "hf_wrongTokenValue0987654321"
REPO_ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# fixtures and helpers


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Make huggingface_hub talk to ``url`` and keep everything under ``home``."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    cache = home / "hub"
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(cache),
           "HF_TOKEN_PATH": str(home / "token"), "HF_HUB_DISABLE_XET": "1", "NO_PROXY": "127.0.0.1,localhost"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    patched = {
        "ENDPOINT": url,
        "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache),
        "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_TOKEN_PATH": str(home / "token"),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "HF_XET_CACHE": str(home / "xet"),
        # hf_xet is installed, and huggingface_hub 2.x then uploads LFS files through Xet, a
        # choice made client-side only: the fake Hub speaks the classic LFS protocol instead.
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    _http.close_session()  # a fresh client: no pooled connection to an earlier test's server


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A running FakeHub where GOOD_TOKEN (the HF_TOKEN) may write to 'alice' and 'org'."""
    from huggingface_hub.utils import _http

    server = FakeHub({GOOD_TOKEN: ["alice", "org"]}).start()
    _point_hub_at(monkeypatch, server.url, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    yield server
    server.stop()
    _http.close_session()


def _manifest(**overrides) -> dict:
    record = {
        "command": "clawconvert convert hf-hub:laion/tiny-clip out/hf --to hf --verify",
        "source": {"path": "hf-hub:laion/tiny-clip", "format": "openclip", "family": "clip",
                   "fingerprint": "f" * 64, "hub_repo": "laion/tiny-clip", "hub_revision": "a" * 40},
        "target": {"format": "hf", "family": "clip", "classes": ["CLIPModel"]},
        "tables": [{"name": "clip/openclip", "sha256": "1" * 64}, {"name": "clip/hf", "sha256": "2" * 64}],
        "dtype": "fp32",
        "verify": {"passed": True, "max_abs_diff": 3.2e-7, "tolerance": 1e-4,
                   "image_embeds": {"cosine_min": 0.9999998}},
        "license": "mit",
    }
    record.update(overrides)
    return record


def make_output(path: Path, *, big: int = 0, **manifest) -> Path:
    """A small directory shaped like a clawconvert output: weights, configs, manifest."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = {"text_projection.weight": rng.standard_normal((24, 16)).astype(np.float32),
               "visual_projection.weight": rng.standard_normal((24, 32)).astype(np.float32)}
    if big:
        tensors["blob"] = rng.integers(0, 255, size=big, dtype=np.uint8)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "clip", "architectures": ["CLIPModel"]}))
    (path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    write_manifest(path, _manifest(**manifest))
    return path


def snapshot(path: Path) -> dict[str, tuple[str, float]]:
    """Every file under ``path`` with its sha256 and mtime: proof that nothing local changed."""
    return {str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime)
            for p in sorted(path.rglob("*")) if p.is_file()}


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_error_line(err: str, *needles: str) -> str:
    """stderr holds exactly one line, the clawconvert error, and it says what went wrong.

    huggingface_hub's progress bars (``name: 40%|####  | ...``, redrawn with carriage returns)
    are not messages and are left out of the count.
    """
    lines = [line for line in re.split(r"[\r\n]+", err)
             if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("clawconvert: error: "), lines[0]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


# --------------------------------------------------------------------------------------------
# push


def test_push_then_read_back_through_hf_hub_is_byte_identical(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    before = snapshot(out)

    rc, stdout, err = run_cli(capsys, "push", out, "alice/tiny-clip-hf", "--quiet")

    assert rc == 0, err
    assert "pushed to alice/tiny-clip-hf@main" in stdout
    assert snapshot(out) == before, "push must not write into the output directory"
    assert not (out / "README.md").exists()
    remote = hub.files("alice/tiny-clip-hf")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", MANIFEST, "README.md"} <= set(remote)
    assert hub.is_lfs("alice/tiny-clip-hf", "model.safetensors")  # went through the LFS batch path
    assert not hub.is_lfs("alice/tiny-clip-hf", "config.json")  # inline base64 in the commit

    path, info = resolve_source("hf-hub:alice/tiny-clip-hf", allow_patterns=["*"])
    assert info == {"hub_repo": "alice/tiny-clip-hf", "hub_revision": hub.head("alice/tiny-clip-hf")}
    assert path.is_relative_to(tmp_path / "hf_home" / "hub"), "downloads go to the HF cache of HF_HOME"
    for name in before:
        assert (path / name).read_bytes() == (out / name).read_bytes(), name
    assert (path / "README.md").read_bytes() == remote["README.md"]

    # pushing the same directory again changes nothing on the Hub
    head = hub.head("alice/tiny-clip-hf")
    assert run_cli(capsys, "push", out, "alice/tiny-clip-hf", "--quiet")[0] == 0
    assert hub.head("alice/tiny-clip-hf") == head


def test_model_card_carries_front_matter_and_provenance(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    assert run_cli(capsys, "push", out, "alice/card", "--quiet")[0] == 0
    card = hub.files("alice/card")["README.md"].decode()

    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "laion/tiny-clip"
    assert {"clawconvert", "clip", "openclip"} <= set(meta["tags"])
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    assert meta["license"] == "mit"
    assert "`hf-hub:laion/tiny-clip` at revision `" + "a" * 40 + "`" in card
    assert "| Source format | openclip |" in card
    assert "| `clip/openclip` | `" + "1" * 64 + "` |" in card
    assert f"| clawconvert version | {__version__} |" in card
    assert "| dtype | fp32 |" in card
    assert "| max_abs_diff | 3.2e-07 |" in card and "| image_embeds.cosine_min | 0.9999998 |" in card
    assert 'CLIPModel.from_pretrained("alice/card")' in card
    assert 'AutoProcessor.from_pretrained("alice/card")' in card
    manifest_hashes = json.loads((out / MANIFEST).read_text())["files"]
    for name, digest in manifest_hashes.items():
        assert f"| `{name}` | `{digest}` |" in card
    assert GOOD_TOKEN not in card


def test_dry_run_lists_files_prints_card_and_contacts_nothing(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    before = snapshot(out)

    rc, stdout, err = run_cli(capsys, "push", out, "alice/dry", "--dry-run")

    assert rc == 0, err
    assert hub.requests == [], "a dry run must not contact the Hub"
    assert "alice/dry" not in hub.repos
    assert snapshot(out) == before
    for name in ["README.md", "config.json", "model.safetensors", "preprocessor_config.json", MANIFEST]:
        assert re.search(rf"^  {re.escape(name)} ", stdout, re.M), name
    assert "5 files" in stdout
    assert "library_name: transformers" in stdout and "## Provenance" in stdout
    assert "dry run: nothing was sent to the Hub" in stdout
    # the card printed is the card that a real push uploads
    plan = plan_push(out, "alice/dry")
    assert plan.card is not None and plan.card.rstrip("\n") in stdout


def test_existing_readme_is_uploaded_unchanged(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n# my own card\n")
    assert run_cli(capsys, "push", out, "alice/own-card", "--quiet")[0] == 0
    assert hub.files("alice/own-card")["README.md"] == (out / "README.md").read_bytes()


def test_push_to_branch_and_as_pull_request(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    hub.create_repo("org/shared", {"config.json": b"{}"})
    main_before = hub.head("org/shared")

    rc, stdout, err = run_cli(capsys, "push", out, "org/shared", "--revision", "converted", "--quiet",
                              "--commit-message", "converted weights")
    assert rc == 0, err
    assert hub.head("org/shared") == main_before
    assert "model.safetensors" in hub.files("org/shared", "converted")
    assert hub.repos["org/shared"].commits[hub.head("org/shared", "converted")].message == "converted weights"

    rc, stdout, err = run_cli(capsys, "push", out, "org/shared", "--create-pr", "--quiet")
    assert rc == 0, err
    assert "opened pull request" in stdout and "/discussions/1" in stdout
    assert hub.head("org/shared") == main_before, "a pull request leaves main alone"
    assert "model.safetensors" in hub.files("org/shared", "refs/pr/1")


def test_large_file_goes_through_multipart_lfs(hub, tmp_path, capsys):
    hub.multipart_chunk_size = 256 * 1024
    out = make_output(tmp_path / "out", big=700_000)
    assert run_cli(capsys, "push", out, "alice/big", "--quiet")[0] == 0
    assert any(path.endswith("/part/3") for _, path in hub.requests), "expected a 3-part upload"
    path, _ = resolve_source("hf-hub:alice/big")
    assert (path / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_push_refuses_a_directory_that_no_longer_matches_its_manifest(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    (out / "config.json").write_text("{}")
    rc, _, err = run_cli(capsys, "push", out, "alice/changed")
    assert rc == 2
    assert "no longer matches its clawconvert_manifest.json" in err and "changed: config.json" in err
    assert hub.requests == []


def test_push_without_manifest_still_writes_a_card(hub, tmp_path, capsys):
    out = tmp_path / "plain"
    out.mkdir()
    (out / "open_clip_config.json").write_text("{}")
    save_file({"w": np.zeros(4, np.float32)}, str(out / "open_clip_model.safetensors"))
    assert run_cli(capsys, "push", out, "alice/plain", "--quiet")[0] == 0
    card = hub.files("alice/plain")["README.md"].decode()
    assert front_matter(card)["library_name"] == "open_clip"
    assert "provenance is not recorded" in card
    assert 'create_model_and_transforms("hf-hub:alice/plain")' in card


# --------------------------------------------------------------------------------------------
# failures: one line, exit 2, nothing local touched, no token anywhere


def test_wrong_token_gives_one_line_and_never_leaks(hub, tmp_path, capsys, monkeypatch):
    hub.echo_credentials = True  # a careless server repeats the Authorization header in errors
    monkeypatch.setenv("HF_TOKEN", BAD_TOKEN)
    out = make_output(tmp_path / "out")
    before = snapshot(out)

    rc, stdout, err = run_cli(capsys, "push", out, "alice/secret")

    assert rc == 2
    assert_one_error_line(err, "401", "alice/secret", "HF_TOKEN")
    assert BAD_TOKEN not in stdout + err
    assert "alice/secret" not in hub.repos
    assert snapshot(out) == before


def test_no_token_says_how_to_log_in(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    rc, _, err = run_cli(capsys, "push", make_output(tmp_path / "out"), "alice/anon", "--quiet")
    assert rc == 2
    assert_one_error_line(err, "401", "no token found: set HF_TOKEN or run `hf auth login`")


def test_no_write_access_is_a_403_line(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out")
    rc, stdout, err = run_cli(capsys, "push", out, "someone-else/model", "--quiet")
    assert rc == 2
    assert_one_error_line(err, "403", "write access to someone-else")
    assert GOOD_TOKEN not in stdout + err


def test_server_error_mid_commit_commits_nothing(hub, tmp_path, capsys):
    hub.echo_credentials = True
    hub.create_repo("alice/existing", {"config.json": b'{"old": true}'})
    head = hub.head("alice/existing")
    hub.fail("POST", r"/commit/", 500, message="internal error while writing the commit")
    out = make_output(tmp_path / "out")
    before = snapshot(out)

    rc, stdout, err = run_cli(capsys, "push", out, "alice/existing")

    assert rc == 2
    line = assert_one_error_line(err, "500", "nothing was committed")
    assert "internal error while writing the commit" in line
    assert GOOD_TOKEN not in stdout + err
    assert ("POST", "/api/models/alice/existing/preupload/main") in hub.requests  # it failed mid-way
    assert hub.head("alice/existing") == head
    assert hub.files("alice/existing")["config.json"] == b'{"old": true}'
    assert snapshot(out) == before
    # the failure left nothing half-done: the same push simply works once the server recovers
    assert run_cli(capsys, "push", out, "alice/existing", "--quiet")[0] == 0
    assert hub.files("alice/existing")["config.json"] == (out / "config.json").read_bytes()


def test_hub_unreachable_is_one_line(tmp_path, capsys, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_hub_at(monkeypatch, dead, tmp_path / "hf_home")
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    out = make_output(tmp_path / "out")
    rc, stdout, err = run_cli(capsys, "push", out, "alice/nowhere", "--quiet")
    assert rc == 2
    assert_one_error_line(err, "cannot reach the Hub at " + dead)
    assert GOOD_TOKEN not in stdout + err


def test_endpoint_without_xet_gets_a_hint(hub, tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)  # hf_xet is installed: Xet is tried
    monkeypatch.delenv("HF_HUB_DISABLE_XET")
    out = make_output(tmp_path / "out")
    rc, stdout, err = run_cli(capsys, "push", out, "alice/xet", "--quiet")
    assert rc == 2
    assert_one_error_line(err, "set HF_HUB_DISABLE_XET=1", "nothing was committed")
    assert GOOD_TOKEN not in stdout + err


def test_missing_repo_and_missing_revision(hub):
    with pytest.raises(ClawError, match=r"repository alice/nothing not found"):
        resolve_source("hf-hub:alice/nothing")
    hub.create_repo("alice/there", {"model.safetensors": b"x" * 10})
    with pytest.raises(ClawError, match=r"revision 'v9' does not exist in alice/there"):
        resolve_source("hf-hub:alice/there@v9")
    with pytest.raises(ClawError, match=r"revision '0{40}' does not exist"):
        resolve_source("hf-hub:alice/there@" + "0" * 40)
    with pytest.raises(ClawError, match="expected hf-hub:namespace/name"):
        resolve_source("hf-hub:")


def test_private_repo_needs_the_token(hub, monkeypatch):
    hub.create_repo("alice/private", {"config.json": b"{}", "model.safetensors": b"w"}, private=True)
    path, _ = resolve_source("hf-hub:alice/private")
    assert (path / "config.json").read_bytes() == b"{}"
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(ClawError, match="not found .* or not visible with the current token"):
        resolve_source("hf-hub:alice/private@main")


# --------------------------------------------------------------------------------------------
# reading hf-hub: sources


def _downloaded(hub: FakeHub) -> list[str]:
    """Files fetched with GET /resolve since the request log was last cleared."""
    return sorted(path.split("/resolve/", 1)[1].split("/", 1)[1]
                  for method, path in hub.requests if method == "GET" and "/resolve/" in path)


def test_resolve_source_pins_revision_and_downloads_only_what_is_needed(hub):
    files = {"config.json": b"{}", "model.safetensors": b"s" * 100, "pytorch_model.bin": b"p" * 100,
             "tf_model.h5": b"t" * 100, "README.md": b"# hi"}
    first = hub.create_repo("org/both", files)
    path, info = resolve_source("hf-hub:org/both@main")
    assert info == {"hub_repo": "org/both", "hub_revision": first}
    assert path.name == first  # the snapshot folder of the resolved commit
    assert _downloaded(hub) == ["config.json", "model.safetensors"]

    hub.requests.clear()
    only, _ = resolve_source("hf-hub:org/both", allow_patterns=["*.bin"])
    assert _downloaded(hub) == ["pytorch_model.bin"] and (only / "pytorch_model.bin").is_file()

    # a new commit on main is picked up; the old one stays reachable by its sha
    second = hub._commit(hub.repos["org/both"], "main", "update", {
        **hub.repos["org/both"].commits[first].files})
    assert resolve_source("hf-hub:org/both")[1]["hub_revision"] == second
    assert resolve_source(f"hf-hub:org/both@{first}")[1]["hub_revision"] == first
    assert resolve_source("local/dir") == (Path("local/dir"), {})


def test_offline_mode_serves_the_cache_and_says_so_when_it_cannot(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = hub.create_repo("org/cached", {"config.json": b"{}", "model.safetensors": b"w" * 64})
    online, _ = resolve_source("hf-hub:org/cached")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()

    offline, info = resolve_source("hf-hub:org/cached")

    assert offline == online and info["hub_revision"] == sha
    assert hub.requests == []
    with pytest.raises(ClawError, match="HF_HUB_OFFLINE is set and the local Hugging Face cache has no "
                                        "copy of org/never-downloaded@main"):
        resolve_source("hf-hub:org/never-downloaded")
    with pytest.raises(ClawError, match="HF_HUB_OFFLINE is set; unset it"):
        push(make_output(tmp_path / "out"), "org/cached", quiet=True)
    assert hub.requests == []


def test_select_checkpoint_files_prefers_safetensors():
    files = ["README.md", ".gitattributes", "config.json", "open_clip_config.json", "model.safetensors",
             "open_clip_model.safetensors", "pytorch_model.bin", "flax_model.msgpack", "vocab.txt"]
    assert select_checkpoint_files(files) == ["config.json", "open_clip_config.json", "vocab.txt",
                                              "model.safetensors", "open_clip_model.safetensors"]
    assert select_checkpoint_files(["params.npz", "a.bin"]) == ["params.npz"]
    assert select_checkpoint_files(["epoch_3.pt", "x.json"]) == ["x.json", "epoch_3.pt"]


# --------------------------------------------------------------------------------------------
# the card from sparse or odd manifests


@pytest.mark.parametrize("manifest", [
    None,
    {},
    {"version": "0.0.1"},
    {"source": "not-a-dict", "target": None, "tables": "x", "verify": [1, 2]},
    {"source": {"path": "/data/ckpt", "format": "big_vision", "family": "siglip"},
     "target": {"format": "big_vision", "family": "siglip"}, "tables": [{"name": "siglip/bv"}]},
    {"command": "clawconvert extract-visual src out", "target": {"format": "hf", "family": "clip"}},
])
def test_card_tolerates_missing_and_odd_keys(manifest):
    card = build_card(manifest, "alice/m", ["model.safetensors", "config.json"])
    meta = front_matter(card)
    assert "clawconvert" in meta["tags"]
    assert card.count("\n---\n") >= 1 and "# m" in card


def test_card_picks_pipeline_and_library_from_what_was_made():
    tower = build_card({"target": {"format": "hf", "family": "clip"}}, "a/b", ["config.json"],
                       architectures=["CLIPVisionModelWithProjection"])
    assert front_matter(tower)["pipeline_tag"] == "image-feature-extraction"
    assert 'CLIPVisionModelWithProjection.from_pretrained("a/b")' in tower and "CLIP image tower" in tower
    module_run = build_card({"command": "/x/clawconvert/__main__.py convert a b --to hf"}, "a/b")
    assert "| Command | `clawconvert convert a b --to hf` |" in module_run
    visual = front_matter(build_card({"command": "clawconvert extract-visual a b",
                                      "target": {"format": "hf", "family": "siglip"}}, "a/b"))
    assert visual["pipeline_tag"] == "image-feature-extraction" and visual["library_name"] == "transformers"
    text = front_matter(build_card({"target": {"format": "openclip", "family": "clip", "tower": "text"}}, "a/b"))
    assert text["pipeline_tag"] == "feature-extraction" and text["library_name"] == "open_clip"
    llava = front_matter(build_card({"target": {"format": "hf", "family": "llava"}}, "a/b"))
    assert llava["pipeline_tag"] == "image-text-to-text"
    local = front_matter(build_card({"source": {"path": "/x", "format": "openclip"}}, "a/b"))
    assert "base_model" not in local and "license" not in local


def test_card_for_a_lora_merge_names_base_and_adapter():
    manifest = {
        "version": __version__, "command": "clawconvert merge-lora hf-hub:org/base hf-hub:me/lora out",
        "source": {"base": {"path": "hf-hub:org/base", "fingerprint": "b" * 64, "hub_repo": "org/base",
                            "hub_revision": "c" * 40},
                   "adapter": {"path": "hf-hub:me/lora", "hub_repo": "me/lora", "hub_revision": "d" * 40,
                               "config": {"r": 8}}},
        "target": {"format": "hf", "architecture": "LlavaForConditionalGeneration"},
        "dtype": "bf16", "merge": {"modules": 56, "tie": "none", "copied_from_base": ["tokenizer.json"]},
        "notes": ["lm_head tied to embed_tokens: delta added once"],
    }
    card = build_card(manifest, "me/merged", ["config.json", "model.safetensors"])
    meta = front_matter(card)
    assert meta["base_model"] == "org/base" and meta["pipeline_tag"] == "image-text-to-text"
    assert "lora" in meta["tags"] and meta["library_name"] == "transformers"
    assert "LoRA adapter `hf-hub:me/lora` at revision `" + "d" * 40 + "` merged into `hf-hub:org/base`" in card
    assert "| Source (base) fingerprint | `" + "b" * 64 + "` |" in card
    assert "| modules | 56 |" in card and "| copied_from_base | tokenizer.json |" in card
    assert "- lm_head tied to embed_tokens: delta added once" in card
    assert 'LlavaForConditionalGeneration.from_pretrained("me/merged")' in card
    assert "Mapping tables" not in card


def test_token_typed_into_a_command_line_is_redacted_from_the_card(hub, tmp_path, capsys):
    out = make_output(tmp_path / "out", command=f"clawconvert convert src out --to hf # {GOOD_TOKEN}")
    rc, stdout, err = run_cli(capsys, "push", out, "alice/redact", "--quiet")
    assert rc == 0, err
    assert GOOD_TOKEN not in hub.files("alice/redact")["README.md"].decode()
    assert GOOD_TOKEN not in stdout + err
    commit = hub.repos["alice/redact"].commits[hub.head("alice/redact")]
    assert GOOD_TOKEN not in commit.message


# --------------------------------------------------------------------------------------------
# with the real convert command


def _convert_available() -> bool:
    return ((REPO_ROOT / "clawconvert" / "commands" / "convert.py").is_file()
            and (REPO_ROOT / "fixtures" / "openclip_tiny" / "open_clip_config.json").is_file())


@pytest.mark.skipif(not _convert_available(), reason="needs the convert command and fixtures/openclip_tiny")
def test_convert_with_push_to_and_from_hf_hub(hub, tmp_path, capsys):
    fixture = REPO_ROOT / "fixtures" / "openclip_tiny"
    # the OpenCLIP fixture as a Hub repo, then converted straight from hf-hub: and pushed back
    hub.create_repo("org/openclip-tiny", {p.name: p.read_bytes() for p in fixture.iterdir()}
                    | {"README.md": b"---\nlicense: mit\n---\n"})
    src_sha = hub.head("org/openclip-tiny")
    out = tmp_path / "hf"

    rc, stdout, err = run_cli(capsys, "convert", "hf-hub:org/openclip-tiny", out, "--to", "hf",
                              "--push-to", "alice/tiny-clip-hf", "--quiet")

    assert rc == 0, err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["source"]["hub_repo"] == "org/openclip-tiny"
    assert manifest["source"]["hub_revision"] == src_sha
    assert "pushed to alice/tiny-clip-hf@main" in stdout
    card = hub.files("alice/tiny-clip-hf")["README.md"].decode()
    assert 'CLIPModel.from_pretrained("alice/tiny-clip-hf")' in card  # class from config.json
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/openclip-tiny"
    assert "openclip" in meta["tags"]
    assert src_sha in card

    back, info = resolve_source("hf-hub:alice/tiny-clip-hf", allow_patterns=["*"])
    for p in out.iterdir():
        assert (back / p.name).read_bytes() == p.read_bytes(), p.name
    transformers = pytest.importorskip("transformers")
    model = transformers.CLIPModel.from_pretrained(back)
    assert model.config.projection_dim == 24


# --------------------------------------------------------------------------------------------
# offline from any cache: hf_hub_download's layout, a copy made by hand, huggingface_hub 2.x's

TINY = REPO_ROOT / "fixtures" / "openclip_tiny"


def _tiny_repo(hub: FakeHub, repo_id: str = "org/tiny") -> str:
    """The OpenCLIP fixture as a Hub repo, with files a conversion does not need beside it."""
    return hub.create_repo(repo_id, {p.name: p.read_bytes() for p in TINY.iterdir()}
                           | {"README.md": b"# tiny", "open_clip_pytorch_model.bin": b"p" * 64})


def _storage(repo_id: str) -> Path:
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def _download(repo_id: str, *names: str) -> Path:
    """Files fetched one by one, as transformers, open_clip and older huggingface_hub do: blobs +
    symlinks + refs/main, and no tree listing."""
    from huggingface_hub import hf_hub_download
    for name in names:
        hf_hub_download(repo_id, name)
    return _storage(repo_id)


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_offline_from_an_hf_hub_download_cache_converts(hub, tmp_path, capsys, monkeypatch):
    sha = _tiny_repo(hub)
    storage = _download("org/tiny", "open_clip_config.json", "open_clip_model.safetensors")
    snap = storage / "snapshots" / sha
    assert not (storage / "trees").exists() and (snap / "open_clip_model.safetensors").is_symlink()
    _offline(monkeypatch)
    hub.requests.clear()

    rc, _, err = run_cli(capsys, "convert", "hf-hub:org/tiny", tmp_path / "hf", "--to", "hf", "--quiet")

    assert rc == 0, err
    assert hub.requests == []
    manifest = json.loads((tmp_path / "hf" / MANIFEST).read_text())
    assert manifest["source"]["hub_revision"] == sha
    assert run_cli(capsys, "convert", TINY, tmp_path / "local", "--to", "hf", "--quiet")[0] == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()


def test_unreachable_hub_serves_the_same_cache(hub, tmp_path, monkeypatch):
    sha = _tiny_repo(hub)
    _download("org/tiny", "open_clip_config.json", "open_clip_model.safetensors")
    with socket.socket() as s:  # a port nobody listens on, HF_HUB_OFFLINE unset
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    _point_hub_at(monkeypatch, dead, tmp_path / "hf_home")
    folder, info = resolve_source("hf-hub:org/tiny")
    assert info["hub_revision"] == sha and (folder / "open_clip_model.safetensors").is_file()
    with pytest.raises(ClawError, match="the Hub cannot be reached and the local Hugging Face cache has no copy "
                                        "of org/other@main"):
        resolve_source("hf-hub:org/other")


def test_offline_names_what_the_cache_lacks(hub, monkeypatch):
    _tiny_repo(hub)
    _download("org/tiny", "open_clip_config.json")   # the config only, as open_clip's get_model_config leaves it
    shards = {"model-00001-of-00002.safetensors": b"a" * 32, "model-00002-of-00002.safetensors": b"b" * 32}
    index = {"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors",
                                            "y": "model-00002-of-00002.safetensors"}}
    hub.create_repo("org/sharded", {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
                                    **shards})
    _download("org/sharded", "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors")
    sha = _tiny_repo(hub, "org/broken")
    storage = _download("org/broken", "open_clip_config.json", "open_clip_model.safetensors")
    blob = (storage / "snapshots" / sha / "open_clip_model.safetensors").resolve()
    blob.unlink()   # the link stays, its blob is gone
    _offline(monkeypatch)

    with pytest.raises(ClawError, match=r"HF_HUB_OFFLINE is set and the cached snapshot of org/tiny@main \(commit "
                                        r"[0-9a-f]{12}\) lacks the weights .*; it holds open_clip_config.json"):
        resolve_source("hf-hub:org/tiny")
    with pytest.raises(ClawError, match=r"of org/sharded@main \(commit [0-9a-f]{12}\) lacks "
                                        r"model-00002-of-00002.safetensors;"):
        resolve_source("hf-hub:org/sharded")
    with pytest.raises(ClawError, match=r"of org/broken@main .* lacks open_clip_model.safetensors"):
        resolve_source("hf-hub:org/broken")


def _hand_copy(src: Path, cache: Path) -> Path:
    """``cp -rL`` of a repo's cache folder without its blobs: plain files in snapshots/, refs/ kept."""
    import shutil
    dst = cache / src.name
    shutil.copytree(src, dst, symlinks=False, ignore=lambda d, names: ["blobs"] if Path(d) == src else [])
    return dst


def test_offline_from_a_hand_copied_cache(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = _tiny_repo(hub)
    copy = _hand_copy(_download("org/tiny", "open_clip_config.json", "open_clip_model.safetensors"),
                      tmp_path / "copied-cache")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "copied-cache"))
    _offline(monkeypatch)
    snap = copy / "snapshots" / sha
    assert not (copy / "blobs").exists() and not (snap / "open_clip_model.safetensors").is_symlink()

    folder, info = resolve_source("hf-hub:org/tiny")
    assert folder == snap and info["hub_revision"] == sha

    import shutil
    shutil.rmtree(copy / "refs")   # only the snapshot was copied: it is the one there is
    assert resolve_source("hf-hub:org/tiny")[0] == snap
    other = "f" * 40
    shutil.copytree(snap, copy / "snapshots" / other)
    with pytest.raises(ClawError, match=rf"does not know which commit org/tiny@main is .*; it holds snapshots "
                                        rf"{sha[:12]}, {other[:12]}: name one with hf-hub:org/tiny@<commit>"):
        resolve_source("hf-hub:org/tiny")
    assert resolve_source(f"hf-hub:org/tiny@{other}")[1]["hub_revision"] == other


def test_offline_from_a_snapshot_download_cache_checks_its_tree_listing(hub, monkeypatch):
    sha = _tiny_repo(hub)
    folder, _ = resolve_source("hf-hub:org/tiny")   # snapshot_download: huggingface_hub 2.x writes trees/<sha>.json
    assert (_storage("org/tiny") / "trees").is_dir()
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    _offline(monkeypatch)
    hub.requests.clear()
    assert resolve_source("hf-hub:org/tiny") == (folder, {"hub_repo": "org/tiny", "hub_revision": sha})
    assert resolve_source("hf-hub:org/tiny", allow_patterns=["*.json"])[0] == folder
    with pytest.raises(ClawError, match=r"lacks .gitattributes, README.md, open_clip_pytorch_model.bin; it holds open_clip_config.json"):
        resolve_source("hf-hub:org/tiny", allow_patterns=["*"])   # the listing knows the repo's other files
    assert hub.requests == []
