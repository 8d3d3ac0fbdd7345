#!/usr/bin/env python
"""Publish a MemLlava checkpoint to the Hugging Face Hub.

    python push_to_hub.py outputs/memllava-short me/memllava-7b-short --private
    python push_to_hub.py outputs/memllava-long me/memllava-7b --revision long-v1 --eval-results results.json
    python push_to_hub.py outputs/memllava-long me/memllava-7b --dry-run staged/   # stage only, upload nothing

Only an allow-list of files is uploaded (safetensors weights, configs, remote code, processor/tokenizer files,
the training config and a generated README.md); the rest is listed as "left out". The token comes from the
variable named by --token-env (default HF_TOKEN) or from `hf auth login`, and is never printed.
The logic lives in modeling_memllava/hub.py, where it is tested.
"""

import argparse
import os
import sys

from modeling_memllava.hub import StagingError, push_checkpoint


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a folder written by save_pretrained (or a Trainer checkpoint-N folder)")
    parser.add_argument("repo_id", help="the Hub model repo, e.g. user/memllava-7b")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to push to; created if it is not main")
    parser.add_argument("--dry-run", metavar="DIR", default=None, help="stage into DIR and upload nothing")
    parser.add_argument("--eval-results", metavar="FILE", default=None, help="results JSON for the card's table")
    parser.add_argument("--base-model", default=None, help="base_model for the card (default: from the config)")
    parser.add_argument("--token-env", default="HF_TOKEN", metavar="VAR", help="environment variable with the token")
    parser.add_argument("--commit-message", default=None)
    return parser.parse_args(argv)


def read_token(var: str, explicit: bool) -> str | None:
    """The token in $VAR; None lets huggingface_hub use the stored login. A variable named explicitly must be set."""
    token = os.environ.get(var) or None
    if token is None and explicit:
        raise SystemExit(f"--token-env {var}: the environment variable {var} is not set")
    return token


def main(argv=None) -> int:
    args = parse_args(argv)
    token = None
    if args.dry_run is None:
        token = read_token(args.token_env, explicit=args.token_env != "HF_TOKEN")
    try:
        result = push_checkpoint(
            args.checkpoint,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=token,
            eval_results=args.eval_results,
            dry_run_dir=args.dry_run,
            base_model=args.base_model,
            commit_message=args.commit_message,
        )
    except (StagingError, FileNotFoundError, PermissionError) as error:
        # Expected problems with the checkpoint or the login: one clear line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
