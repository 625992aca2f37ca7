"""Draw where a trained ViT looks: attention rollout and each last-layer head, over each image, one PNG per image.

    python scripts/visualize_attention.py outputs/vit-digits three.png seven.png --out attention
    python scripts/visualize_attention.py MODEL photo.jpg --out attention --head_fusion max --discard_ratio 0.9
    python scripts/visualize_attention.py MODEL photo.jpg --out attention --interpolate_pos_encoding

MODEL is a folder saved by the training scripts (or `save_pretrained`). Images are resized to the model's size by its
image processor, unless `--interpolate_pos_encoding` keeps them at their own size (rounded to whole patches).
"""

import argparse
import sys
from dataclasses import dataclass, field
from typing import Literal

from transformers import HfArgumentParser

import hf_vit_custom  # noqa: F401  (registers the Auto classes)
from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.visualize import load_model_and_processor, open_image, save_attention_figures


@dataclass
class VisualizeArguments:
    """Where the figures go and how the attention is rolled out."""

    out: str = field(metadata={"help": "Folder for the PNGs, one per image (<image name>_attention.png)."})
    head_fusion: Literal["mean", "max", "min"] = field(
        default="mean", metadata={"help": "How the rollout merges the heads of each layer."}
    )
    discard_ratio: float = field(
        default=0.0, metadata={"help": "Share of each layer's weakest attention weights dropped from the rollout."}
    )
    interpolate_pos_encoding: bool = field(
        default=False, metadata={"help": "Keep each image at its own size and resample the position embeddings."}
    )


def main(args: list[str] | None = None) -> None:
    parser = raise_usage_errors(
        HfArgumentParser(VisualizeArguments, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.add_argument("model", help="Saved model folder (or Hub id when online).")
    parser.add_argument("images", nargs="+", help="Image files.")
    arguments, paths = parser.parse_args_into_dataclasses(args=sys.argv[1:] if args is None else args)

    # Read every image before loading the model, so that a wrong path fails at once and writes nothing.
    images = {path: open_image(path) for path in paths.images}
    model, image_processor = load_model_and_processor(paths.model)
    written = save_attention_figures(
        model,
        image_processor,
        images,
        arguments.out,
        head_fusion=arguments.head_fusion,
        discard_ratio=arguments.discard_ratio,
        interpolate_pos_encoding=arguments.interpolate_pos_encoding,
    )
    for image_path, figure_path in zip(images, written, strict=True):
        print(f"{image_path} -> {figure_path}")


if __name__ == "__main__":
    run(main)
