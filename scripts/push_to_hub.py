"""Upload a trained model folder (the output directory of scripts/train.py) to the Hugging Face Hub.

    python scripts/push_to_hub.py outputs/vit-digits --repo_id USER/vit-digits [--private] [--revision BRANCH]

Log in first (`hf auth login`) or set HF_TOKEN. The folder is checked, completed for `trust_remote_code` users and
given a model card with its `all_results.json` metrics; the local folder itself is not changed.
"""

import argparse
import logging

from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.hub import push_model_folder


def main(argv: list[str] | None = None) -> int:
    parser = raise_usage_errors(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.add_argument("output_dir", help="folder written by save_pretrained / scripts/train.py")
    parser.add_argument("--repo_id", required=True, help="USER/NAME or ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private (if it does not exist)")
    parser.add_argument("--revision", default=None, help="branch to push to; created from main if missing")
    parser.add_argument("--commit_message", default=None)
    parser.add_argument("--dataset", default=None, help="dataset id to name in the model card")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = push_model_folder(
        args.output_dir,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        dataset=args.dataset,
    )
    print(url)
    return 0


if __name__ == "__main__":
    run(main)
