"""Train a ViT image classifier with `transformers.Trainer`.

With no arguments it trains on the bundled 8x8 digits, evaluates on the held-out test split, saves the model to
`outputs/vit-digits`, reloads it through `AutoModelForImageClassification` and classifies a few test images with
`pipeline`. Every `TrainingArguments` flag works (`--help` lists them); a single `.json` or `.yaml` argument is read
as a file of arguments. Several processes:

    torchrun --nproc_per_node 2 scripts/train.py
    accelerate launch --config_file scripts/configs/ddp.yaml scripts/train.py
"""

import logging
import sys

import torch.distributed as dist

from hf_vit_custom.checkpointing import TrainingInterrupted
from hf_vit_custom.training import (
    DataArguments,
    ModelArguments,
    ViTTrainingArguments,
    parse_arguments,
    print_results,
    train,
)


def main(args: list[str] | None = None) -> dict:
    dataclass_types = (ModelArguments, DataArguments, ViTTrainingArguments)
    model_args, data_args, training_args = parse_arguments(dataclass_types, sys.argv[1:] if args is None else args)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    logging.getLogger("hf_vit_custom").setLevel(logging.INFO if training_args.should_log else logging.WARNING)

    try:
        metrics = train(model_args, data_args, training_args)
    except TrainingInterrupted as interruption:  # Ctrl-C: say what survived instead of a traceback
        print(interruption, file=sys.stderr)
        raise SystemExit(130) from None

    if training_args.process_index == 0:
        print_results(metrics, training_args.output_dir)
    if dist.is_initialized():
        # Ending every rank together avoids the occasional hang or crash in gloo's teardown.
        dist.barrier()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
