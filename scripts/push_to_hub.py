"""Upload a trained model folder (the output directory of scripts/train.py) to the Hugging Face Hub.

    python scripts/push_to_hub.py outputs/vit-digits --repo_id USER/vit-digits [--private] [--revision BRANCH]
    python scripts/push_to_hub.py outputs/vit-digits --repo_id USER/vit-digits --space_id USER/vit-digits-demo

Log in first (`hf auth login`) or set HF_TOKEN. The folder is checked, completed for `trust_remote_code` users and
given a model card with its `all_results.json` metrics; the local folder itself is not changed. `--space_id` then
uploads the Gradio demo (scripts/demo.py) as a Space that loads the model: custom-code models get no hosted inference
widget on the Hub, so the Space is where people try it.
"""

import argparse
import logging

from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.demo import import_gradio
from hf_vit_custom.hub import push_demo_space, push_model_folder


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
    parser.add_argument("--space_id", default=None, help="USER/NAME: also upload the demo as a Space for the model")
    args = parser.parse_args(argv)
    if args.space_id and args.revision not in (None, "main"):
        parser.error("--space_id needs the model on main (the Space loads the main branch): drop --revision")
    if args.space_id:
        import_gradio()  # before the model goes up: the Space's files need it
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
    if args.space_id:
        print(push_demo_space(args.repo_id, args.space_id, private=args.private))
    return 0


if __name__ == "__main__":
    run(main)
