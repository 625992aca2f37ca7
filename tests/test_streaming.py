"""`--streaming`: the digits written as Parquet / WebDataset shards, streamed by one and two processes, resumed."""

import io
import json
import shutil
import sys
import tarfile
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from conftest import TINY_OVERRIDES, run_bounded
from safetensors.torch import load_file
from transformers import HfArgumentParser

from hf_vit_custom.data import ImageClassificationTransform, default_image_processor, load_digits_dataset
from hf_vit_custom.recipes import SOFT_LABELS, MixupCutmix
from hf_vit_custom.streaming import (
    STREAM_STATE_FILE,
    StreamedTrainingSet,
    load_stream_state,
    load_streamed_splits,
    save_stream_state,
    split_for_process,
    streamed_data_loader,
)
from hf_vit_custom.training import (
    DataArguments,
    ModelArguments,
    ViTTrainingArguments,
    check_streaming_arguments,
    train,
)

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# The digits model of the main job (16 px, 4 px patches), on the tiny preset that other data sets get.
DIGITS_SIZED = (
    "image_size=16,patch_size=4,hidden_size=64,num_hidden_layers=4,num_attention_heads=4,intermediate_size=128"
)


def write_digit_shards(root: Path, train_shards: int = 4) -> Path:
    """The digits' splits as Parquet files named so that `datasets` finds the splits: 4 training shards."""
    digits = load_digits_dataset()
    folder = root / "data"
    folder.mkdir(parents=True)
    for index in range(train_shards):
        shard = digits["train"].shard(train_shards, index, contiguous=True)
        shard.to_parquet(folder / f"train-{index:05d}-of-{train_shards:05d}.parquet")
    for split in ("validation", "test"):
        digits[split].to_parquet(folder / f"{split}-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Path:
    return write_digit_shards(tmp_path_factory.mktemp("digit-shards"))


def write_webdataset(root: Path, per_split: dict[str, int]) -> Path:
    """Digits as WebDataset tars: `key.png` and `key.cls` (an integer label without a name) per example."""
    digits = load_digits_dataset()
    root.mkdir(parents=True)
    for split, count in per_split.items():
        with tarfile.open(root / f"{split}-00000.tar", "w") as archive:
            for index in range(count):
                example = digits["train" if split == "train" else "validation"][index]
                image = io.BytesIO()
                example["image"].save(image, format="PNG")
                for name, data in (
                    (f"{index:05d}.png", image.getvalue()),
                    (f"{index:05d}.cls", b"%d" % example["label"]),
                ):
                    member = tarfile.TarInfo(name)
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))
    return root


def train_transform() -> ImageClassificationTransform:
    return ImageClassificationTransform(default_image_processor(16, 1), num_channels=1, train=True)


def streamed_set(stream, process_index=0, num_processes=1, **kwargs) -> StreamedTrainingSet:
    part = split_for_process(stream, process_index, num_processes)
    return StreamedTrainingSet(
        part, train_transform(), seed=3, batch_size=16, num_labels=10, process_index=process_index, **kwargs
    )


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------


def test_parquet_shards_stream_the_training_split_and_read_the_evaluation_splits(digit_shards):
    train, evaluation = load_streamed_splits(str(digit_shards), max_eval_samples=50)
    assert isinstance(train, datasets.IterableDataset) and train.n_shards == 4
    assert train.features["label"].names == [str(digit) for digit in range(10)]
    assert set(evaluation) == {"validation", "test"}
    assert [len(split) for split in evaluation.values()] == [50, 50]
    assert evaluation["test"].features["label"] == train.features["label"]
    assert evaluation["validation"][0]["image"].size == (8, 8)  # decoded as images again


def test_webdataset_shards_with_integer_labels_are_named_from_the_evaluation_split(tmp_path):
    shards = write_webdataset(tmp_path / "wds", {"train": 12, "validation": 40})
    train, evaluation = load_streamed_splits(str(shards), image_column="png", label_column="cls")
    assert list(train.features) == ["image", "label"]  # `__key__` / `__url__` dropped
    largest = max(evaluation["validation"]["label"])
    assert evaluation["validation"].features["label"].names == [str(label) for label in range(largest + 1)]
    assert next(iter(train))["image"].size == (8, 8)


def test_a_stream_without_a_validation_split_or_with_a_missing_column_is_refused(tmp_path, digit_shards):
    shards = write_webdataset(tmp_path / "wds", {"train": 4})
    with pytest.raises(ValueError, match="no 'validation' split"):
        load_streamed_splits(str(shards), image_column="png", label_column="cls")
    with pytest.raises(ValueError, match=r"Column 'cls' not found .* available columns: \['image', 'label'\]"):
        load_streamed_splits(str(digit_shards), label_column="cls")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"dataset_name": None}, "streams the labelled data set of `--dataset_name`"),
        ({"max_steps": -1}, "give its length with `--max_steps`"),
        ({"eval_strategy": "epoch"}, "set `--eval_strategy` to steps"),
        ({"save_strategy": "epoch"}, "set `--save_strategy` to steps"),
        ({"shuffle_block_size": 0}, "`--shuffle_block_size` must be at least 1"),
    ],
)
def test_streaming_arguments_that_cannot_work_are_refused(tmp_path, flags, message):
    data_fields = {"dataset_name": "shards", "streaming": True, "shuffle_block_size": 100}
    training_fields = {"max_steps": 10, "eval_strategy": "steps", "save_strategy": "steps"}
    data_fields.update({key: value for key, value in flags.items() if key in data_fields})
    training_fields.update({key: value for key, value in flags.items() if key in training_fields})
    training_args = ViTTrainingArguments(output_dir=str(tmp_path), report_to="none", **training_fields)
    with pytest.raises(ValueError, match=message):
        check_streaming_arguments(DataArguments(**data_fields), training_args, labeled=True)


# ---------------------------------------------------------------------------------------------------------------------
# Batches: coverage, shuffling, exact resumption
# ---------------------------------------------------------------------------------------------------------------------


def test_each_pass_covers_this_process_part_once_and_the_two_parts_cover_the_split(digit_shards):
    train, _ = load_streamed_splits(str(digit_shards))
    expected = Counter(load_digits_dataset()["train"]["label"])
    per_pass = len(load_digits_dataset()["train"]) // 2  # 4 shards of 314 or 315: two per process
    covered = Counter()
    first_passes = []
    for process_index in (0, 1):
        batches = iter(streamed_set(train, process_index, 2, shuffle_block_size=64))
        labels = []
        while len(labels) < per_pass - 16:
            labels += next(batches)["labels"].tolist()
        while len(labels) % 16 == 0:  # up to the pass's last, smaller batch
            labels += next(batches)["labels"].tolist()
        covered.update(labels)
        second_pass = next(batches)["labels"].tolist()
        first_passes.append(labels)
        assert second_pass != labels[:16]  # each pass is shuffled anew
    assert covered == expected
    unshuffled = [example["label"] for example in split_for_process(train, 0, 2)]
    assert first_passes[0] != unshuffled[: len(first_passes[0])]
    assert sorted(first_passes[0]) == sorted(unshuffled)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_resumed_loader_continues_every_worker_bit_for_bit_across_passes(digit_shards, num_workers, tmp_path):
    train, _ = load_streamed_splits(str(digit_shards))
    mixer = MixupCutmix(10, mixup_alpha=0.8, cutmix_alpha=1.0)
    loader = streamed_data_loader(streamed_set(train, 1, 2, shuffle_block_size=50, batch_mixer=mixer), num_workers)
    batches = iter(loader)
    for _ in range(45):  # beyond the first pass (about 40 batches in this process's half)
        next(batches)
    save_stream_state(loader, tmp_path, process_index=1)
    assert (tmp_path / STREAM_STATE_FILE.format(process_index=1)).is_file()
    expected = [next(batches) for _ in range(12)]

    resumed = streamed_data_loader(streamed_set(train, 1, 2, shuffle_block_size=50, batch_mixer=mixer), num_workers)
    load_stream_state(resumed, tmp_path, process_index=1)
    again = iter(resumed)
    for batch in expected:
        other = next(again)
        for name in ("pixel_values", "labels", SOFT_LABELS):
            assert torch.equal(batch[name], other[name]), name


def test_a_label_beyond_the_head_is_refused_with_its_value(tmp_path):
    shards = write_webdataset(tmp_path / "wds", {"train": 40, "validation": 3})  # the first 3 name too few classes
    train, evaluation = load_streamed_splits(str(shards), image_column="png", label_column="cls")
    num_labels = evaluation["validation"].features["label"].num_classes
    stream = StreamedTrainingSet(train, train_transform(), seed=0, batch_size=8, num_labels=num_labels)
    with pytest.raises(ValueError, match=rf"labels \[.*\] outside \[0, {num_labels}\)"):
        next(iter(stream))


# ---------------------------------------------------------------------------------------------------------------------
# Both training loops, two processes
# ---------------------------------------------------------------------------------------------------------------------


def run_args(output_dir: Path, shards: Path, *extra: str, config: str = DIGITS_SIZED) -> list[str]:
    return [
        "--output_dir",
        str(output_dir),
        "--dataset_name",
        str(shards),
        "--config_overrides",
        config,
        "--learning_rate",
        "2e-3",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--num_demo_predictions",
        "0",
        "--eval_strategy",
        "no",
        *extra,
    ]


def test_two_streaming_processes_reach_the_map_style_accuracy_and_resume_exactly(tmp_path, digit_shards):
    # The same images and optimiser steps (16 epochs of 1,257 at 32 a step), read map-style by one process and
    # streamed by two (16 each), the streamed run in the Accelerate loop, checkpointed at step 500.
    map_style = run_args(tmp_path / "map", digit_shards, "--num_train_epochs", "16", "--save_strategy", "no")
    parser = HfArgumentParser((ModelArguments, DataArguments, ViTTrainingArguments))
    train(*parser.parse_args_into_dataclasses([*map_style, "--per_device_train_batch_size", "32"]))
    streamed = [
        *run_args(tmp_path / "stream", digit_shards, "--streaming", "true", "--max_steps", "629"),
        *("--per_device_train_batch_size", "16", "--save_strategy", "steps", "--save_steps", "500"),
        *("--dataloader_num_workers", "1"),
    ]
    accelerate_script = str(REPO / "scripts" / "train_accelerate.py")
    output = run_bounded([*TORCHRUN, accelerate_script, *streamed])
    assert "world size 2, model wrapped in DistributedDataParallel" in output

    map_accuracy = json.loads((tmp_path / "map" / "all_results.json").read_text())["test_accuracy"]
    stream_accuracy = json.loads((tmp_path / "stream" / "all_results.json").read_text())["test_accuracy"]
    assert map_accuracy >= 0.85 and stream_accuracy >= 0.85
    assert abs(map_accuracy - stream_accuracy) <= 0.05

    # Resumed from the checkpoint (each process's stream state is in it), the run ends bit for bit alike.
    checkpoint = tmp_path / "stream" / "step_500"
    assert sorted(path.name for path in checkpoint.glob("stream_state_*.pt")) == [
        "stream_state_0.pt",
        "stream_state_1.pt",
    ]
    shutil.copytree(checkpoint, tmp_path / "resumed" / checkpoint.name)
    resumed_args = [*streamed, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"]
    run_bounded([*TORCHRUN, accelerate_script, *resumed_args])
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("stream", "resumed"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


def test_trainer_streams_with_two_processes_and_resumes_exactly(tmp_path, digit_shards):
    # Dropout, crops, TrivialAugment, Mixup and two workers per process: every random stream must be restored.
    config = f"{TINY_OVERRIDES},image_size=16,patch_size=4,hidden_dropout_prob=0.1"
    quick = [
        *run_args(tmp_path / "full", digit_shards, "--streaming", "true", "--max_steps", "12", config=config),
        *("--per_device_train_batch_size", "8", "--save_strategy", "steps", "--save_steps", "6"),
        *("--eval_strategy", "steps", "--eval_steps", "6"),  # evaluating in between leaves the streams alone
        *(
            "--shuffle_block_size",
            "64",
            "--dataloader_num_workers",
            "2",
            "--mixup_alpha",
            "0.8",
            "--trivial_augment",
            "true",
        ),
    ]
    script = str(REPO / "scripts" / "train.py")
    assert "world size 2, model wrapped in DistributedDataParallel" in run_bounded([*TORCHRUN, script, *quick])
    shutil.copytree(tmp_path / "full" / "checkpoint-6", tmp_path / "resumed" / "checkpoint-6")
    resumed_args = [*quick, "--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint", "latest"]
    run_bounded([*TORCHRUN, script, *resumed_args])
    full, resumed = (load_file(tmp_path / name / "model.safetensors") for name in ("full", "resumed"))
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    history = json.loads((tmp_path / "full" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_accuracy" in entry] == [6, 12]
    midway = load_file(tmp_path / "full" / "checkpoint-6" / "model.safetensors")
    assert not torch.equal(midway["classifier.weight"], full["classifier.weight"])


def test_resuming_a_stream_from_a_checkpoint_without_its_state_names_the_missing_file(tmp_path, digit_shards):
    train, _ = load_streamed_splits(str(digit_shards))
    loader = streamed_data_loader(streamed_set(train), num_workers=0)
    with pytest.raises(ValueError, match=r"has no stream_state_0\.pt: it was not saved by a streamed run"):
        load_stream_state(loader, tmp_path, process_index=0)
