"""A plain Accelerate training loop over the same model, data, metrics and settings as the Trainer path.

`train_with_accelerate` is the Accelerate twin of `hf_vit_custom.training.train`: the data sets, the model, the
optimiser (Trainer's own, over the same weight-decay groups), the metrics, the demo and the training settings
(`ViTTrainingArguments`) all come from the shared modules; only the loop is written out here (`Accelerator.prepare`,
`accumulate`, `backward`, `clip_grad_norm_`, `gather_for_metrics`, `save_state` / `load_state`,
`skip_first_batches`, trackers). It reads top to bottom: `_set_up`, `_train_epoch` for each epoch (`evaluate` at its
end), `_finish`. Launch it the way Accelerate scripts are launched:

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

import itertools
import json
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, send_to_device, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import BaseImageProcessor, Trainer, get_scheduler
from transformers.trainer_utils import SaveStrategy

from .data import PerExampleSeededDataset, collate_fn
from .fp8 import fp8_recipe
from .hub import push_model_folder
from .metrics import ClassificationMetrics
from .persistence import (
    ACCELERATE_CHECKPOINTS,
    TrainingInterrupted,
    check_checkpoint_fits,
    check_output_folder,
    full_disk_error,
    interrupted_message,
    newest_complete_checkpoint,
    prune_checkpoints,
    resolve_resume_checkpoint,
    training_footprint,
    write_folder_atomically,
)
from .recipes import WeightAverage, training_loss, weights_of
from .streaming import StreamedTrainingSet, load_stream_state, save_stream_state, streamed_data_loader
from .training import (
    HUB_HYPERPARAMETERS,
    DataArguments,
    ModelArguments,
    ViTTrainingArguments,
    optimizer_parameter_groups,
    plot_training_curve,
    prepare_data_and_model,
    reload_and_predict,
)

logger = get_logger(__name__)

LOG_HISTORY_NAME = "log_history.json"
RESULTS_NAME = "all_results.json"
PROGRESS_NAME = ACCELERATE_CHECKPOINTS.last_file


@dataclass
class AccelerateArguments(ViTTrainingArguments):
    """`ViTTrainingArguments` for the Accelerate loop: every setting is declared there; only the output folder differs.

    The loop reads `seed` (`data_seed`), `num_train_epochs` (whole epochs; `max_steps` with `--streaming`), the
    batch sizes, `gradient_accumulation_steps`, `optim` with `learning_rate`, `weight_decay` and the Adam fields
    (through Trainer's optimiser factory), `lr_scheduler_type`, `lr_scheduler_kwargs`, `warmup_steps`,
    `max_grad_norm`, `bf16` / `fp16` / `fp8` (else the launcher's precision), `save_strategy` (`no`, `steps` or
    `epoch`), `save_steps`, `save_total_limit`, `resume_from_checkpoint`, `logging_steps`, `report_to`,
    `push_to_hub`, `hub_model_id`, `hub_private_repo`, `accelerator_config`'s `use_seedable_sampler`,
    `dataloader_num_workers`, `dataloader_drop_last`, `disable_tqdm`, `use_cpu`, `num_demo_predictions` and the
    recipes (`layer_decay`, `mixup_alpha`, `cutmix_alpha`, `label_smoothing_factor`, `ema_decay`); it evaluates
    after every epoch (a streamed run: after its last step).
    """

    output_dir: str | None = field(
        default="outputs/vit-digits-accelerate", metadata={"help": "Where everything is written."}
    )

    def __post_init__(self):
        if self.num_train_epochs < 1:  # before the shared checks, whose message allows a fraction of an epoch
            raise ValueError(f"`num_train_epochs` must be at least 1, got {self.num_train_epochs}.")
        super().__post_init__()  # batch sizes, learning rate, something to train: `check_training_values`
        if self.num_train_epochs != int(self.num_train_epochs):
            raise ValueError(
                f"`num_train_epochs` must be a whole number in the Accelerate loop, got {self.num_train_epochs}."
            )
        if self.save_strategy not in (SaveStrategy.NO, SaveStrategy.STEPS, SaveStrategy.EPOCH):
            raise ValueError(
                f"`save_strategy` must be no, steps or epoch in the Accelerate loop, got {self.save_strategy}."
            )


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
        vars(self).update(json.loads((folder / PROGRESS_NAME).read_text()))


class LossWindow:
    """This process's training losses since the last flush, summed on the device so that a step never waits for it."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), device=device)
        self.batches = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.detach().float()
        self.batches += 1


@dataclass
class _Run:
    """What the pieces of the loop share, built once by `_set_up`."""

    accelerator: Accelerator
    args: AccelerateArguments
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    train_dataset: PerExampleSeededDataset | StreamedTrainingSet
    train_dataloader: DataLoader  # for a stream, torchdata's `StatefulDataLoader`, which Accelerate does not wrap
    eval_dataloaders: dict[str, DataLoader]
    image_processor: BaseImageProcessor
    demo_images: datasets.Dataset  # untransformed, for the demo
    max_train_steps: int
    logging_interval: int
    save_interval: int | None  # optimiser steps between checkpoints with `save_strategy="steps"`
    hub_repo_id: str | None
    weight_average: WeightAverage | None = None  # `--ema_decay`
    progress: TrainingProgress = field(default_factory=TrainingProgress)
    progress_bar: Any = None
    start_time: float = 0.0
    start_step: int = 0

    @property
    def streamed(self) -> bool:
        return isinstance(self.train_dataset, StreamedTrainingSet)


def evaluate(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> dict[str, float]:
    """The model's loss over every example of a possibly sharded evaluation set, with accuracy, macro F1 (and
    top-5 accuracy) when the labels are class indices.

    The loss is the model's own `loss_function` (cross-entropy, binary cross-entropy on logits for multi-hot labels
    or mean squared error, as `config.problem_type` says), applied to each gathered batch and weighted by its size.
    It is taken after `gather_for_metrics`, which drops the examples the sharded loader repeats to even out the last
    batch; `outputs.loss` of a process's batch would count them. So the numbers are exact, whatever the process count.
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    metrics, loss_sum, count, start = None, 0.0, 0, time.perf_counter()
    for batch in dataloader:
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        logits, labels = accelerator.gather_for_metrics((logits.float(), batch["labels"]))
        loss_sum += unwrapped.loss_function(labels, logits, unwrapped.config).item() * len(labels)
        count += len(labels)
        if metrics is None and not labels.is_floating_point() and unwrapped.config.num_labels > 1:
            metrics = ClassificationMetrics(unwrapped.config.num_labels)
        if metrics is not None:
            metrics.add_batch(logits, labels)
    runtime = time.perf_counter() - start
    return {
        "loss": loss_sum / count,
        **(metrics.compute() if metrics is not None else {}),
        "samples": count,
        "runtime": round(runtime, 4),
        "samples_per_second": round(count / runtime, 3),
        "steps_per_second": round(len(dataloader) / runtime, 3),
    }


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
    run = None
    try:
        accelerator = Accelerator(
            cpu=args.use_cpu,
            mixed_precision=args.mixed_precision,  # `--bf16` / `--fp16` / `--fp8`, else the launcher's precision
            kwargs_handlers=[fp8_recipe()] if args.fp8 else None,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=args.report_to or None,
            project_dir=args.output_dir,
            dataloader_config=DataLoaderConfiguration(
                use_seedable_sampler=args.accelerator_config.use_seedable_sampler,
                data_seed=args.seed if args.data_seed is None else args.data_seed,
            ),
        )
        run = _set_up(accelerator, model_args, data_args, args)
        if run.streamed:
            _train_stream(run)
        else:
            for epoch in range(run.progress.epoch, int(args.num_train_epochs)):
                _train_epoch(run, epoch)
        return _finish(run, data_args)
    except (OSError, RuntimeError) as error:  # a checkpoint stopped by a full disk was dropped with its staging folder
        if run is None:
            raise
        needed = training_footprint(
            sum(p.numel() for p in run.model.parameters()), args.save_total_limit, args.ema_decay is not None
        )
        if (full_disk := full_disk_error(error, args.output_dir, needed)) is None:
            raise
        raise full_disk from error
    except KeyboardInterrupt:
        # A checkpoint being written when Ctrl-C came was dropped with its staging folder; the others are complete.
        newest = newest_complete_checkpoint(args.output_dir, ACCELERATE_CHECKPOINTS)
        raise TrainingInterrupted(interrupted_message(newest, args.output_dir)) from None
    finally:
        _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    # An initialised process group survives this: the next `Accelerator` finds it and does not initialise another.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _set_up(
    accelerator: Accelerator, model_args: ModelArguments, data_args: DataArguments, args: AccelerateArguments
) -> _Run:
    """Everything before the first step: checks, data and model (as in the Trainer path), optimiser and schedule,
    trackers, and the state of the checkpoint resumed from."""
    _set_verbosity(accelerator)
    if args.max_steps > 0 and not data_args.streaming:
        raise ValueError(
            "The Accelerate loop trains whole epochs: set `num_train_epochs`, not `max_steps` (which is for "
            "`--streaming`)."
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # e.g. from `accelerate launch`
        logger.warning("Accelerate does not apply fp16 mixed precision on a CPU: this run trains in float32.")
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    if accelerator.is_main_process:
        check_output_folder(output_dir, needed_bytes=0)  # writable; the room is checked once the model is known
    hub_repo_id = _create_hub_repo(args) if args.push_to_hub and accelerator.is_main_process else None
    with accelerator.main_process_first():  # the main process fills the `datasets` cache, the others read it
        prepared = prepare_data_and_model(model_args, data_args, args, checkpoint_scheme=ACCELERATE_CHECKPOINTS)
    inputs = prepared.model_inputs(args.seed)
    eval_splits = [split for split in ("validation", "test") if split in inputs]
    if data_args.streaming:
        # Every process reads its own part of the stream: Accelerate would have one read and send out all batches.
        train_dataloader = streamed_data_loader(inputs["train"], args.dataloader_num_workers)
        model, optimizer, *eval_dataloaders = accelerator.prepare(  # together: FSDP needs both
            prepared.model,
            _optimizer(prepared.model, args),
            *(_data_loader(inputs[split], args, train=False) for split in eval_splits),
        )
        max_train_steps = args.max_steps
    else:
        model, optimizer, train_dataloader, *eval_dataloaders = accelerator.prepare(  # together: FSDP needs both
            prepared.model,
            _optimizer(prepared.model, args),
            _data_loader(inputs["train"], args, train=True),
            *(_data_loader(inputs[split], args, train=False) for split in eval_splits),
        )
        updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.gradient_accumulation_steps)
        max_train_steps = int(args.num_train_epochs) * updates_per_epoch
    lr_scheduler = accelerator.prepare(_lr_scheduler(optimizer, args, max_train_steps, accelerator.num_processes))
    save_interval = _interval(args.save_steps, max_train_steps) if args.save_strategy == SaveStrategy.STEPS else None
    raw_test = prepared.splits.get("test", prepared.splits["validation"])
    run = _Run(
        accelerator=accelerator,
        args=args,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        train_dataset=inputs["train"],
        train_dataloader=train_dataloader,
        eval_dataloaders=dict(zip(eval_splits, eval_dataloaders, strict=True)),
        image_processor=prepared.image_processor,
        demo_images=raw_test.select(range(min(args.num_demo_predictions, len(raw_test)))),
        max_train_steps=max_train_steps,
        logging_interval=_interval(args.logging_steps, max_train_steps),
        save_interval=save_interval,
        hub_repo_id=hub_repo_id,
    )
    if args.ema_decay is not None:
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError("`--ema_decay` cannot be used with sharded training (FSDP, DeepSpeed).")
        run.weight_average = WeightAverage(accelerator.unwrap_model(model), args.ema_decay)
    if accelerator.is_main_process:
        _check_room(run)
    if args.report_to:
        accelerator.init_trackers("runs", config=_hparams(model_args, data_args, args))
    _resume(run)
    _start_progress_bar(run)
    return run


def _create_hub_repo(args: AccelerateArguments) -> str:
    """The Hub repository for `--push_to_hub`, created up front so that a missing login fails before training."""
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).absolute().name
    return create_repo(name, private=bool(args.hub_private_repo), exist_ok=True).repo_id


def _check_room(run: _Run) -> None:
    """Before training: room in the output folder for the final model and every checkpoint kept."""
    args = run.args
    written = {
        SaveStrategy.STEPS: run.max_train_steps // (run.save_interval or 1),
        SaveStrategy.EPOCH: int(args.num_train_epochs),
    }.get(args.save_strategy, 0)
    kept = written if args.save_total_limit is None else min(written, args.save_total_limit)
    num_parameters = run.accelerator.unwrap_model(run.model).num_parameters()
    check_output_folder(args.output_dir, training_footprint(num_parameters, kept, args.ema_decay is not None))


def _set_verbosity(accelerator: Accelerator) -> None:
    """Warnings from the main process of each machine, errors only from the others."""
    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        datasets.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def _optimizer(model: torch.nn.Module, args: AccelerateArguments) -> torch.optim.Optimizer:
    """Trainer's own optimiser for `--optim` and its settings, over the Trainer path's weight-decay groups."""
    optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    groups = optimizer_parameter_groups(model, args.weight_decay, args.learning_rate, args.layer_decay)
    return optimizer_class(groups, **optimizer_kwargs)


def _data_loader(dataset: torch.utils.data.Dataset, args: AccelerateArguments, train: bool) -> DataLoader:
    """A loader with a private generator: creating an iterator then draws its worker base seed from it, not from the
    global generator that dropout uses (evaluating or resuming would otherwise shift the model's random stream)."""
    return DataLoader(
        dataset,
        batch_size=args.per_device_train_batch_size if train else args.per_device_eval_batch_size,
        shuffle=train,
        drop_last=train and args.dataloader_drop_last,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )


def _lr_scheduler(optimizer, args: AccelerateArguments, max_train_steps: int, num_processes: int):
    """The schedule over `max_train_steps` optimiser steps, counted on the prepared (sharded) loader.

    Accelerate's scheduler wrapper steps the schedule once per process at each optimiser step (its batches grow with
    the process count), so the schedule is that much longer; for warm-up + cosine/linear the learning rate at each
    optimiser step is then the one-process value.
    """
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(max_train_steps) * num_processes,
        num_training_steps=max_train_steps * num_processes,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )


def _interval(steps: float, max_train_steps: int) -> int:
    """`logging_steps` / `save_steps` in optimiser steps: as in Trainer, a value below 1 is a share of all steps."""
    return int(steps) if steps >= 1 else max(math.ceil(max_train_steps * steps), 1)


def _resume(run: _Run) -> None:
    """Restore the model, optimiser, scheduler, RNG states and progress of `--resume_from_checkpoint`, if given."""
    args, progress = run.args, run.progress
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir, ACCELERATE_CHECKPOINTS)
    if checkpoint is None:
        return
    check_checkpoint_fits(checkpoint, run.accelerator.unwrap_model(run.model))
    progress.load(checkpoint)
    run.accelerator.load_state(str(checkpoint))
    if run.streamed:
        load_stream_state(run.train_dataloader, checkpoint, run.accelerator.process_index)
    if run.weight_average is not None:
        run.weight_average.resume(checkpoint, run.accelerator.unwrap_model(run.model))
    logger.info(
        "Resumed from %s: step %d, epoch %d after batch %d",
        checkpoint,
        progress.completed_steps,
        progress.epoch,
        progress.batches_in_epoch,
    )
    if not run.streamed and progress.batches_in_epoch >= len(run.train_dataloader):  # saved at the end of an epoch
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0


def _start_progress_bar(run: _Run) -> None:
    args, accelerator = run.args, run.accelerator
    logger.info(
        "Training %s for %s: %d optimiser steps of %d examples (%d per process x %d processes x %d accumulated)",
        "a stream" if run.streamed else f"{len(run.train_dataset)} examples",
        "its steps" if run.streamed else f"{args.num_train_epochs:g} epochs",
        run.max_train_steps,
        _total_batch_size(run),
        args.per_device_train_batch_size,
        accelerator.num_processes,
        accelerator.gradient_accumulation_steps,
    )
    run.progress_bar = tqdm(
        total=run.max_train_steps,
        initial=run.progress.completed_steps,
        disable=args.disable_tqdm or not accelerator.is_local_main_process,
        desc="Training",
    )
    run.start_time, run.start_step = time.perf_counter(), run.progress.completed_steps


def _total_batch_size(run: _Run) -> int:
    accelerator = run.accelerator
    return run.args.per_device_train_batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps


def _train_epoch(run: _Run, epoch: int) -> None:
    """One pass over the training set (what is left of it, when resuming mid-epoch), then the validation."""
    accelerator, progress = run.accelerator, run.progress
    run.model.train()
    # The sampler's permutation and the crops are functions of the epoch.
    run.train_dataloader.set_epoch(epoch)
    run.train_dataset.set_epoch(epoch)
    skip = progress.batches_in_epoch if epoch == progress.epoch else 0
    progress.epoch, progress.batches_in_epoch = epoch, skip
    _train_on(run, accelerator.skip_first_batches(run.train_dataloader, skip) if skip else run.train_dataloader, epoch)
    validation = evaluate(run.model, run.eval_dataloaders["validation"], accelerator)
    _log(run, {**_prefixed("eval", validation), "epoch": epoch + 1})
    logger.info("Epoch %d: validation loss %.4f", epoch + 1, validation["loss"])
    if run.args.save_strategy == SaveStrategy.EPOCH:  # after the evaluation, so that a resumed run logs it once
        _save_checkpoint(run)


def _train_stream(run: _Run) -> None:
    """`max_train_steps` optimiser steps over the endless batches of a stream (continued where the checkpoint left
    it, when resuming), then the validation."""
    accelerator, progress = run.accelerator, run.progress
    run.model.train()
    batches = itertools.takewhile(lambda _: progress.completed_steps < run.max_train_steps, run.train_dataloader)
    # The stream's loader is not Accelerate's, so nothing has put its batches on the device yet.
    _train_on(run, (send_to_device(batch, accelerator.device) for batch in batches), epoch=0)
    validation = evaluate(run.model, run.eval_dataloaders["validation"], accelerator)
    _log(run, _prefixed("eval", validation))
    logger.info("Step %d: validation loss %.4f", progress.completed_steps, validation["loss"])


def _train_on(run: _Run, batches: Iterable[dict[str, torch.Tensor]], epoch: int) -> None:
    """Train on `batches`, counting them and the optimiser steps, then add their losses to the progress."""
    window = LossWindow(run.accelerator.device)
    for batch in batches:
        grad_norm = _train_step(run, batch, window)
        run.progress.batches_in_epoch += 1
        if run.accelerator.sync_gradients:
            _after_optimizer_step(run, epoch, window, grad_norm)
    _flush_loss(run, window)


def _train_step(run: _Run, batch: dict[str, torch.Tensor], window: LossWindow) -> torch.Tensor | None:
    """Forward and backward; once the accumulated gradients are synced, clip them and step. Returns the clipped
    gradient norm, if any."""
    accelerator, grad_norm = run.accelerator, None
    with accelerator.accumulate(run.model):
        loss = training_loss(run.model, batch, run.args.label_smoothing_factor)
        window.add(loss)
        accelerator.backward(loss)
        if accelerator.sync_gradients and run.args.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
        run.optimizer.step()  # the prepared optimiser and scheduler step only when gradients are synced
        run.lr_scheduler.step()
        run.optimizer.zero_grad()
    return grad_norm


def _after_optimizer_step(run: _Run, epoch: int, window: LossWindow, grad_norm: torch.Tensor | None) -> None:
    """Count the step; log the training loss and save a checkpoint when their intervals say so."""
    progress = run.progress
    progress.completed_steps += 1
    if run.weight_average is not None:
        run.weight_average.update(run.accelerator.unwrap_model(run.model))
    run.progress_bar.update(1)
    at_log = progress.completed_steps % run.logging_interval == 0
    at_checkpoint = run.save_interval is not None and progress.completed_steps % run.save_interval == 0
    if at_log or at_checkpoint:
        _flush_loss(run, window)
    if at_log:
        entry = {
            "loss": progress.window_loss_sum / progress.window_batches,
            "learning_rate": run.lr_scheduler.get_last_lr()[0],
        }
        if not run.streamed:  # a stream has no epochs
            entry["epoch"] = epoch + progress.batches_in_epoch / len(run.train_dataloader)
        if grad_norm is not None:
            entry["grad_norm"] = float(grad_norm)
        _log(run, entry)
        run.progress_bar.set_postfix(loss=f"{entry['loss']:.4f}")
        progress.window_loss_sum, progress.window_batches = 0.0, 0
    if at_checkpoint:
        _save_checkpoint(run)


def _flush_loss(run: _Run, window: LossWindow) -> None:
    """Average the window's loss sum over the processes into the progress (a collective: every process calls it at
    the same step), then empty the window."""
    if window.batches:
        mean = run.accelerator.reduce(window.total.detach().clone(), reduction="mean").item()
        progress = run.progress
        progress.loss_sum += mean
        progress.window_loss_sum += mean
        progress.loss_batches += window.batches
        progress.window_batches += window.batches
    window.total.zero_()
    window.batches = 0


def _log(run: _Run, entry: dict[str, float]) -> None:
    step = run.progress.completed_steps
    run.progress.log_history.append({**entry, "step": step})
    run.accelerator.log(entry, step=step)


def _save_checkpoint(run: _Run) -> None:
    """The whole training state as `step_N`, written by every process at once and renamed into place when complete;
    then the oldest beyond `save_total_limit` go."""
    accelerator, args = run.accelerator, run.args
    folder = ACCELERATE_CHECKPOINTS.folder(args.output_dir, run.progress.completed_steps)
    write = partial(_write_checkpoint, run)
    write_folder_atomically(
        folder, write, is_main_process=accelerator.is_main_process, wait_for_everyone=accelerator.wait_for_everyone
    )
    if accelerator.is_main_process:
        prune_checkpoints(args.output_dir, ACCELERATE_CHECKPOINTS, args.save_total_limit)


def _write_checkpoint(run: _Run, staging: Path) -> None:
    run.accelerator.save_state(str(staging))  # model, optimiser, scheduler and RNG states
    if run.streamed:  # every process: each reads its own part of the stream
        save_stream_state(run.train_dataloader, staging, run.accelerator.process_index)
    if run.accelerator.is_main_process:
        if run.weight_average is not None:
            run.weight_average.save(staging)
        run.progress.save(staging)


def _finish(run: _Run, data_args: DataArguments) -> dict:
    """Save the final model, evaluate it on validation and test, write results, curve and demo, push if asked."""
    accelerator, args, progress = run.accelerator, run.args, run.progress
    run.progress_bar.close()
    runtime = time.perf_counter() - run.start_time
    logger.info("Trained with world size %d, model wrapped in %s", accelerator.num_processes, type(run.model).__name__)
    _save_model(run)
    steps_run = progress.completed_steps - run.start_step
    metrics: dict[str, Any] = {
        "train_loss": progress.loss_sum / max(progress.loss_batches, 1),
        "train_runtime": round(runtime, 4),
        "train_samples_per_second": round(steps_run * _total_batch_size(run) / runtime, 3),
        "train_steps_per_second": round(steps_run / runtime, 3),
        "train_steps": progress.completed_steps,
        "world_size": accelerator.num_processes,
    }
    if not run.streamed:
        metrics["epoch"] = float(args.num_train_epochs)
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split in run.eval_dataloaders:
            metrics.update(_prefixed(prefix, evaluate(run.model, run.eval_dataloaders[split], accelerator)))
    if run.weight_average is not None:
        if accelerator.is_main_process:
            run.weight_average.save_model_folder(args.output_dir, run.image_processor)
        with weights_of(accelerator.unwrap_model(run.model), run.weight_average.module):
            for split, prefix in (("validation", "ema_eval"), ("test", "ema_test")):
                if split in run.eval_dataloaders:
                    metrics.update(_prefixed(prefix, evaluate(run.model, run.eval_dataloaders[split], accelerator)))
    test_metrics = {key: value for key, value in metrics.items() if key.startswith("test_")}
    accelerator.log(test_metrics, step=run.max_train_steps)
    if accelerator.is_main_process:
        _write_results(run, metrics, data_args)
    # Every process ends together (a barrier before the process group goes avoids gloo teardown hangs);
    # `end_training` closes the trackers and destroys the process group.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _save_model(run: _Run) -> None:
    """The final model, gathered from every process (FSDP shards it) and written once, with its processor."""
    accelerator, output_dir = run.accelerator, Path(run.args.output_dir)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(run.model)
    accelerator.unwrap_model(run.model).save_pretrained(
        output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict
    )
    if accelerator.is_main_process:
        run.image_processor.save_pretrained(output_dir)


def _write_results(run: _Run, metrics: dict[str, Any], data_args: DataArguments) -> None:
    """On the main process: results, log history, training curve, demo predictions and the Hub upload."""
    args, output_dir = run.args, Path(run.args.output_dir)
    (output_dir / RESULTS_NAME).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (output_dir / LOG_HISTORY_NAME).write_text(json.dumps(run.progress.log_history, indent=2) + "\n")
    plot_training_curve(run.progress.log_history, output_dir / "training_curve.png")
    for name, value in metrics.items():
        logger.info("  %s = %s", name, value)
    if args.num_demo_predictions:
        metrics["demo_predictions"] = reload_and_predict(output_dir, run.demo_images)
    if run.hub_repo_id is not None:
        push_model_folder(
            output_dir,
            run.hub_repo_id,
            metrics={key: value for key, value in metrics.items() if isinstance(value, (int, float))},
            hyperparameters={key: getattr(args, key) for key in HUB_HYPERPARAMETERS},
            dataset=data_args.dataset_name or data_args.train_dir or "sklearn-digits",
        )


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def _hparams(model_args: ModelArguments, data_args: DataArguments, args: AccelerateArguments) -> dict[str, Any]:
    """The run's arguments as the scalars TensorBoard's hparams accept."""
    values = {
        k: v for k, v in {**asdict(model_args), **asdict(data_args)}.items() if isinstance(v, (bool, int, float, str))
    }
    return {**values, **args.to_sanitized_dict()}


__all__ = [
    "AccelerateArguments",
    "LossWindow",
    "TrainingProgress",
    "evaluate",
    "train_with_accelerate",
]
