"""A plain Accelerate training loop over the same model, data and metrics code as the Trainer path.

`train_with_accelerate` is the Accelerate twin of `hf_vit_custom.training.train`: the data sets, the model, the
optimiser's weight-decay groups, the metrics and the demo all come from the shared modules; only the loop is written
out here (`Accelerator.prepare`, `accumulate`, `backward`, `clip_grad_norm_`, `gather_for_metrics`, `save_state` /
`load_state`, `skip_first_batches`, trackers). Launch it the way Accelerate scripts are launched:

    python scripts/train_accelerate.py                                          # one process (CPU or one GPU)
    torchrun --nproc_per_node 2 scripts/train_accelerate.py                     # several processes, also on CPU
    accelerate launch --config_file scripts/configs/ddp.yaml scripts/train_accelerate.py

Reproducibility. Every process draws the same shuffled order from a seedable sampler (seed + epoch). Random
augmentation is seeded per example from (seed, epoch, example index), see `PerExampleSeededDataset`, and every data
loader has its own generator, so torch's global generator serves only the model (dropout, stochastic depth). That is
what makes a run resumed from a mid-epoch checkpoint repeat the uninterrupted run bit for bit, and what makes the
augmentation independent of the number of processes and data-loader workers.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import torch
import torch.nn.functional as F
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpointing import (
    TrainingInterrupted,
    check_output_folder,
    interrupted_message,
    training_footprint,
    write_checkpoint_atomically,
)
from .data import PerExampleSeededDataset, collate_fn
from .hub import push_model_folder
from .metrics import ClassificationMetrics
from .training import (
    HUB_HYPERPARAMETERS,
    DataArguments,
    ModelArguments,
    optimizer_parameter_groups,
    plot_training_curve,
    prepare_data_and_model,
    reload_and_predict,
)

logger = get_logger(__name__)

CHECKPOINT_PREFIX = "step_"
LOG_HISTORY_NAME = "log_history.json"
RESULTS_NAME = "all_results.json"
PROGRESS_NAME = "training_progress.json"


@dataclass
class AccelerateArguments:
    """Options of the Accelerate loop; where they overlap with `ViTTrainingArguments`, the defaults are the same."""

    output_dir: str = field(
        default="outputs/vit-digits-accelerate", metadata={"help": "Where model, checkpoints and logs are written."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the model's initialisation, the shuffling and the crops."})
    num_train_epochs: int = field(default=60, metadata={"help": "Passes over the training set."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Training batch size per process."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Evaluation batch size per process."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "Decoupled weight decay of the weight matrices."})
    optim: Literal["adamw", "sgd"] = field(
        default="adamw", metadata={"help": "adamw (torch.optim.AdamW) or sgd (plain SGD, as Trainer's 'sgd')."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule after warm-up (transformers.get_scheduler)."}
    )
    warmup_steps: float = field(default=0.05, metadata={"help": "Warm-up steps, or a share of all steps if < 1."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches whose gradients are summed before each optimiser step."}
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this (0 disables)."})
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(
        default=None,
        metadata={
            "help": "no, bf16 or fp16. Unset: whatever `accelerate launch` was told (--mixed_precision or the config "
            "file), else no."
        },
    )
    checkpointing_steps: int | None = field(
        default=None, metadata={"help": "Save the whole training state every N optimiser steps to output_dir/step_N."}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A step_N folder to resume from, or 'latest' for the newest in output_dir."}
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the training loss every N optimiser steps."})
    report_to: Literal["tensorboard", "none"] = field(
        default="tensorboard", metadata={"help": "Tracker for the logs (written to output_dir/runs), or none."}
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model and processor to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository for --push_to_hub; defaults to output_dir's name."}
    )
    num_demo_predictions: int = field(
        default=8,
        metadata={
            "help": "Test images classified by the reloaded model and drawn over their attention maps (0 to skip)."
        },
    )
    use_seedable_sampler: bool = field(
        default=True,
        metadata={
            "help": "Shuffle with Accelerate's seedable sampler (seed + epoch), which resuming restores exactly; off, "
            "the order after a resumption differs."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "Data-loading worker processes."})
    dataloader_drop_last: bool = field(default=False, metadata={"help": "Drop the last incomplete training batch."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})

    def __post_init__(self):
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"`gradient_accumulation_steps` must be at least 1, got {self.gradient_accumulation_steps}."
            )
        if self.checkpointing_steps is not None and self.checkpointing_steps < 1:
            raise ValueError(f"`checkpointing_steps` must be at least 1, got {self.checkpointing_steps}.")
        if self.logging_steps < 1:
            raise ValueError(f"`logging_steps` must be at least 1, got {self.logging_steps}.")
        if self.warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must not be negative, got {self.warmup_steps}.")


class TrainingProgress:
    """Where the loop stands; saved as JSON with every checkpoint and restored on resume.

    JSON rather than `register_for_checkpointing`, whose pickle Accelerate loads with `weights_only=False`: a
    checkpoint folder from elsewhere could then run code.
    """

    def __init__(self):
        self.completed_steps = 0  # optimiser steps
        self.epoch = 0  # epoch in progress
        self.batches_in_epoch = 0  # batches of `epoch` already trained on (per process)
        self.loss_sum = 0.0  # sum over the batches so far of the loss averaged over the processes
        self.loss_batches = 0
        self.window_loss_sum = 0.0  # same, since the last logged step
        self.window_batches = 0
        self.log_history: list[dict[str, float]] = []

    def save(self, folder: Path) -> None:
        (folder / PROGRESS_NAME).write_text(json.dumps(vars(self), indent=2) + "\n")

    def load(self, folder: Path) -> None:
        path = folder / PROGRESS_NAME
        if not path.is_file():
            raise ValueError(f"{str(folder)!r} is not a checkpoint of this loop: it has no {PROGRESS_NAME}.")
        vars(self).update(json.loads(path.read_text()))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path:
    """The `step_N` folder with the largest N in `output_dir` (written atomically, so complete)."""
    pattern = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
    found = [
        (int(match.group(1)), path)
        for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if path.is_dir() and (match := pattern.fullmatch(path.name))
    ]
    if not found:
        raise ValueError(f"No checkpoint ({CHECKPOINT_PREFIX}N folder) to resume from in {output_dir}.")
    return max(found)[1]


def evaluate(model, dataloader, accelerator: Accelerator, num_labels: int) -> dict[str, float]:
    """Loss, accuracy, macro F1 (and top-5 accuracy) over every example of a possibly sharded evaluation set.

    `gather_for_metrics` drops the examples that the sharded loader repeats to even out the last batch, so the numbers
    are exact, whatever the process count. The loss is the cross-entropy of the gathered logits (the model's loss for
    single-label classification), summed and divided by the number of examples.
    """
    model.eval()
    metrics = ClassificationMetrics(num_labels)
    loss_sum, count, start = 0.0, 0, time.perf_counter()
    for batch in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        count += len(labels)
        metrics.add_batch(logits, labels)
    runtime = time.perf_counter() - start
    return {
        "loss": loss_sum / count,
        **metrics.compute(),
        "samples": count,
        "runtime": round(runtime, 4),
        "samples_per_second": round(count / runtime, 3),
        "steps_per_second": round(len(dataloader) / runtime, 3),
    }


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def _hparams(*argument_sets) -> dict[str, Any]:
    """The run's arguments as the scalars TensorBoard's hparams accept."""
    values = {}
    for arguments in argument_sets:
        values.update({k: v for k, v in asdict(arguments).items() if isinstance(v, (bool, int, float, str))})
    return values


def train_with_accelerate(model_args: ModelArguments, data_args: DataArguments, args: AccelerateArguments) -> dict:
    """Train with a plain Accelerate loop; evaluate on validation and test; save model, processor and metrics.

    Returns the metrics written to `output_dir/all_results.json` (`train_loss`, `eval_accuracy`, `test_accuracy`,
    ... and `world_size`), plus `demo_predictions` on the main process. Every process returns. At the end the
    process group is destroyed (`end_training`) and Accelerate's process-wide state is reset, also after an error,
    so the function can run again in the same Python process, e.g. with another precision.
    """
    # Accelerate keeps its state process-wide and refuses a second Accelerator with, e.g., another precision: start
    # afresh (a Trainer that ran earlier in this process leaves its state behind) and clean up when done.
    _reset_accelerate_state()
    try:
        accelerator = Accelerator(
            cpu=not torch.accelerator.is_available(),
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with="tensorboard" if args.report_to == "tensorboard" else None,
            project_dir=args.output_dir,
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=args.use_seedable_sampler, data_seed=args.seed
            ),
        )
        return _train(accelerator, model_args, data_args, args)
    except KeyboardInterrupt:
        # A checkpoint being written when Ctrl-C came was dropped with its staging folder; the others are complete.
        try:
            latest = find_latest_checkpoint(args.output_dir)
        except ValueError:
            latest = None
        raise TrainingInterrupted(interrupted_message(latest, args.output_dir)) from None
    finally:
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    # An initialised process group survives this: the next `Accelerator` finds it and does not initialise another.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train(
    accelerator: Accelerator, model_args: ModelArguments, data_args: DataArguments, args: AccelerateArguments
) -> dict:
    tracking = args.report_to == "tensorboard"
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning(
            "Accelerate does not apply fp16 mixed precision on a CPU: this run trains in float32 (bf16 works)."
        )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        check_output_folder(output_dir, needed_bytes=0)  # writable; the room is checked once the model is known
    hub_repo_id = None
    if args.push_to_hub and accelerator.is_main_process:
        from huggingface_hub import create_repo

        # Created up front, so that a missing login fails now rather than after training.
        hub_repo_id = create_repo(args.hub_model_id or output_dir.absolute().name, exist_ok=True).repo_id

    # Data and model: exactly as in the Trainer path.
    with accelerator.main_process_first():  # the main process fills the `datasets` cache, the others read it
        prepared = prepare_data_and_model(model_args, data_args, args.seed)
    model, image_processor, splits = prepared.model, prepared.image_processor, prepared.splits
    num_labels = model.config.num_labels
    eval_splits = [split for split in ("validation", "test") if split in splits]
    raw_test = splits.get("test", splits["validation"])  # the demo shows untransformed images
    # PerExampleSeededDataset seeds the global generator that the training transform draws from, per example.
    augment, plain = prepared.train_transform, prepared.eval_transform
    train_dataset = PerExampleSeededDataset(splits["train"], augment, seed=args.seed)

    def loader(dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        # A private generator: creating an iterator then draws its worker base seed from it, not from the global
        # generator that dropout uses (evaluating or resuming would otherwise shift the model's random stream).
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            collate_fn=collate_fn,
            num_workers=args.dataloader_num_workers,
            generator=torch.Generator().manual_seed(args.seed),
        )

    train_dataloader = loader(train_dataset, args.per_device_train_batch_size, True, args.dataloader_drop_last)
    eval_dataloaders = {
        split: loader(splits[split].with_transform(plain), args.per_device_eval_batch_size, False)
        for split in eval_splits
    }

    groups = optimizer_parameter_groups(model, args.weight_decay)
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(groups, lr=args.learning_rate)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)

    # One call for model and optimiser: FSDP needs both together.
    model, optimizer, train_dataloader, *prepared_eval = accelerator.prepare(
        model, optimizer, train_dataloader, *eval_dataloaders.values()
    )
    eval_dataloaders = dict(zip(eval_dataloaders, prepared_eval, strict=True))

    # Steps counted on the prepared (sharded) loader. Accelerate's scheduler wrapper steps the schedule once per
    # process at each optimiser step (its batches grow with the process count), so the schedule is that much longer;
    # for warm-up + cosine/linear the learning rate at each optimiser step is then the one-process value.
    accumulation = accelerator.gradient_accumulation_steps  # `accelerate launch` may have set it
    updates_per_epoch = math.ceil(len(train_dataloader) / accumulation)
    max_train_steps = args.num_train_epochs * updates_per_epoch
    warmup = int(args.warmup_steps) if args.warmup_steps >= 1 else math.ceil(max_train_steps * args.warmup_steps)
    lr_scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=warmup * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    lr_scheduler = accelerator.prepare(lr_scheduler)
    if accelerator.is_main_process:  # room for the final model and every checkpoint, checked before training
        checkpoints = max_train_steps // args.checkpointing_steps if args.checkpointing_steps else 0
        check_output_folder(
            output_dir, training_footprint(accelerator.unwrap_model(model).num_parameters(), checkpoints)
        )
    progress = TrainingProgress()

    if tracking:
        accelerator.init_trackers("runs", config=_hparams(model_args, data_args, args))

    if args.resume_from_checkpoint:
        checkpoint = (
            find_latest_checkpoint(output_dir)
            if args.resume_from_checkpoint == "latest"
            else Path(args.resume_from_checkpoint)
        )
        progress.load(checkpoint)
        accelerator.load_state(str(checkpoint))  # model, optimiser, scheduler and RNG states
        logger.info(
            "Resumed from %s: step %d, epoch %d after batch %d",
            checkpoint,
            progress.completed_steps,
            progress.epoch,
            progress.batches_in_epoch,
        )
        if progress.batches_in_epoch >= len(train_dataloader):  # saved at the end of an epoch
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0

    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * accumulation
    logger.info(
        "Training %d examples for %d epochs: %d optimiser steps of %d examples (%d per process x %d processes x %d "
        "accumulated)",
        len(train_dataset),
        args.num_train_epochs,
        max_train_steps,
        total_batch_size,
        args.per_device_train_batch_size,
        accelerator.num_processes,
        accumulation,
    )
    progress_bar = tqdm(
        total=max_train_steps,
        initial=progress.completed_steps,
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
        desc="Training",
    )

    def flush_loss(window: torch.Tensor, batches: int) -> None:
        """Average the local loss sum over the processes (a collective: every process calls it at the same step)."""
        if batches:
            mean = accelerator.reduce(window.detach().clone(), reduction="mean").item()
            progress.loss_sum += mean
            progress.window_loss_sum += mean
            progress.loss_batches += batches
            progress.window_batches += batches

    def log(entry: dict[str, float]) -> None:
        entry = {**entry, "step": progress.completed_steps}
        progress.log_history.append(entry)
        accelerator.log({key: value for key, value in entry.items() if key != "step"}, step=progress.completed_steps)

    def save_checkpoint(folder: Path) -> None:
        def write(staging: Path) -> None:
            accelerator.save_state(str(staging))
            if accelerator.is_main_process:
                progress.save(staging)

        write_checkpoint_atomically(folder, write, accelerator.is_main_process, accelerator.wait_for_everyone)

    start, start_step = time.perf_counter(), progress.completed_steps
    grad_norm = None
    for epoch in range(progress.epoch, args.num_train_epochs):
        model.train()
        # The sampler's permutation and the crops are functions of the epoch.
        train_dataloader.set_epoch(epoch)
        train_dataset.set_epoch(epoch)
        skip = progress.batches_in_epoch if epoch == progress.epoch else 0
        progress.epoch, progress.batches_in_epoch = epoch, skip
        active_dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        window, window_batches = torch.zeros((), device=accelerator.device), 0
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                window += loss.detach().float()
                window_batches += 1
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()  # the prepared optimiser and scheduler step only when gradients are synced
                lr_scheduler.step()
                optimizer.zero_grad()
            progress.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            progress.completed_steps += 1
            progress_bar.update(1)
            at_log = progress.completed_steps % args.logging_steps == 0
            at_checkpoint = args.checkpointing_steps and progress.completed_steps % args.checkpointing_steps == 0
            if at_log or at_checkpoint:
                flush_loss(window, window_batches)
                window.zero_()
                window_batches = 0
            if at_log:
                entry = {
                    "loss": progress.window_loss_sum / progress.window_batches,
                    "learning_rate": lr_scheduler.get_last_lr()[0],
                    "epoch": epoch + progress.batches_in_epoch / len(train_dataloader),
                }
                if grad_norm is not None:
                    entry["grad_norm"] = float(grad_norm)
                log(entry)
                progress_bar.set_postfix(loss=f"{entry['loss']:.4f}")
                progress.window_loss_sum, progress.window_batches = 0.0, 0
            if at_checkpoint:
                save_checkpoint(output_dir / f"{CHECKPOINT_PREFIX}{progress.completed_steps}")
        flush_loss(window, window_batches)
        validation = evaluate(model, eval_dataloaders["validation"], accelerator, num_labels)
        log({**_prefixed("eval", validation), "epoch": epoch + 1})
        logger.info("Epoch %d: validation accuracy %.4f", epoch + 1, validation["accuracy"])
    progress_bar.close()
    runtime = time.perf_counter() - start
    logger.info("Trained with world size %d, model wrapped in %s", accelerator.num_processes, type(model).__name__)

    # Final model: gathered from every process (FSDP shards it), written once.
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    accelerator.unwrap_model(model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict
    )
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)

    steps_run = progress.completed_steps - start_step
    metrics: dict[str, Any] = {
        "train_loss": progress.loss_sum / max(progress.loss_batches, 1),
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(steps_run * total_batch_size / runtime, 3),
        "train_steps_per_second": round(steps_run / runtime, 3),
        "train_steps": progress.completed_steps,
        "epoch": float(args.num_train_epochs),
        "world_size": accelerator.num_processes,
    }
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in eval_dataloaders:
            metrics.update(_prefixed(prefix, evaluate(model, eval_dataloaders[split], accelerator, num_labels)))
    accelerator.log({key: value for key, value in metrics.items() if key.startswith("test_")}, step=max_train_steps)

    if accelerator.is_main_process:
        (output_dir / RESULTS_NAME).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        (output_dir / LOG_HISTORY_NAME).write_text(json.dumps(progress.log_history, indent=2) + "\n")
        plot_training_curve(progress.log_history, output_dir / "training_curve.png")
        for name, value in metrics.items():
            logger.info("  %s = %s", name, value)
        if args.num_demo_predictions:
            metrics["demo_predictions"] = reload_and_predict(
                output_dir, raw_test.select(range(min(args.num_demo_predictions, len(raw_test))))
            )
        if hub_repo_id is not None:
            push_model_folder(
                output_dir,
                hub_repo_id,
                metrics={key: value for key, value in metrics.items() if isinstance(value, (int, float))},
                hyperparameters={key: getattr(args, key) for key in HUB_HYPERPARAMETERS},
                dataset=data_args.dataset_name or data_args.train_dir or "sklearn-digits",
            )

    # Every process ends together (a barrier before the process group goes avoids gloo teardown hangs);
    # `end_training` closes the trackers and destroys the process group.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


__all__ = [
    "AccelerateArguments",
    "TrainingProgress",
    "evaluate",
    "find_latest_checkpoint",
    "train_with_accelerate",
]
