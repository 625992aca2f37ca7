"""Train a ViT image classifier with `transformers.Trainer`.

With no arguments it trains on the bundled 8x8 digits, evaluates on the held-out test split, saves the model to
`outputs/vit-digits`, reloads it through `AutoModelForImageClassification` and classifies a few test images with
`pipeline`. Every `TrainingArguments` flag works (`--help` lists them); a single `.json` or `.yaml` argument is read
as a file of arguments. Several processes:

    torchrun --nproc_per_node 2 scripts/train.py
    accelerate launch --config_file scripts/configs/ddp.yaml scripts/train.py
"""

from hf_vit_custom.cli import run
from hf_vit_custom.training import (
    DataArguments,
    ModelArguments,
    ViTTrainingArguments,
    print_results,
    run_script,
    train,
)


def main(args: list[str] | None = None) -> dict:
    return run_script((ModelArguments, DataArguments, ViTTrainingArguments), train, print_results, args)


if __name__ == "__main__":
    run(main)
