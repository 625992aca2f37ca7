"""Masked-image-modeling pre-training (MAE, He et al., 2021, arXiv 2111.06377) with `transformers.Trainer`.

The data, the image processor, the augmentation and the checkpoint handling are the classifier's (`training.py`,
`data.py`); only the model (`ViTCustomForMaskedImageModeling`) and the batches differ: the labels are loaded, because
the shared pipeline validates them, but never reach the model. The model's settings, `mask_ratio` and the decoder's
size among them, are config fields, set like any other (`--config_overrides mask_ratio=0.6`). The saved folder
fine-tunes with `scripts/train.py --model_name_or_path FOLDER`: the encoder is reused as it is and only the classifier
head is new.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers import AutoModelForMaskedImageModeling, set_seed

from .data import collate_fn
from .training import (
    DataArguments,
    ModelArguments,
    ViTTrainer,
    ViTTrainingArguments,
    prepare_data_and_model,
    prepare_output_folder,
    train_save_and_evaluate,
    trainer_callbacks,
)

logger = logging.getLogger(__name__)


@dataclass
class PretrainingArguments(ViTTrainingArguments):
    """`ViTTrainingArguments` with MAE's optimiser settings and a schedule that pre-trains the digits model on a CPU."""

    output_dir: str | None = field(default="outputs/vit-digits-mae", metadata={"help": "Where everything is written."})
    num_train_epochs: float = field(default=100.0, metadata={"help": "Passes over the training set."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW's beta2 (0.95 in the MAE paper)."})
    # Trainer computes an evaluation loss only for batches that hold its `label_names`; MAE's targets are the pixels.
    label_names: list[str] | None = field(
        default_factory=lambda: ["pixel_values"], metadata={"help": "Inputs Trainer treats as the targets."}
    )

    def __post_init__(self):
        # Early stopping watches the reconstruction loss: there is no accuracy to watch.
        if self.early_stopping_patience is not None:
            self.metric_for_best_model = self.metric_for_best_model or "loss"
        fine_tuning_recipes = {
            "layer_decay": self.layer_decay is not None,
            "mixup_alpha": self.mixup_alpha > 0,
            "cutmix_alpha": self.cutmix_alpha > 0,
            "label_smoothing_factor": self.label_smoothing_factor > 0,
        }
        if used := [f"--{name}" for name, given in fine_tuning_recipes.items() if given]:
            raise ValueError(
                f"{', '.join(used)}: fine-tuning recipes for a classifier; MAE pre-training reconstructs pixels. "
                "Use them with scripts/train.py when fine-tuning the pre-trained model."
            )
        super().__post_init__()


def collate_pixel_values(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """`collate_fn` without the labels: pre-training learns from the pixels alone."""
    return {"pixel_values": collate_fn(examples)["pixel_values"]}


def pretrain(model_args: ModelArguments, data_args: DataArguments, training_args: PretrainingArguments) -> dict:
    """Pre-train, evaluate the reconstruction loss on validation and test, save model and processor; return metrics.

    The metrics hold `eval_loss` and `test_loss` (mean squared error on the masked patches, with fresh random masks)
    and Trainer's `train_*` entries, `train_runtime` among them.
    """
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    # An image folder is read as unlabeled images, flat or in sub-folders; the digits keep their (unused) labels.
    prepared = prepare_data_and_model(
        model_args, data_args, training_args, AutoModelForMaskedImageModeling, labeled=False
    )
    datasets = prepared.model_inputs(training_args.seed)
    prepare_output_folder(prepared.model, training_args)
    trainer = ViTTrainer(
        model=prepared.model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=collate_pixel_values,
        processing_class=prepared.image_processor,
        callbacks=trainer_callbacks(training_args),
    )
    metrics = train_save_and_evaluate(trainer, training_args, datasets.get("test"))
    return metrics


def print_pretraining_results(metrics: dict, output_dir: str) -> None:
    """Print the reconstruction losses and how to fine-tune the result, at the end of the pre-training script."""
    print(
        f"\nReconstruction loss: validation {metrics.get('eval_loss', float('nan')):.4f}, "
        f"test {metrics.get('test_loss', float('nan')):.4f}  "
        f"(pre-trained in {metrics.get('train_runtime', float('nan')):.0f} s, saved to {output_dir})"
    )
    print(f"Fine-tune with: python scripts/train.py --model_name_or_path {output_dir}")


__all__ = [
    "PretrainingArguments",
    "collate_pixel_values",
    "pretrain",
    "print_pretraining_results",
]
