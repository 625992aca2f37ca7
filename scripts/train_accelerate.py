"""Train a ViT image classifier with a plain Accelerate loop (`hf_vit_custom.accelerate_loop`).

The same model, data, optimiser groups and metrics as `scripts/train.py`, trained by a loop written out with
`accelerate`. With no arguments it trains on the bundled 8x8 digits and saves to `outputs/vit-digits-accelerate`;
`--help` lists the options, and a single `.json` or `.yaml` argument is read as a file of arguments. Several processes:

    torchrun --nproc_per_node 2 scripts/train_accelerate.py
    accelerate launch --config_file scripts/configs/ddp.yaml scripts/train_accelerate.py
    accelerate launch --config_file scripts/configs/fsdp.yaml scripts/train_accelerate.py

On a machine without GPUs use `torchrun`: `accelerate launch --cpu --num_processes 2` starts a single process.
Resume an interrupted run with `--resume_from_checkpoint latest` (needs `--checkpointing_steps`).
"""

import logging
import os
import sys

from transformers import HfArgumentParser

from hf_vit_custom.accelerate_loop import AccelerateArguments, train_with_accelerate
from hf_vit_custom.training import DataArguments, ModelArguments


def main(args: list[str] | None = None) -> dict:
    args = sys.argv[1:] if args is None else args
    parser = HfArgumentParser((ModelArguments, DataArguments, AccelerateArguments))
    if len(args) == 1 and args[0].endswith(".json"):
        model_args, data_args, accelerate_args = parser.parse_json_file(args[0])
    elif len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        model_args, data_args, accelerate_args = parser.parse_yaml_file(args[0])
    else:
        model_args, data_args, accelerate_args = parser.parse_args_into_dataclasses(args=args)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    logging.getLogger("hf_vit_custom").setLevel(logging.INFO)  # Accelerate's logger speaks on the main process only

    metrics = train_with_accelerate(model_args, data_args, accelerate_args)

    if int(os.environ.get("RANK", "0")) == 0:  # set by torchrun and accelerate launch
        print(
            f"\nTest accuracy: {metrics.get('test_accuracy', float('nan')):.4f}  "
            f"(world size {metrics['world_size']}, saved to {accelerate_args.output_dir})"
        )
        for row in metrics.get("demo_predictions", []):
            print(f"  predicted {row['predicted']:>8}  true {row['true']:>8}  score {row['score']:.3f}")
    return metrics


if __name__ == "__main__":
    main()
