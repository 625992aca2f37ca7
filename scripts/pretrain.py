"""Pre-train a ViT as a masked autoencoder (MAE, He et al., 2021) with `transformers.Trainer`.

With no arguments it pre-trains the digits model on the bundled 8x8 digits, without their labels, reports the
reconstruction loss on the validation and test splits and saves the model and image processor to
`outputs/vit-digits-mae`. Fine-tune the result as a classifier with

    python scripts/train.py --model_name_or_path outputs/vit-digits-mae

`--train_dir` pre-trains on an image folder instead, `--config_overrides mask_ratio=0.6` changes the share of hidden
patches, and every `TrainingArguments` flag works (`--help` lists them); a single `.json` or `.yaml` argument is read as
a file of arguments.
"""

from hf_vit_custom.cli import run
from hf_vit_custom.pretraining import PretrainingArguments, pretrain, print_pretraining_results
from hf_vit_custom.training import DataArguments, ModelArguments, run_script


def main(args: list[str] | None = None) -> dict:
    return run_script((ModelArguments, DataArguments, PretrainingArguments), pretrain, print_pretraining_results, args)


if __name__ == "__main__":
    run(main)
