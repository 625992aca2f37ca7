"""Accelerate path end to end: the library's `train_with_accelerate`, the script under torchrun, accumulation, resuming
from a mid-epoch checkpoint, bf16 on CPU, the model's own evaluation loss and the launcher configuration files."""

import json
import math
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from accelerate import Accelerator
from conftest import TINY_OVERRIDES, run_bounded, small_run_args, tiny_config_kwargs
from safetensors.torch import load_file
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification, HfArgumentParser

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.accelerate_loop import AccelerateArguments, evaluate, train_with_accelerate
from hf_vit_custom.persistence import ACCELERATE_CHECKPOINTS, newest_complete_checkpoint
from hf_vit_custom.training import DataArguments, ModelArguments

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_accelerate.py"
CONFIGS = REPO / "scripts" / "configs"


def quick_args(output_dir, *extra: str) -> list[str]:
    return [
        *small_run_args(output_dir),
        "--disable_tqdm",
        "true",
        "--num_demo_predictions",
        "0",
        *extra,
    ]


def parse(args: list[str]):
    return HfArgumentParser((ModelArguments, DataArguments, AccelerateArguments)).parse_args_into_dataclasses(args=args)


def train_in_process(output_dir, *extra: str) -> dict:
    return train_with_accelerate(*parse(quick_args(output_dir, *extra)))


def run_script(args: list[str], launcher: list[str], timeout: int = 300) -> str:
    """Run the script in its own process group, ending it with SIGTERM, then SIGKILL, if it hangs; return its output."""
    command = [*launcher, str(SCRIPT), *args]
    return run_bounded(command, timeout)


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def weight_difference(first: Path, second: Path) -> float:
    a, b = weights(first), weights(second)
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def results(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def test_train_on_digits_writes_a_model_that_loads_and_predicts(tmp_path):
    # Batch 8 for 4 epochs: 64 steps, enough for the loss averaged over each epoch (logged every 16 steps) to fall.
    metrics = train_in_process(
        tmp_path,
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        "8",
        "--num_train_epochs",
        "4",
        "--logging_steps",
        "16",
        "--report_to",
        "tensorboard",
        "--num_demo_predictions",
        "3",
    )

    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "all_results.json",
        "log_history.json",
        "training_curve.png",
        "attention_maps.png",
        "modeling_vit_custom.py",
    ):
        assert (tmp_path / name).exists(), name
    saved = results(tmp_path)
    assert {"test_accuracy", "test_f1", "test_top5_accuracy", "eval_accuracy", "eval_loss", "train_loss"} <= set(saved)
    assert saved["test_accuracy"] == metrics["test_accuracy"]
    assert saved["world_size"] == 1
    assert saved["train_steps"] == 4 * 128 // 8
    assert saved["test_samples"] == saved["eval_samples"] == 64
    history = json.loads((tmp_path / "log_history.json").read_text())
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) == 4
    assert losses[-1] < losses[0]
    assert [entry["epoch"] for entry in history if "eval_accuracy" in entry] == [1, 2, 3, 4]
    assert list((tmp_path / "runs").glob("events.out.tfevents.*")), "no TensorBoard log"
    assert len(metrics["demo_predictions"]) == 3
    assert {row["true"] for row in metrics["demo_predictions"]} <= {str(d) for d in range(10)}
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.id2label == {d: str(d) for d in range(10)}
    assert reloaded.config.hidden_size == 32
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, weights(tmp_path)[name]), name


# Plain SGD, no augmentation, no dropout: runs with the same global batch compute the same sums in another order, so
# they agree up to float32 rounding. (With Adam, the attention key bias, whose true gradient is exactly zero since
# softmax ignores a constant shift of the scores, turns rounding noise into learning-rate-sized steps: runs that
# should agree then differ by ~lr there, whatever the tolerance on the rest.)
EQUIVALENCE = [
    "--optim",
    "sgd",
    "--learning_rate",
    "0.05",
    "--warmup_steps",
    "0",
    "--min_crop_scale",
    "1.0",
    "--max_eval_samples",
    "63",  # 2 processes then get 32 + 31 examples: the sharded loader pads, gather_for_metrics must drop the pad
]
# Measured: ~7e-9 between these runs (2 float32 ulps of weights of size ~0.04, after 16 steps). A real difference
# (another batch composition, a lost or doubled gradient, a wrong schedule) is of the order of lr * |gradient| per
# step: the negative control below (batch 8 without accumulation) ends 6e-3 away. 1e-6 sits >100x above the rounding
# noise and >1000x below a real difference.
FLOAT32_DRIFT = 1e-6


@pytest.fixture(scope="module")
def one_process_batch_16(tmp_path_factory) -> Path:
    """One process, batch 16: the reference for the accumulation and the two-process runs."""
    output_dir = tmp_path_factory.mktemp("batch16")
    train_in_process(output_dir, *EQUIVALENCE)
    return output_dir


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, one_process_batch_16):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    output = run_script(
        quick_args(tmp_path, *EQUIVALENCE, "--per_device_train_batch_size", "8", "--num_demo_predictions", "2"),
        launcher=torchrun,
    )
    # Several launch paths silently fall back to one process: prove that two ran, inside DDP.
    assert "world size 2, model wrapped in DistributedDataParallel" in output
    two, one = results(tmp_path), results(one_process_batch_16)
    assert two["world_size"] == 2
    assert two["train_steps"] == one["train_steps"] == 2 * 128 // 16
    assert weight_difference(one_process_batch_16, tmp_path) <= FLOAT32_DRIFT
    # Exact evaluation on a split that does not divide evenly between the processes.
    assert two["test_samples"] == two["eval_samples"] == 63
    assert two["test_accuracy"] == one["test_accuracy"]
    assert two["test_loss"] == pytest.approx(one["test_loss"], abs=1e-5)
    assert two["train_loss"] == pytest.approx(one["train_loss"], abs=1e-5)
    assert "Test accuracy" in output and output.count("  predicted ") == 2  # printed once, by the main process


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, one_process_batch_16):
    batch_8 = ["--per_device_train_batch_size", "8"]
    accumulated = train_in_process(
        tmp_path / "accumulated", *EQUIVALENCE, *batch_8, "--gradient_accumulation_steps", "2"
    )
    assert accumulated["train_steps"] == 2 * 128 // 16
    assert weight_difference(one_process_batch_16, tmp_path / "accumulated") <= FLOAT32_DRIFT
    # Negative control: twice as many steps on half the batch is a different training, far beyond the tolerance.
    train_in_process(tmp_path / "small_batch", *EQUIVALENCE, *batch_8)
    assert weight_difference(one_process_batch_16, tmp_path / "small_batch") > 100 * FLOAT32_DRIFT


def test_resume_from_a_mid_epoch_checkpoint_matches_an_uninterrupted_run(tmp_path):
    # Augmentation and dropout on, so that the crops and the model's random stream must be restored exactly too.
    resumable = [
        "--config_overrides",
        f"{TINY_OVERRIDES},hidden_dropout_prob=0.1,drop_path_rate=0.1",
        "--min_crop_scale",
        "0.6",
        "--save_strategy",
        "steps",
        "--save_steps",
        "5",
        "--save_total_limit",
        "5",
        "--logging_steps",
        "2",
    ]
    full = train_in_process(tmp_path / "full", *resumable)
    assert sorted(path.name for path in (tmp_path / "full").glob("step_*")) == ["step_10", "step_15", "step_5"]
    # 8 steps per epoch: step 5 is inside the first epoch.
    progress = json.loads((tmp_path / "full" / "step_5" / "training_progress.json").read_text())
    assert (progress["epoch"], progress["batches_in_epoch"], progress["completed_steps"]) == (0, 5, 5)
    assert not list((tmp_path / "full" / "step_5").glob("custom_checkpoint_*"))  # no pickle to load on resume

    # Resume a copy of that checkpoint in a fresh folder; "latest" finds it.
    shutil.copytree(tmp_path / "full" / "step_5", tmp_path / "resumed" / "step_5")
    assert newest_complete_checkpoint(tmp_path / "resumed", ACCELERATE_CHECKPOINTS).name == "step_5"
    resumed = train_in_process(tmp_path / "resumed", *resumable, "--resume_from_checkpoint", "latest")

    for folder in ("", "step_10", "step_15"):  # the final model and every checkpoint written after the resumption
        a, b = weights(tmp_path / "full" / folder), weights(tmp_path / "resumed" / folder)
        for name in a:
            assert torch.equal(a[name], b[name]), f"{folder}/{name}"
    assert not torch.equal(
        weights(tmp_path / "full" / "step_5")["classifier.weight"], weights(tmp_path / "full")["classifier.weight"]
    )
    for key in ("train_loss", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
        assert resumed[key] == full[key], key

    def timeless(path: Path) -> list[dict]:
        history = json.loads((path / "log_history.json").read_text())
        return [{k: v for k, v in entry.items() if "runtime" not in k and "per_second" not in k} for entry in history]

    assert timeless(tmp_path / "resumed") == timeless(tmp_path / "full")


def test_bf16_mixed_precision_on_cpu(tmp_path):
    small = ["--max_train_samples", "32", "--max_eval_samples", "32", "--num_train_epochs", "1", "--logging_steps", "1"]
    bf16 = train_in_process(tmp_path / "bf16", *small, "--bf16", "true")
    losses = [
        entry["loss"] for entry in json.loads((tmp_path / "bf16" / "log_history.json").read_text()) if "loss" in entry
    ]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert math.isfinite(bf16["test_loss"]) and math.isfinite(bf16["train_loss"])
    # Autocast really ran in bf16: the same run in float32 ends close to, but not exactly at, the same weights.
    train_in_process(tmp_path / "fp32", *small)  # neither --bf16 nor a launcher: float32
    assert 0 < weight_difference(tmp_path / "bf16", tmp_path / "fp32") < 1e-2
    assert weights(tmp_path / "bf16")["classifier.weight"].dtype == torch.float32  # master weights stay float32


def test_default_checkpoints_every_epoch_keep_the_newest_two_and_resume(tmp_path):
    # The Trainer script's defaults: save each epoch, keep `save_total_limit` (2). 8 optimiser steps an epoch.
    full = train_in_process(tmp_path / "full", "--num_train_epochs", "3")
    assert sorted(path.name for path in (tmp_path / "full").glob("step_*")) == ["step_16", "step_24"]
    shutil.copytree(tmp_path / "full" / "step_16", tmp_path / "resumed" / "step_16")
    resumed = train_in_process(tmp_path / "resumed", "--num_train_epochs", "3", "--resume_from_checkpoint", "latest")
    for name, tensor in weights(tmp_path / "full").items():
        assert torch.equal(tensor, weights(tmp_path / "resumed")[name]), name
    for key in ("train_loss", "eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
        assert resumed[key] == full[key], key


def test_settings_are_the_trainer_scripts_flags():
    _, _, args = parse(quick_args("out", "--optim", "sgd", "--bf16", "true", "--save_strategy", "steps"))
    assert (args.optim, args.mixed_precision, args.save_strategy) == ("sgd", "bf16", "steps")
    _, _, defaults = parse([])
    assert defaults.output_dir == "outputs/vit-digits-accelerate"
    assert (defaults.learning_rate, defaults.num_train_epochs, defaults.warmup_steps) == (1e-3, 60, 0.05)
    with pytest.raises(ValueError, match=r"`num_train_epochs` must be at least 1, got 0"):
        parse(["--num_train_epochs", "0"])
    with pytest.raises(ValueError, match=r"`num_train_epochs` must be a whole number"):
        parse(["--num_train_epochs", "2.5"])
    with pytest.raises(ValueError, match=r"`save_strategy` must be no, steps or epoch"):
        parse(["--save_strategy", "best", "--metric_for_best_model", "loss"])
    with pytest.raises(ValueError, match="not used by the HfArgumentParser"):  # the old loop-only flag
        parse(["--checkpointing_steps", "5"])


def test_evaluation_loss_is_the_models_own_for_multi_label_targets():
    """Multi-hot float labels, batches of unequal size: the loss is BCE with logits over the whole set."""
    torch.manual_seed(0)
    config = ViTCustomConfig(**tiny_config_kwargs(num_labels=4, problem_type="multi_label_classification"))
    model = ViTCustomForImageClassification(config).eval()
    pixel_values, labels = torch.randn(10, 3, 16, 16), (torch.rand(10, 4) > 0.5).float()
    examples = [{"pixel_values": p, "labels": y} for p, y in zip(pixel_values, labels, strict=True)]
    accelerator = Accelerator(cpu=True)
    prepared_model, loader = accelerator.prepare(model, DataLoader(examples, batch_size=4))  # batches of 4, 4, 2
    result = evaluate(prepared_model, loader, accelerator)
    with torch.no_grad():
        expected = binary_cross_entropy_with_logits(model(pixel_values).logits, labels)
    assert result["samples"] == 10
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert "accuracy" not in result  # accuracy and F1 need class indices


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_launcher_configs_parse_into_what_accelerate_launch_sets(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert (config.num_processes, config.mixed_precision) == (8, "bf16")
    # What `accelerate launch --config_file` does with the file: its arguments, then its workers' environment.
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), str(SCRIPT)]))
    assert args.num_processes == 8
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"  # reaches the script, whose --bf16 is unset
    if name == "ddp":
        assert args.multi_gpu and not args.use_fsdp
        return
    assert args.use_fsdp and env["ACCELERATE_USE_FSDP"] == "true"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True  # FULL_SHARD
    assert plugin.transformer_cls_names_to_wrap == ["ViTCustomEncoderLayer"]
    model = ViTCustomForImageClassification(
        ViTCustomConfig(image_size=8, patch_size=2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
    )
    wrapped = [module for module in model.modules() if type(module).__name__ in plugin.transformer_cls_names_to_wrap]
    assert len(wrapped) == 2  # one FSDP unit per encoder layer
    assert set(plugin.transformer_cls_names_to_wrap) <= set(model._no_split_modules)
