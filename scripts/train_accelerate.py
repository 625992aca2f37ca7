"""Train a ViT image classifier with a plain Accelerate loop (`hf_vit_custom.accelerate_loop`).

The same model, data, optimiser, metrics and flags (`TrainingArguments`, as in `scripts/train.py`) as the Trainer
script, trained by a loop written out with `accelerate`. With no arguments it trains on the bundled 8x8 digits and
saves to `outputs/vit-digits-accelerate`; `--help` lists the options, and a single `.json` or `.yaml` argument is
read as a file of arguments. Several processes:

    torchrun --nproc_per_node 2 scripts/train_accelerate.py
    accelerate launch --config_file scripts/configs/ddp.yaml scripts/train_accelerate.py
    accelerate launch --config_file scripts/configs/fsdp.yaml scripts/train_accelerate.py

On a machine without GPUs use `torchrun`: `accelerate launch --cpu --num_processes 2` starts a single process.
Resume an interrupted run with `--resume_from_checkpoint latest` (a checkpoint is saved every epoch by default;
`--save_strategy steps --save_steps N` saves every N optimiser steps).
"""

import logging
import os
import sys

from hf_vit_custom.accelerate_loop import AccelerateArguments, train_with_accelerate
from hf_vit_custom.cli import run
from hf_vit_custom.persistence import TrainingInterrupted
from hf_vit_custom.training import DataArguments, ModelArguments, parse_arguments, print_results


def main(args: list[str] | None = None) -> dict:
    dataclass_types = (ModelArguments, DataArguments, AccelerateArguments)
    model_args, data_args, accelerate_args = parse_arguments(dataclass_types, sys.argv[1:] if args is None else args)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    logging.getLogger("hf_vit_custom").setLevel(logging.INFO)  # Accelerate's logger speaks on the main process only

    try:
        metrics = train_with_accelerate(model_args, data_args, accelerate_args)
    except TrainingInterrupted as interruption:  # Ctrl-C: say what survived instead of a traceback
        print(interruption, file=sys.stderr)
        raise SystemExit(130) from None

    if int(os.environ.get("RANK", "0")) == 0:  # set by torchrun and accelerate launch
        print_results(metrics, accelerate_args.output_dir)
    return metrics


if __name__ == "__main__":
    run(main)
