"""Open a trained classifier in the browser: drop an image, see its top-5 labels and the attention rollout over it.

    python scripts/demo.py outputs/vit-digits                       # http://127.0.0.1:7860
    python scripts/demo.py USER/vit-digits --host 0.0.0.0 --port 8080
    python scripts/demo.py outputs/vit-digits --share               # also a temporary public gradio.live link

MODEL is a folder saved by the training scripts (or `save_pretrained`), or a Hub id. The same app runs as a Hugging
Face Space: `scripts/push_to_hub.py ... --space_id USER/NAME` uploads it (`hf_vit_custom.demo`).
"""

import argparse

from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.demo import build_demo


def main(argv: list[str] | None = None) -> None:
    parser = raise_usage_errors(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.add_argument("model", help="a classifier folder saved by the training scripts, or a Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--share", action="store_true", help="also open a temporary public link through gradio")
    args = parser.parse_args(argv)
    build_demo(args.model).launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    run(main)
