"""Pre-train a ViT as a masked autoencoder (MAE, He et al., 2021) with `transformers.Trainer`.

With no arguments it pre-trains the digits model on the bundled 8x8 digits, without their labels, reports the
reconstruction loss on the validation and test splits and saves the model and image processor to
`outputs/vit-digits-mae`. Fine-tune the result as a classifier with

    python scripts/train.py --model_name_or_path outputs/vit-digits-mae

`--train_dir` pre-trains on an image folder instead, `--mask_ratio` changes the share of hidden patches, and every
`TrainingArguments` flag works (`--help` lists them); a single `.json` or `.yaml` argument is read as a file of
arguments.
"""

import logging
import sys

import torch.distributed as dist

from hf_vit_custom.checkpointing import TrainingInterrupted
from hf_vit_custom.pretraining import PretrainingArguments, pretrain, print_pretraining_results
from hf_vit_custom.training import DataArguments, ModelArguments, parse_arguments


def main(args: list[str] | None = None) -> dict:
    dataclass_types = (ModelArguments, DataArguments, PretrainingArguments)
    model_args, data_args, training_args = parse_arguments(dataclass_types, sys.argv[1:] if args is None else args)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    logging.getLogger("hf_vit_custom").setLevel(logging.INFO if training_args.should_log else logging.WARNING)

    try:
        metrics = pretrain(model_args, data_args, training_args)
    except TrainingInterrupted as interruption:  # Ctrl-C: say what survived instead of a traceback
        print(interruption, file=sys.stderr)
        raise SystemExit(130) from None

    if training_args.process_index == 0:
        print_pretraining_results(metrics, training_args.output_dir)
    if dist.is_initialized():
        # Ending every rank together avoids the occasional hang or crash in gloo's teardown.
        dist.barrier()
        dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()
