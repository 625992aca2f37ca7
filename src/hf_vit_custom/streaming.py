"""Streamed training data: a Hub data set or local Parquet / WebDataset shards read as a `datasets.IterableDataset`.

The training split is never written to the local cache: every process reads its part of the shards
(`split_dataset_by_node`), each data-loader worker its part of those (`datasets` gives the workers whole shards), and
`StreamedTrainingSet` turns the examples into batches, endlessly, pass after pass, so a run is as long as `--max_steps`
says. The evaluation splits are small: they are read once into memory as ordinary `datasets.Dataset`s, so that
evaluation sees every example exactly once under any number of processes.

Resuming. `datasets.IterableDataset.state_dict` records where a stream stands, and torchdata's
`StatefulDataLoader` (the loader Accelerate uses for `use_stateful_dataloader`) gathers that state from every worker
and gives it back to the same worker on resume, so a resumed run continues each worker's stream where the checkpoint
left it, with the next batch from the worker that was next. `datasets`' own `shuffle` cannot take part:
its buffer is not saved (its examples are lost on resume) and, with more than one worker, loading its state fails
(`IndexError`, datasets 5.2). The shuffling here is therefore by blocks: read `shuffle_block_size` examples, permute
them with a generator seeded by (seed, pass, process, worker, block), yield them; the checkpoint holds the stream's
state at the block's start and the position inside it, so a resumed run re-reads the block and continues bit for bit.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from .data import (
    IMAGE_COLUMN,
    LABEL_COLUMN,
    SPLITS,
    ImageClassificationTransform,
    encode_labels,
    seed_from,
    validate_dataset,
)
from .recipes import SOFT_LABELS

logger = logging.getLogger(__name__)

STREAM_STATE_FILE = "stream_state_{process_index}.pt"  # one per process, in every checkpoint of a streamed run
BLOCK, BATCH, CROP, MIX = range(4)  # what a seed is for, among its keys


def load_streamed_splits(
    dataset_name: str,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
) -> tuple[datasets.IterableDataset, datasets.DatasetDict]:
    """Open `dataset_name` (a Hub id, or a local folder of Parquet files or WebDataset `.tar` shards whose names
    give the splits, e.g. `train-00000-of-00008.parquet`) as a stream.

    Returns the training split as an `IterableDataset` with the columns `image` and `label`, and
    the validation (and test) splits read into memory (at most `max_eval_samples` each), validated like any other
    data set (their `label` a `ClassLabel`). Integer labels without names are named "0" ... the largest label of the
    evaluation splits: a stream cannot be scanned up front.
    """
    streams = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, streaming=True)
    for alias in ("valid", "val", "dev"):
        if "validation" not in streams and alias in streams:
            streams["validation"] = streams.pop(alias)
    for needed in ("train", "validation"):
        if needed not in streams:
            raise ValueError(
                f"The streamed data set {dataset_name!r} has no {needed!r} split (it has {list(streams)}); a stream "
                "cannot be held out from, so it needs files for both, e.g. `train-*.parquet`, `validation-*.parquet`."
            )
    renames = {image_column: IMAGE_COLUMN, label_column: LABEL_COLUMN}
    opened = {}
    for split in SPLITS:
        if split not in streams:
            continue
        stream = streams[split]
        columns = list(stream.features or {})
        for column in (image_column, label_column):
            if column not in columns:
                raise ValueError(
                    f"Column {column!r} not found in split {split!r} of {dataset_name!r}; available columns: "
                    f"{columns}. Pass `--image_column` / `--label_column` (a WebDataset names them by extension, "
                    "e.g. 'jpg' and 'cls')."
                )
        stream = stream.select_columns([image_column, label_column])
        opened[split] = stream.rename_columns({old: new for old, new in renames.items() if old != new})
    if isinstance(opened["train"].features[IMAGE_COLUMN], datasets.Value):  # paths
        opened = {split: stream.cast_column(IMAGE_COLUMN, datasets.Image()) for split, stream in opened.items()}

    train_labels = opened["train"].features[LABEL_COLUMN]
    if not isinstance(train_labels, datasets.ClassLabel) and not str(train_labels.dtype).startswith(("int", "uint")):
        raise ValueError(
            f"The labels of a streamed data set must be class labels or integers, got {train_labels!r}: string "
            "labels would need a pass over the whole stream to be numbered."
        )
    evaluation = datasets.DatasetDict(
        {split: _read_into_memory(opened[split], max_eval_samples) for split in SPLITS[1:] if split in opened}
    )
    if isinstance(train_labels, datasets.ClassLabel):
        evaluation = evaluation.cast_column(LABEL_COLUMN, train_labels)
    else:
        evaluation = encode_labels(evaluation)  # named "0" ... the largest label the evaluation splits hold
    # The checks of a map-style data set, with the validation split standing in for the training split.
    validate_dataset(datasets.DatasetDict({"train": evaluation["validation"], **evaluation}))
    return opened["train"], evaluation


def _read_into_memory(stream: datasets.IterableDataset, limit: int | None) -> datasets.Dataset:
    # Encoded bytes, not decoded pictures: a validation split of photos stays at its size on disk.
    undecoded = stream.cast_column(IMAGE_COLUMN, datasets.Image(decode=False))
    if limit is not None:
        undecoded = undecoded.take(limit)
    examples = list(undecoded)
    if not examples:
        raise ValueError("An evaluation split of the streamed data set is empty.")
    return datasets.Dataset.from_list(examples, features=stream.features)


def split_for_process(
    stream: datasets.IterableDataset, process_index: int, num_processes: int
) -> datasets.IterableDataset:
    """This process's part of the training stream: whole shards when their number divides by the process count,
    otherwise every `num_processes`-th example of all of them (each process then reads everything)."""
    if num_processes > 1 and stream.n_shards % num_processes:
        logger.warning(
            "The training stream has %d shards for %d processes: each process reads all of them and keeps every "
            "%d-th example. A shard count that divides by the process count (times the data-loader workers) reads "
            "each shard once.",
            stream.n_shards,
            num_processes,
            num_processes,
        )
    return split_dataset_by_node(stream, rank=process_index, world_size=num_processes)


class StreamedTrainingSet(torch.utils.data.IterableDataset):
    """Endless training batches from a stream: block-shuffled, augmented with seeded crops, mixed when asked.

    Yields whole batches (use it with `batch_size=None`), so that the image processor runs once per batch and the
    state (`state_dict`) always marks a batch boundary. A pass is one read of this worker's part of the stream; each
    pass is shuffled anew. The crops and the Mixup / CutMix of a batch are seeded by where the batch stands in the
    stream, so a resumed run draws them alike.

    Args:
        stream: this process's part of the training split (`split_for_process`), columns `image` and `label`.
        transform: the training transform.
        seed: the run's seed.
        batch_size: images per batch (the last batch of a pass may be smaller).
        num_labels: the classes of the model's head; a label outside them stops the training with its value.
        process_index: this process's rank, which seeds its shuffling and crops apart from the other processes'.
        shuffle_block_size: examples shuffled together; 1 keeps the stream's order.
        batch_mixer: mixes a batch's `pixel_values` and makes its soft labels, or None.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        transform: ImageClassificationTransform,
        seed: int,
        batch_size: int,
        num_labels: int,
        process_index: int = 0,
        shuffle_block_size: int = 1000,
        batch_mixer: Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple] | None = None,
    ):
        if shuffle_block_size < 1:
            raise ValueError(f"`shuffle_block_size` must be at least 1, got {shuffle_block_size}.")
        # The transform decodes the images itself, at the scale each crop needs.
        self.stream = stream.cast_column(transform.image_column, datasets.Image(decode=False))
        self.transform = transform
        self.seed = seed
        self.batch_size = batch_size
        self.process_index = process_index
        self.shuffle_block_size = shuffle_block_size
        self.batch_mixer = batch_mixer
        self.num_labels = num_labels
        self.position = {"pass": 0, "block": 0, "block_start": None, "in_block": 0, "batches": 0}

    def state_dict(self) -> dict[str, Any]:
        """Where the next batch starts: the pass, the block (and the stream's state at its start), the position in
        it, and the batches of the pass so far."""
        return dict(self.position)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = dict(state)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        while True:
            start = self.position
            pass_index, block_index, skip, batches = start["pass"], start["block"], start["in_block"], start["batches"]
            # A copy per pass: a loaded state applies to every later iteration of the same object, and `set_epoch`
            # would add to an epoch counter that the workers share (racing, and it moves shards between workers).
            stream = copy.deepcopy(self.stream)
            if start["block_start"] is not None:
                stream.load_state_dict(start["block_start"])
            examples = iter(stream)
            block_start, pending, read_any = start["block_start"], [], False
            while block := list(itertools.islice(examples, self.shuffle_block_size)):
                read_any = True
                order = np.random.default_rng(self._seed(worker_id, pass_index, BLOCK, block_index))
                order = order.permutation(len(block))
                for offset in range(skip, len(block)):
                    pending.append(block[order[offset]])
                    if len(pending) == self.batch_size:
                        self.position = {
                            "pass": pass_index,
                            "block": block_index,
                            "block_start": block_start,
                            "in_block": offset + 1,
                            "batches": batches + 1,
                        }
                        yield self._batch(pending, worker_id, pass_index, batches)
                        batches, pending = batches + 1, []
                # The next block starts where this one ended (the stream has been read, so its state is current).
                block_start, block_index, skip = stream.state_dict(), block_index + 1, 0
            self.position = {"pass": pass_index + 1, "block": 0, "block_start": None, "in_block": 0, "batches": 0}
            if pending:  # the pass's last, smaller batch
                yield self._batch(pending, worker_id, pass_index, batches)
            if not read_any:  # this worker has no shard (more workers than shards), or the stream is empty
                return

    def _seed(self, worker_id: int, *keys: Any) -> int:
        return seed_from(self.seed, self.process_index, worker_id, *keys)

    def _batch(self, examples: list[dict[str, Any]], worker_id: int, pass_index: int, batch_index: int) -> dict:
        labels = [example[LABEL_COLUMN] for example in examples]
        bad = [label for label in labels if not 0 <= label < self.num_labels]
        if bad:
            raise ValueError(
                f"The training stream has labels {sorted(set(bad))[:5]} outside [0, {self.num_labels}) (the classes "
                "the data set names, or, for unnamed integer labels, those of its evaluation splits)."
            )
        keys = (worker_id, pass_index, BATCH, batch_index)
        columns = {IMAGE_COLUMN: [example[IMAGE_COLUMN] for example in examples], LABEL_COLUMN: labels}
        seeds = [self._seed(*keys, CROP, position) for position in range(len(examples))]
        transformed = self.transform(columns, example_seeds=seeds)
        if self.batch_mixer is not None:
            rng = np.random.default_rng(self._seed(*keys, MIX))
            transformed["pixel_values"], transformed[SOFT_LABELS] = self.batch_mixer(
                transformed["pixel_values"], transformed["labels"], rng
            )
        return transformed


def streamed_data_loader(dataset: StreamedTrainingSet, num_workers: int, pin_memory: bool = False):
    """torchdata's `StatefulDataLoader` over `dataset`'s batches: its `state_dict` holds every worker's place.

    A private generator gives the workers their base seed (which nothing here uses: every draw is seeded by its place
    in the stream), so that starting the loader after a resumption leaves the global generator, dropout's, alone.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    generator = torch.Generator().manual_seed(dataset.seed)
    return StatefulDataLoader(
        dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, generator=generator
    )


def save_stream_state(loader, folder: str | os.PathLike, process_index: int) -> None:
    """Write this process's loader state (every worker's place in the stream) into checkpoint `folder`."""
    torch.save(loader.state_dict(), Path(folder) / STREAM_STATE_FILE.format(process_index=process_index))


def load_stream_state(loader, checkpoint: str | os.PathLike, process_index: int) -> None:
    """Put a streamed run's data loader where `checkpoint` left this process's part of the stream."""
    path = Path(checkpoint) / STREAM_STATE_FILE.format(process_index=process_index)
    if not path.is_file():
        raise ValueError(
            f"The checkpoint {str(checkpoint)!r} has no {path.name}: it was not saved by a streamed run with this "
            "process count, so where the stream stood is unknown."
        )
    loader.load_state_dict(torch.load(path, weights_only=True))


__all__ = [
    "STREAM_STATE_FILE",
    "StreamedTrainingSet",
    "load_stream_state",
    "load_streamed_splits",
    "save_stream_state",
    "split_for_process",
    "streamed_data_loader",
]
