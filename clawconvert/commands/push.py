"""``clawconvert push DIR REPO_ID``: upload an output directory to the Hugging Face Hub."""
from __future__ import annotations

import argparse

from ..hub import push, repo_id_arg

ORDER = 60

DESCRIPTION = """\
Upload a directory written by clawconvert to a Hugging Face Hub model repo, as one commit.

The repo is created when it does not exist.  Unless DIR already has a README.md, a model
card is written from DIR's clawconvert_manifest.json: library, base model, tags, pipeline,
license when the source declared one, and a provenance section (source path or Hub repo and
resolved revision, source format, mapping tables and their sha256, clawconvert version, dtype,
verification figures when --verify ran, file hashes, and how to load the model).  The card
is uploaded, not written into DIR: pushing never changes local files.

Before anything is sent, every file is hashed and checked against the manifest; a file
changed or missing since the manifest was written stops the push.

The token comes from HF_TOKEN or from `hf auth login`, and is never printed.  HF_ENDPOINT
selects another Hub; large files go through huggingface_hub's own large-file upload."""

EPILOG = """\
examples:
  clawconvert push out/hf your-name/clip-vit-b-32-hf --dry-run
  clawconvert push out/hf your-name/clip-vit-b-32-hf --private
  clawconvert push out/hf some-org/clip-vit-b-32-hf --create-pr
  clawconvert convert fixtures/openclip_tiny out/hf --to hf --push-to your-name/tiny-clip"""


def register(sub) -> None:
    p = sub.add_parser("push", help="upload an output directory to the Hugging Face Hub with a provenance model card",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="directory written by a clawconvert command")
    p.add_argument("repo_id", metavar="REPO_ID", type=repo_id_arg,
                   help="target model repo, namespace/name (created if missing)")
    p.add_argument("--private", action="store_true",
                   help="create the repo as private (an existing repo keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", default=None,
                   help="commit to this branch, created from main if missing (default: main); "
                        "with --create-pr, the branch the pull request targets")
    p.add_argument("--commit-message", metavar="MSG", default=None,
                   help="commit summary (default: names the clawconvert command that made DIR)")
    p.add_argument("--create-pr", action="store_true",
                   help="open a pull request with the files instead of committing to the branch "
                        "(for repos you cannot write to directly)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files that would be uploaded and print the model card; contact nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or Hub warnings")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    push(args.dir, args.repo_id, private=args.private, revision=args.revision,
         commit_message=args.commit_message, create_pr=args.create_pr, dry_run=args.dry_run,
         quiet=args.quiet)
    return 0
