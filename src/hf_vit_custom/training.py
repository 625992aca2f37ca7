"""Training glue shared by the Trainer and Accelerate entry points: arguments, model set-up, optimiser groups."""

import difflib
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from datasets import DatasetDict
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    BaseImageProcessor,
    EarlyStoppingCallback,
    HfArgumentParser,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    pipeline,
    set_seed,
)

from .cli import raise_usage_errors
from .configuration_vit_custom import ViTCustomConfig, to_pair
from .cpu_speed import optimize_for_cpu
from .data import (
    ImageClassificationTransform,
    PerExampleSeededDataset,
    build_datasets,
    check_same_classes,
    collate_fn,
    default_image_processor,
    label_maps,
)
from .fp8 import fp8_recipe, fp8_unavailable_reason
from .hub import push_model_folder
from .metrics import build_compute_metrics
from .persistence import (
    TRAINER_CHECKPOINTS,
    CheckpointScheme,
    TrainingInterrupted,
    check_checkpoint_fits,
    check_output_folder,
    check_output_folder_is_free,
    discard_incomplete_checkpoints,
    full_disk_error,
    interrupted_message,
    newest_complete_checkpoint,
    resolve_resume_checkpoint,
    training_footprint,
)
from .recipes import (
    SOFT_LABELS,
    MixupCutmix,
    WeightAverage,
    layer_id,
    layer_learning_rates,
    soft_target_cross_entropy,
    weights_of,
)
from .streaming import (
    StreamedTrainingSet,
    load_stream_state,
    load_streamed_splits,
    save_stream_state,
    split_for_process,
    streamed_data_loader,
)
from .visualize import save_attention_grid

logger = logging.getLogger(__name__)

# A ViT sized for the bundled 8x8 digits. The processor upsamples them to 16x16, so that random resized crops move
# strokes by fractions of a source pixel instead of destroying them; 4x4 patches give 16 tokens plus the class token.
DIGITS_CONFIG = {
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,  # `pipeline` hands the processor RGB images, so the grayscale digits are read as RGB too
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    # The MAE decoder (used only by pre-training): narrower and shallower than the encoder, as in the paper, where a
    # light decoder is enough because only the encoder is kept.
    "decoder_hidden_size": 32,
    "decoder_num_hidden_layers": 2,
    "decoder_num_attention_heads": 4,
    "decoder_intermediate_size": 64,
}
# Trained from scratch on anything else unless `--config_name` says otherwise.
DEFAULT_PRESET = "vit-tiny-patch16-224"
# The training images/s the data loaders must feed on a GPU: ViT-B/16, bf16, batch 256, compiled, on an H200 (the
# README's GPU table).
GPU_TRAINING_IMAGES_PER_S = 3493.0
# One data-loader worker's training-transform rate, `scripts/benchmark.py --data` on a 2-core AMD EPYC (254 images/s
# at 224 px from 640x427 JPEGs); sets how many workers a GPU gets by default.
TRANSFORM_IMAGES_PER_S_PER_WORKER = 254.0
# Hyper-parameters the model card lists.
HUB_HYPERPARAMETERS = ("learning_rate", "num_train_epochs", "per_device_train_batch_size", "weight_decay", "seed")
# Learned tokens that act like embeddings: decaying them towards zero only erases what they encode (timm's
# `no_weight_decay()` excludes the prefix tokens and positions; the attention pool's query and the MAE decoder's mask
# token are of the same kind).
NO_DECAY_PARAMETERS = (
    "cls_token",
    "distillation_token",
    "register_tokens",
    "position_embeddings",
    "probe",
    "mask_token",
)
ATTENTION_MAPS_NAME = "attention_maps.png"
# A model folder's weights, in the layouts `from_pretrained` reads (the index files of sharded ones included).
WEIGHT_FILE_NAMES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Heads whose size follows the data's labels, so a checkpoint's may differ before the data is read.
HEAD_PREFIXES = ("classifier.", "distillation_classifier.")
# Config fields whose default is None, which `--config_overrides` parses as floats (or `none`).
OPTIONAL_CONFIG_FIELDS = ("layer_scale_init_value",)


@dataclass
class ModelArguments:
    """Which model to train: a checkpoint to fine-tune, or a configuration to train from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Checkpoint to fine-tune: a local folder or a Hub id."}
    )
    config_name: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch: a preset such as 'vit-small-patch16-224', or a config folder / Hub id. "
            "Defaults to a small ViT for the bundled digits, or 'vit-tiny-patch16-224' for other data."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated config overrides, applied last, e.g. 'hidden_size=128,drop_path_rate=0.1', or "
            "'mask_ratio=0.6' for pre-training."
        },
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor folder or Hub id; defaults to the model's own."}
    )
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention backend: eager, sdpa, flash_attention_2 or flex_attention."}
    )
    model_revision: str = field(default="main", metadata={"help": "Branch, tag or commit of a Hub checkpoint."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are cached."})


@dataclass
class DataArguments:
    """Where the images come from. With none of `dataset_name` / `train_dir`, the bundled digits are used."""

    dataset_name: str | None = field(default=None, metadata={"help": "A data set on the Hub (online or cached)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of `dataset_name`."})
    train_dir: str | None = field(default=None, metadata={"help": "Image folder, one sub-folder per class."})
    validation_dir: str | None = field(
        default=None, metadata={"help": "Validation image folder; otherwise a split of the training data."}
    )
    image_column: str = field(default="image", metadata={"help": "Column holding the images."})
    label_column: str = field(default="label", metadata={"help": "Column holding the class labels."})
    validation_size: float = field(default=0.1, metadata={"help": "Share of train held out when no validation."})
    skip_bad_images: bool = field(
        default=False,
        metadata={"help": "Leave out image files that do not decode, with a warning naming each, instead of refusing."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set (debugging)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation sets."})
    horizontal_flip: bool = field(
        default=False, metadata={"help": "Augment with horizontal flips (wrong for digits and text)."}
    )
    min_crop_scale: float = field(
        default=0.7, metadata={"help": "Smallest area share kept by the random resized crop (1.0 disables it)."}
    )
    trivial_augment: bool = field(
        default=False,
        metadata={"help": "TrivialAugment (wide) after the crop: one of 14 operations per image at a random strength."},
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training split of `--dataset_name` (a Hub id, or a folder of Parquet or WebDataset "
            ".tar shards) instead of caching it; trains for `--max_steps`. The evaluation splits are read into memory."
        },
    )
    shuffle_block_size: int = field(
        default=1000,
        metadata={"help": "--streaming: examples shuffled together (in blocks, so that a resumed run is exact)."},
    )


@dataclass
class ViTTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults that train the digits model well on a laptop CPU."""

    output_dir: str | None = field(default="outputs/vit-digits", metadata={"help": "Where everything is written."})
    num_train_epochs: float = field(default=60.0, metadata={"help": "Passes over the training set."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "Decoupled weight decay of the weight matrices."})
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a share of all steps if < 1."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule after warm-up."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate: no, steps or epoch."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to checkpoint: no, steps or epoch."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept on disk."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    # Same annotation as the parent's: HfArgumentParser reads the optional type from the union's first member.
    report_to: None | str | list[str] = field(  # noqa: RUF036
        default="tensorboard", metadata={"help": "Loggers: tensorboard, none."}
    )
    # `with_transform` needs the raw image column, which Trainer would otherwise drop before the transform runs.
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the raw columns for the transform."})
    num_demo_predictions: int = field(
        default=8,
        metadata={
            "help": "Test images classified by the reloaded model and drawn over their attention maps (0 to skip)."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without a better `metric_for_best_model` (accuracy)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the model and checkpoints an earlier run left in `--output_dir` (refused without it, "
            "unless resuming)."
        },
    )

    layer_decay: float | None = field(
        default=None,
        metadata={
            "help": "Layer-wise learning-rate decay: each encoder layer trains at this times the rate of the one "
            "above it, the head at `--learning_rate` (0.65-0.75 fine-tunes MAE and DINOv2 encoders)."
        },
    )
    mixup_alpha: float = field(
        default=0.0, metadata={"help": "Mixup: Beta(alpha, alpha) of the mixing coefficient (DeiT: 0.8; 0 is off)."}
    )
    cutmix_alpha: float = field(
        default=0.0,
        metadata={
            "help": "CutMix: Beta(alpha, alpha) of the pasted area (DeiT: 1.0; 0 is off); with Mixup, half "
            "the batches each."
        },
    )
    ema_decay: float | None = field(
        default=None,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay per optimiser step (e.g. "
            "0.999), saved as its own model in `output_dir/ema`."
        },
    )

    dataloader_num_workers: int | None = field(
        default=None,
        metadata={
            "help": "Data-loader worker processes per training process. Default: on a GPU, the workers that feed "
            "it at the README's H200 rate, bounded by this process's share of the CPUs; on a CPU, 0 (the training "
            "needs the cores)."
        },
    )

    fp8: bool = field(
        default=False,
        metadata={
            "help": "Train the transformer blocks' linear layers in FP8 (torchao through Accelerate), the rest under "
            "bf16 autocast: needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, L40S, H100, H200, B200) "
            "and torchao; fastest with --torch_compile true."
        },
    )

    # The model has no unused parameters (every module takes part in the forward), so DDP can skip the search.
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "DDP's unused-parameter search."})

    def __post_init__(self):
        if self.hub_token is not None:
            # Trainer pickles the arguments into every checkpoint's training_args.bin, and a flag ends up in the
            # shell history and the process list.
            raise ValueError(
                "Pass the Hub token through the HF_TOKEN environment variable or `hf auth login`, not "
                "`--hub_token`: the token would be saved with every checkpoint."
            )
        # Without an accelerator, Trainer sets up `torchrun` workers as a process group but trains each alone
        # (parallel_mode stays NOT_PARALLEL); `use_cpu` makes them a real DDP group over gloo.
        if not self.use_cpu and not torch.accelerator.is_available():
            self.use_cpu = True
        if self.dataloader_num_workers is None:
            self.dataloader_num_workers = default_dataloader_workers(self.use_cpu)
        if self.early_stopping_patience is not None:
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "accuracy"
        self.check_training_values()
        super().__post_init__()
        if self.mixed_precision == "fp8":  # `accelerate launch --mixed_precision fp8`: the same checks and layers
            self.fp8 = True
        if self.fp8:
            if (reason := fp8_unavailable_reason(self.use_cpu)) is not None:
                raise ValueError(reason)
            self.mixed_precision = "fp8"  # what Trainer and the Accelerate loop hand to `Accelerator`

    def check_training_values(self) -> None:
        """Refuse values with which nothing, or nothing sensible, would be trained, before any data is loaded."""
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`--{name}` must be at least 1, got {getattr(self, name)}.")
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:  # 0 freezes the model: allowed
            raise ValueError(f"`--learning_rate` must be a finite number >= 0, got {self.learning_rate}.")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"`--layer_decay` must lie in (0, 1], got {self.layer_decay}.")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`--{name}` must be a finite number >= 0 (0 is off), got {getattr(self, name)}.")
        if not 0.0 <= self.label_smoothing_factor < 1.0:
            raise ValueError(f"`--label_smoothing_factor` must lie in [0, 1), got {self.label_smoothing_factor}.")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"`--ema_decay` must lie strictly between 0 and 1, got {self.ema_decay}.")
        if self.fp8 and self.fp16:
            raise ValueError("`--fp8` runs what it does not convert under bf16 autocast: leave out `--fp16`.")
        if self.ema_decay is not None and (self.fsdp or self.deepspeed):
            raise ValueError(
                "`--ema_decay` keeps a whole copy of the weights on every process, which sharded training (FSDP, "
                "DeepSpeed) does not have; train without it or without sharding."
            )
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError(
                f"Nothing would be trained: `--num_train_epochs` is {self.num_train_epochs} and `--max_steps` is "
                f"{self.max_steps}; give a positive number of epochs (or steps)."
            )


def default_dataloader_workers(use_cpu: bool) -> int:
    """0 on a CPU; on a GPU, enough one-thread workers for `GPU_TRAINING_IMAGES_PER_S` at the training transform's
    rate per worker (`TRANSFORM_IMAGES_PER_S_PER_WORKER`), bounded by this process's share of the CPUs (one CPU
    left to the training process itself)."""
    if use_cpu:
        return 0
    processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    # The CPUs this process may run on (a container's or `taskset`'s share); macOS has no affinity, only a count.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus_per_process = cpus // max(processes_here, 1)
    return max(min(math.ceil(GPU_TRAINING_IMAGES_PER_S / TRANSFORM_IMAGES_PER_S_PER_WORKER), cpus_per_process - 1), 0)


def parse_arguments(dataclass_types: tuple[type, ...], args: list[str]) -> tuple:
    """Parse command-line flags, or one `.json` / `.yaml` file holding them, into `dataclass_types`."""
    parser = raise_usage_errors(HfArgumentParser(dataclass_types))
    if len(args) == 1 and args[0].endswith(".json"):
        return parser.parse_json_file(args[0])
    if len(args) == 1 and args[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(args[0])
    return parser.parse_args_into_dataclasses(args=args)


def print_results(metrics: dict, output_dir: str) -> None:
    """Print the test accuracy and the demo predictions at the end of a training script."""
    world_size = f"world size {metrics['world_size']}, " if "world_size" in metrics else ""
    print(f"\nTest accuracy: {metrics.get('test_accuracy', float('nan')):.4f}  ({world_size}saved to {output_dir})")
    for row in metrics.get("demo_predictions", []):
        print(f"  predicted {row['predicted']:>8}  true {row['true']:>8}  score {row['score']:.3f}")


def decay_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that get weight decay: weight matrices and convolution kernels only.

    Biases, LayerNorm parameters, the class token and the position embeddings are left alone (transformers'
    default decays everything that is not a LayerNorm or bias, position embeddings included).
    """
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.ndim >= 2 and not name.endswith(NO_DECAY_PARAMETERS)
    ]


def optimizer_parameter_groups(
    model: torch.nn.Module, weight_decay: float, learning_rate: float | None = None, layer_decay: float | None = None
) -> list[dict]:
    """AdamW parameter groups built from `decay_parameter_names`, for loops that make their own optimiser.

    With `layer_decay`, each (layer, decay) pair is a group with its own `lr` from `recipes.layer_learning_rates`
    (`learning_rate` at the head); the schedule then scales every group's rate alike.
    """
    decay = set(decay_parameter_names(model))
    parameters = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if layer_decay is None:
        return [
            {"params": [p for name, p in parameters if name in decay], "weight_decay": weight_decay},
            {"params": [p for name, p in parameters if name not in decay], "weight_decay": 0.0},
        ]
    num_layers = model.config.num_hidden_layers
    rates = layer_learning_rates(learning_rate, layer_decay, num_layers)
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in parameters:
        key = (layer_id(name, num_layers), name in decay)
        group = groups.setdefault(
            key, {"params": [], "weight_decay": weight_decay if key[1] else 0.0, "lr": rates[key[0]]}
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups)]


class EpochSeedCallback(TrainerCallback):
    """Tell a `PerExampleSeededDataset` which epoch starts (Accelerate forwards `set_epoch` only to the sampler)."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        dataset = getattr(train_dataloader, "dataset", None)
        if isinstance(dataset, PerExampleSeededDataset):
            # `state.epoch` is the finished fraction of training: whole at an epoch start, fractional on a resume.
            dataset.set_epoch(math.floor(state.epoch + 1e-9))


class WeightAverageCallback(TrainerCallback):
    """Update a `recipes.WeightAverage` after every optimiser step."""

    def __init__(self, average: WeightAverage):
        self.average = average

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.average.update(model)


class ViTTrainer(Trainer):
    """Trainer whose optimiser decays only the parameters `decay_parameter_names` selects (with layer-wise learning
    rates under `--layer_decay`), which trains on Mixup / CutMix's soft labels when the batch has them, keeps the
    weight average of `--ema_decay` in its checkpoints, trains the layers `fp8.converts_to_fp8` picks in FP8 under
    `--fp8`, and whose evaluation leaves the training's random stream alone.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stream_loader = None
        self.weight_average = None
        if self.args.ema_decay is not None:
            if self.is_fsdp_enabled or self.is_deepspeed_enabled:  # enabled by `accelerate launch`'s config
                raise ValueError("`--ema_decay` cannot be used with sharded training (FSDP, DeepSpeed).")
            self.weight_average = WeightAverage(self.model, self.args.ema_decay)
            self.add_callback(WeightAverageCallback(self.weight_average))

    def _build_accelerator_args(self, **kwargs) -> dict:
        # Trainer's one place for the `Accelerator`'s arguments; `--fp8` adds the recipe that picks the FP8 layers.
        accelerator_args = super()._build_accelerator_args(**kwargs)
        if self.args.fp8:
            accelerator_args["kwargs_handlers"] = [*accelerator_args.get("kwargs_handlers", []), fp8_recipe()]
        return accelerator_args

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return decay_parameter_names(model)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None and self.args.layer_decay is not None:
            model = self.model if model is None else model
            optimizer_class, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = optimizer_parameter_groups(
                model, self.args.weight_decay, self.args.learning_rate, self.args.layer_decay
            )
            self.optimizer = optimizer_class(groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if SOFT_LABELS not in inputs:  # Trainer's own loss, smoothed by `label_smoothing_factor`
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(pixel_values=inputs["pixel_values"])
        loss = soft_target_cross_entropy(outputs.logits, inputs[SOFT_LABELS])
        return (loss, outputs) if return_outputs else loss

    def get_train_dataloader(self):
        """A streamed training set gets a stateful loader of its own, not prepared by Accelerate: every process
        already reads its own part of the stream (Accelerate would have one process read and send out all batches),
        and its state goes into the checkpoints (`_save_optimizer_and_scheduler`)."""
        if not isinstance(self.train_dataset, StreamedTrainingSet):
            return super().get_train_dataloader()
        self.stream_loader = streamed_data_loader(
            self.train_dataset, self.args.dataloader_num_workers, self.args.dataloader_pin_memory
        )
        return self.stream_loader

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        # Before `trainer_state.json`, the file that marks a checkpoint complete.
        super()._save_optimizer_and_scheduler(output_dir)
        if self.weight_average is not None and self.args.should_save:
            self.weight_average.save(output_dir)
        if self.stream_loader is not None:  # every process: each reads its own part of the stream
            os.makedirs(output_dir, exist_ok=True)  # the main process may not have made it yet (as for RNG states)
            save_stream_state(self.stream_loader, output_dir, self.args.process_index)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.weight_average is not None and checkpoint is not None:
            self.weight_average.resume(checkpoint, self.model)
        if self.stream_loader is not None and checkpoint is not None:
            load_stream_state(self.stream_loader, checkpoint, self.args.process_index)

    def evaluate(self, *args, **kwargs) -> dict[str, float]:
        """Evaluate without touching the global random generator that dropout and stochastic depth draw from.

        The evaluation data loader draws a seed from it. A checkpoint saved at an epoch's last step comes before that
        epoch's evaluation, so a run resumed from it would otherwise draw different dropout masks from then on.
        """
        device = self.args.device
        accelerators = [] if device.type == "cpu" else [device.index or 0]  # the CPU generator is always forked
        with torch.random.fork_rng(devices=accelerators, device_type=device.type):
            return super().evaluate(*args, **kwargs)


def resolve_config(model_args: ModelArguments, uses_default_data: bool, **fields) -> ViTCustomConfig:
    """The one path to a model's config: its source, then `fields` (the data's labels), then `--config_overrides`.

    The source is the checkpoint to fine-tune (`--model_name_or_path`), else `--config_name` (a preset name, or a
    config folder or Hub id), else the default for the data: `DIGITS_CONFIG` for the bundled digits,
    `DEFAULT_PRESET` for anything else. Fine-tuning and training from scratch thus build their configs alike.
    """
    source = model_args.model_name_or_path or model_args.config_name or (None if uses_default_data else DEFAULT_PRESET)
    if source is None:
        config = ViTCustomConfig(**DIGITS_CONFIG, **fields)
    elif model_args.model_name_or_path or os.path.exists(source) or "/" in source:
        hub_kwargs = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir}
        config = AutoConfig.from_pretrained(source, **hub_kwargs, **fields)
    else:
        config = ViTCustomConfig.from_preset(source, **fields)
    if not isinstance(config, ViTCustomConfig):
        raise ValueError(
            f"{source!r} holds a {config.model_type!r} model, not a vit_custom one; convert it first with "
            "scripts/convert_checkpoint.py."
        )
    if model_args.config_overrides:
        apply_config_overrides(config, model_args.config_overrides)
        config.validate_vit_values()  # a plain `ValueError` naming the field
        config.validate()
    return config


def apply_config_overrides(config: ViTCustomConfig, overrides: str) -> None:
    """Apply `key=value,key=value` to `config`, each value parsed as the field's type; a `ValueError` names a key that
    does not exist (and the nearest that does) or a value that does not parse. `none` sets an optional field to None.
    """
    for item in overrides.split(","):
        key, separator, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not separator or not key:
            raise ValueError(f"`--config_overrides` takes key=value pairs separated by commas, got {item!r}.")
        fields = config.to_dict()
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"`--config_overrides`: the config has no field {key!r}{hint}")
        current = getattr(config, key)
        try:
            if text.lower() == "none" and key in OPTIONAL_CONFIG_FIELDS:
                value = None
            elif isinstance(current, bool):
                value = {"true": True, "1": True, "false": False, "0": False}[text.lower()]
            elif isinstance(current, int):
                value = int(text)
            elif isinstance(current, float) or key in OPTIONAL_CONFIG_FIELDS:
                value = float(text)
            elif isinstance(current, (list, tuple)):
                value = [int(part) for part in text.split("x")]
            else:
                value = text
        except (KeyError, ValueError):
            kind = type(current).__name__ if current is not None else "float"
            raise ValueError(f"`--config_overrides`: {key}={text!r} is not a valid {kind}.") from None
        setattr(config, key, value)


def build_model_and_processor(
    model_args: ModelArguments,
    uses_default_data: bool,
    id2label: dict[int, str],
    auto_class: type = AutoModelForImageClassification,
):
    """A classifier (or another `auto_class` model) for the data's labels and the image processor that feeds it.

    Fine-tuning a checkpoint whose label set differs replaces its head (`ignore_mismatched_sizes`); overrides that
    would reshape any other weight are refused.
    """
    labels = {
        "num_labels": len(id2label),
        "id2label": id2label,
        "label2id": {label: index for index, label in id2label.items()},
    }
    config = resolve_config(model_args, uses_default_data, **labels)
    if not model_args.model_name_or_path:
        model = auto_class.from_config(config, attn_implementation=model_args.attn_implementation)
        if model_args.image_processor_name:
            return model, AutoImageProcessor.from_pretrained(model_args.image_processor_name)
        return model, default_image_processor(to_pair(config.image_size), config.num_channels)
    hub_kwargs = {"revision": model_args.model_revision, "cache_dir": model_args.cache_dir}
    model, loading_info = auto_class.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=True,  # only the head may be replaced: checked below
        attn_implementation=model_args.attn_implementation,
        output_loading_info=True,
        **hub_kwargs,
    )
    model.check_encoder_loaded(model_args.model_name_or_path, loading_info)
    reshaped = [key for key, *_ in loading_info["mismatched_keys"] if key.startswith(f"{model.base_model_prefix}.")]
    if reshaped:
        raise ValueError(
            f"The config of {model_args.model_name_or_path!r} with `--config_overrides` "
            f"{model_args.config_overrides!r} no longer fits {len(reshaped)} of its encoder weights (e.g. "
            f"{reshaped[:3]}); override only fields that keep the shapes, such as dropout rates."
        )
    processor_source = model_args.image_processor_name or model_args.model_name_or_path
    try:
        image_processor = AutoImageProcessor.from_pretrained(processor_source, **hub_kwargs)
    except OSError:
        logger.warning("No image processor in %s: using defaults for the model's size.", processor_source)
        image_processor = default_image_processor(to_pair(config.image_size), config.num_channels)
    return model, image_processor


def plot_training_curve(log_history: list[dict], path: str | os.PathLike) -> None:
    """Save training / validation loss and validation accuracy against the step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluation = [entry for entry in log_history if "eval_loss" in entry]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        loss_axis.plot(*zip(*train, strict=True), label="train")
    if evaluation:
        loss_axis.plot([e["step"] for e in evaluation], [e["eval_loss"] for e in evaluation], label="validation")
        accuracy_axis.plot([e["step"] for e in evaluation], [e.get("eval_accuracy") for e in evaluation], "o-")
    loss_axis.set(xlabel="step", ylabel="loss", title="Loss")
    loss_axis.legend()
    accuracy_axis.set(xlabel="step", ylabel="accuracy", title="Validation accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def reload_and_predict(model_dir: str | os.PathLike, dataset) -> list[dict[str, str]]:
    """Load a saved model the way a user would (Auto classes, `pipeline`) and classify `dataset`'s images.

    Also draws the images over their attention rollout, with predicted and true labels, into
    `model_dir/attention_maps.png`. Returns one `{"predicted", "true", "score"}` row per image.
    """
    model = AutoModelForImageClassification.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    classifier = pipeline("image-classification", model=model, image_processor=image_processor)
    save_attention_grid(
        model, image_processor, dataset["image"], dataset["label"], Path(model_dir) / ATTENTION_MAPS_NAME
    )
    names = dataset.features["label"].names
    predictions = classifier(list(dataset["image"]), top_k=1)
    return [
        {"predicted": prediction[0]["label"], "true": names[label], "score": round(prediction[0]["score"], 4)}
        for prediction, label in zip(predictions, dataset["label"], strict=True)
    ]


@dataclass
class PreparedData:
    """The raw (untransformed, truncated) splits, the model, and the transforms that make the splits model inputs."""

    splits: DatasetDict
    model: PreTrainedModel
    image_processor: BaseImageProcessor
    train_transform: ImageClassificationTransform
    eval_transform: ImageClassificationTransform
    batch_mixer: MixupCutmix | None = None
    streamed_train: StreamedTrainingSet | None = None  # `--streaming`: the training batches, in place of `splits`'

    def model_inputs(self, seed: int) -> dict[str, torch.utils.data.Dataset]:
        """The splits with their transforms attached, as `Trainer` takes them."""
        # Crops are seeded per example from (seed, epoch, index), so a run resumed from any checkpoint, even mid-epoch
        # where the data loader had already prefetched the next batch, draws exactly the crops of an uninterrupted run.
        train = self.streamed_train or PerExampleSeededDataset(
            self.splits["train"], self.train_transform, seed, self.batch_mixer
        )
        datasets = {"train": train}
        for split in ("validation", "test"):
            if split in self.splits:
                datasets[split] = self.splits[split].with_transform(self.eval_transform)
        return datasets


def check_before_loading_data(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ViTTrainingArguments,
    auto_class: type,
    checkpoint_scheme: CheckpointScheme,
    labeled: bool = True,
) -> None:
    """Refuse what can be refused before the data loads, which takes long and prints progress: an output folder of
    another run, the model's config (its source, `--config_overrides`) and weights, the checkpoint to resume (it must
    exist and fit the model's encoder), and a validation folder whose classes differ from the training folder's
    (`labeled` folders only: unlabeled ones have no classes).
    """
    if training_args.should_save:
        resuming = training_args.resume_from_checkpoint is not None
        check_output_folder_is_free(
            training_args.output_dir, checkpoint_scheme, resuming, training_args.overwrite_output_dir
        )
    uses_default_data = data_args.dataset_name is None and data_args.train_dir is None
    config = resolve_config(model_args, uses_default_data)
    source = model_args.model_name_or_path
    if source and os.path.isdir(source) and not any((Path(source) / name).is_file() for name in WEIGHT_FILE_NAMES):
        raise OSError(f"The model folder {source!r} holds no weights (model.safetensors or pytorch_model.bin).")
    checkpoint = resolve_resume_checkpoint(
        training_args.resume_from_checkpoint, training_args.output_dir, checkpoint_scheme
    )
    if checkpoint is not None:
        with torch.device("meta"):  # shapes only; the head's size waits for the data's labels
            model = auto_class.from_config(config)
        check_checkpoint_fits(checkpoint, model, ignore_prefixes=HEAD_PREFIXES)
    if labeled and data_args.train_dir and data_args.validation_dir and os.path.isdir(data_args.train_dir):
        check_same_classes(data_args.train_dir, data_args.validation_dir)
    if data_args.streaming:
        check_streaming_arguments(data_args, training_args, labeled)


def check_streaming_arguments(data_args: DataArguments, training_args: ViTTrainingArguments, labeled: bool) -> None:
    """`--streaming` needs a data set to stream, a length in steps, and step-based evaluation and checkpoints: a
    stream has no epochs."""
    if not labeled or data_args.dataset_name is None:
        raise ValueError(
            "`--streaming` streams the labelled data set of `--dataset_name` (a Hub id or a folder of Parquet / "
            "WebDataset shards); image folders, the digits and pre-training are read without it."
        )
    if training_args.max_steps <= 0:
        raise ValueError("A streamed run has no epochs to count: give its length with `--max_steps`.")
    for name in ("eval_strategy", "save_strategy"):
        if getattr(training_args, name) == "epoch":
            raise ValueError(f"A stream has no epochs: with `--streaming`, set `--{name}` to steps (or no).")
    if data_args.shuffle_block_size < 1:
        raise ValueError(f"`--shuffle_block_size` must be at least 1, got {data_args.shuffle_block_size}.")


def prepare_data_and_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: ViTTrainingArguments,
    auto_class: type = AutoModelForImageClassification,
    labeled: bool = True,
    checkpoint_scheme: CheckpointScheme = TRAINER_CHECKPOINTS,
) -> PreparedData:
    """Load and validate the data, build the model for its labels, and the transforms: shared by both training loops
    and by pre-training (`auto_class` as in `build_model_and_processor`; `labeled=False` reads an image folder as
    unlabeled images, see `data.build_datasets`). A run on the CPU gets the model with `optimize_for_cpu` applied.

    Both loops feed the training split through `PreparedData.model_inputs`, which seeds every example's crop on its
    own, so that a resumed run draws exactly the crops of an uninterrupted one. `check_before_loading_data` runs
    first.
    """
    check_before_loading_data(model_args, data_args, training_args, auto_class, checkpoint_scheme, labeled)
    if data_args.streaming:
        return _prepare_streamed_data_and_model(model_args, data_args, training_args)
    splits = build_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        validation_size=data_args.validation_size,
        seed=training_args.seed,
        cache_dir=model_args.cache_dir,
        labeled=labeled,
        skip_bad_images=data_args.skip_bad_images,
    )
    uses_default_data = data_args.dataset_name is None and data_args.train_dir is None
    id2label, _ = label_maps(splits["train"])
    model, image_processor = build_model_and_processor(model_args, uses_default_data, id2label, auto_class)
    if training_args.use_cpu:
        optimize_for_cpu(model)
    limits = {
        "train": data_args.max_train_samples,
        "validation": data_args.max_eval_samples,
        "test": data_args.max_eval_samples,
    }
    for split, limit in limits.items():
        if limit is not None and split in splits:
            splits[split] = splits[split].select(range(min(limit, len(splits[split]))))
    return PreparedData(splits, model, image_processor, *_transforms(model, image_processor, data_args, training_args))


def _transforms(
    model: PreTrainedModel, image_processor, data_args: DataArguments, training_args: ViTTrainingArguments
) -> tuple[ImageClassificationTransform, ImageClassificationTransform, MixupCutmix | None]:
    """The training transform, the evaluation transform and the batch mixer (Mixup / CutMix, or None)."""
    num_channels = model.config.num_channels
    train_transform = ImageClassificationTransform(
        image_processor,
        num_channels=num_channels,
        train=True,
        horizontal_flip=data_args.horizontal_flip,
        crop_scale=(data_args.min_crop_scale, 1.0) if data_args.min_crop_scale < 1.0 else None,
        trivial_augment=data_args.trivial_augment,
    )
    eval_transform = ImageClassificationTransform(image_processor, num_channels=num_channels, train=False)
    batch_mixer = None
    if training_args.mixup_alpha > 0 or training_args.cutmix_alpha > 0:
        batch_mixer = MixupCutmix(
            model.config.num_labels,
            mixup_alpha=training_args.mixup_alpha,
            cutmix_alpha=training_args.cutmix_alpha,
            label_smoothing=training_args.label_smoothing_factor,
        )
    return train_transform, eval_transform, batch_mixer


def _prepare_streamed_data_and_model(
    model_args: ModelArguments, data_args: DataArguments, training_args: ViTTrainingArguments
) -> PreparedData:
    """`prepare_data_and_model` for `--streaming`: the evaluation splits in memory, the training split as this
    process's part of the stream, batched by `StreamedTrainingSet`."""
    stream, splits = load_streamed_splits(
        data_args.dataset_name,
        data_args.dataset_config_name,
        image_column=data_args.image_column,
        label_column=data_args.label_column,
        max_eval_samples=data_args.max_eval_samples,
        cache_dir=model_args.cache_dir,
    )
    id2label, _ = label_maps(splits["validation"])
    model, image_processor = build_model_and_processor(model_args, False, id2label)
    if training_args.use_cpu:
        optimize_for_cpu(model)
    if data_args.max_train_samples is not None:
        stream = stream.take(data_args.max_train_samples)
    train_transform, eval_transform, batch_mixer = _transforms(model, image_processor, data_args, training_args)
    streamed_train = StreamedTrainingSet(
        split_for_process(stream, training_args.process_index, training_args.world_size),
        train_transform,
        training_args.seed,
        training_args.per_device_train_batch_size,
        model.config.num_labels,
        process_index=training_args.process_index,
        shuffle_block_size=data_args.shuffle_block_size,
        batch_mixer=batch_mixer,
    )
    return PreparedData(splits, model, image_processor, train_transform, eval_transform, batch_mixer, streamed_train)


def prepare_output_folder(model: PreTrainedModel, training_args: TrainingArguments) -> None:
    """Before `Trainer` is built (it creates the folder): check that the output folder can take the run's model and
    checkpoints, and clear away the half-written checkpoint a killed run may have left."""
    if training_args.should_save:
        footprint = training_footprint(
            model.num_parameters(), training_args.save_total_limit, training_args.ema_decay is not None
        )
        check_output_folder(training_args.output_dir, footprint)
        discard_incomplete_checkpoints(training_args.output_dir, TRAINER_CHECKPOINTS)


def run_trainer(trainer: Trainer, training_args: TrainingArguments):
    """`trainer.train()`, resuming from `--resume_from_checkpoint` (`latest`: the newest complete checkpoint).

    Returns `trainer.train()`'s result; Ctrl-C becomes `TrainingInterrupted`, which names the checkpoint that survived.
    """
    output_dir = training_args.output_dir
    checkpoint = resolve_resume_checkpoint(training_args.resume_from_checkpoint, output_dir, TRAINER_CHECKPOINTS)
    if checkpoint is not None:
        check_checkpoint_fits(checkpoint, trainer.model)
    try:
        return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except (OSError, RuntimeError) as error:
        needed = training_footprint(
            trainer.model.num_parameters(), training_args.save_total_limit, training_args.ema_decay is not None
        )
        if (full_disk := full_disk_error(error, output_dir, needed)) is None:
            raise
        if training_args.should_save:
            discard_incomplete_checkpoints(output_dir, TRAINER_CHECKPOINTS)
        raise full_disk from error
    except KeyboardInterrupt:
        if training_args.should_save:
            discard_incomplete_checkpoints(output_dir, TRAINER_CHECKPOINTS)
        newest = newest_complete_checkpoint(output_dir, TRAINER_CHECKPOINTS)
        raise TrainingInterrupted(interrupted_message(newest, output_dir)) from None


def trainer_callbacks(training_args: ViTTrainingArguments) -> list[TrainerCallback]:
    """The epoch-seeding callback, plus early stopping when `--early_stopping_patience` asks for it."""
    callbacks = [EpochSeedCallback()]
    if training_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience))
    return callbacks


def train_save_and_evaluate(trainer: Trainer, training_args: TrainingArguments, test_dataset=None) -> dict:
    """Train (`run_trainer`), save model, processor and state, evaluate on validation (and `test_dataset`), and write
    `all_results.json`; return the metrics."""
    train_result = run_trainer(trainer, training_args)
    logger.info(
        "Trained with world size %d, model wrapped in %s",
        training_args.world_size,
        type(trainer.model_wrapped).__name__,
    )
    trainer.save_model()
    trainer.save_state()
    metrics = dict(train_result.metrics)
    metrics.update(trainer.evaluate(metric_key_prefix="eval"))
    if test_dataset is not None:
        metrics.update(trainer.evaluate(test_dataset, metric_key_prefix="test"))
    if trainer.weight_average is not None:
        if trainer.is_world_process_zero():
            trainer.weight_average.save_model_folder(training_args.output_dir, trainer.processing_class)
        with weights_of(trainer.model, trainer.weight_average.module):
            metrics.update(trainer.evaluate(metric_key_prefix="ema_eval"))
            if test_dataset is not None:
                metrics.update(trainer.evaluate(test_dataset, metric_key_prefix="ema_test"))
    trainer.log_metrics("all", metrics)
    trainer.save_metrics("all", metrics, combined=False)
    return metrics


def run_script(dataclass_types: tuple[type, ...], run, report, args: list[str] | None = None) -> dict:
    """The body of a Trainer script: parse the flags into `dataclass_types`, set up logging, `run(*parsed)`, and
    `report(metrics, output_dir)` on the main process. Ctrl-C ends it with status 130 and a message, not a traceback.
    """
    *other_args, training_args = parse_arguments(dataclass_types, sys.argv[1:] if args is None else args)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=[logging.StreamHandler()])
    logging.getLogger("hf_vit_custom").setLevel(logging.INFO if training_args.should_log else logging.WARNING)
    try:
        metrics = run(*other_args, training_args)
    except TrainingInterrupted as interruption:
        print(interruption, file=sys.stderr)
        raise SystemExit(130) from None
    if training_args.process_index == 0:
        report(metrics, training_args.output_dir)
    if torch.distributed.is_initialized():
        # Ending every rank together avoids the occasional hang or crash in gloo's teardown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def train(model_args: ModelArguments, data_args: DataArguments, training_args: ViTTrainingArguments) -> dict:
    """Train, evaluate on validation and test, save model, processor, metrics and curve; return the metrics."""
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)
    prepared = prepare_data_and_model(model_args, data_args, training_args)
    model, image_processor, splits = prepared.model, prepared.image_processor, prepared.splits
    raw_test = splits.get("test", splits["validation"])  # the demo shows untransformed images
    datasets = prepared.model_inputs(training_args.seed)
    prepare_output_folder(model, training_args)
    if data_args.streaming:  # the loader's own state resumes the stream: Trainer must not also skip batches
        training_args.ignore_data_skip = True

    trainer = ViTTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets["train"],
        eval_dataset=datasets["validation"],
        data_collator=collate_fn,
        processing_class=image_processor,
        compute_metrics=build_compute_metrics(model.config.num_labels),
        callbacks=trainer_callbacks(training_args),
    )
    metrics = train_save_and_evaluate(trainer, training_args, datasets.get("test"))

    if trainer.is_world_process_zero():
        plot_training_curve(trainer.state.log_history, Path(training_args.output_dir) / "training_curve.png")
    if trainer.is_world_process_zero() and training_args.num_demo_predictions:
        metrics["demo_predictions"] = reload_and_predict(
            training_args.output_dir, raw_test.select(range(min(training_args.num_demo_predictions, len(raw_test))))
        )
    if training_args.push_to_hub and trainer.is_world_process_zero():
        # The final commit carries the model card with the test results and the code for `trust_remote_code`.
        push_model_folder(
            training_args.output_dir,
            training_args.hub_model_id or Path(training_args.output_dir).absolute().name,
            private=bool(training_args.hub_private_repo),
            metrics={key: value for key, value in metrics.items() if isinstance(value, (int, float))},
            hyperparameters={key: getattr(training_args, key) for key in HUB_HYPERPARAMETERS},
            dataset=data_args.dataset_name or data_args.train_dir or "sklearn-digits",
        )
    return metrics
