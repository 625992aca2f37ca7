"""Trainer path end to end: the library's `train`, the script, checkpoints, accumulation and two processes."""

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, make_image_folder, run_bounded, small_run_args, tiny_config_kwargs
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification, HfArgumentParser, ViTImageProcessorPil

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.cpu_speed import CPU_SDPA
from hf_vit_custom.data import load_digits_dataset
from hf_vit_custom.training import (
    DataArguments,
    ModelArguments,
    ViTTrainer,
    ViTTrainingArguments,
    decay_parameter_names,
    optimizer_parameter_groups,
    prepare_data_and_model,
    train,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO / "scripts" / "train.py"


def parse(args: list[str]):
    parser = HfArgumentParser((ModelArguments, DataArguments, ViTTrainingArguments))
    return parser.parse_args_into_dataclasses(args=args)


def quick_args(output_dir, *extra: str) -> list[str]:
    return [
        *small_run_args(output_dir),
        "--disable_tqdm",
        "true",
        "--num_demo_predictions",
        "3",
        *extra,
    ]


def run_script(args: list[str], launcher: list[str] | None = None, timeout: int = 300) -> str:
    """Run the training script (through `launcher`, e.g. torchrun) with a bounded time; return its output."""
    return run_bounded([*(launcher or [sys.executable]), str(TRAIN_SCRIPT), *args], timeout)


def test_weight_decay_skips_biases_norms_class_token_and_positions():
    model = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(num_hidden_layers=1, num_labels=3)))
    decayed = set(decay_parameter_names(model))
    assert decayed == {
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.layers.0.attention.qkv.weight",
        "vit.layers.0.attention.proj.weight",
        "vit.layers.0.mlp.fc1.weight",
        "vit.layers.0.mlp.fc2.weight",
        "classifier.weight",
    }
    groups = optimizer_parameter_groups(model, weight_decay=0.05)
    assert [group["weight_decay"] for group in groups] == [0.05, 0.0]
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    assert any(p is model.vit.embeddings.cls_token for p in groups[1]["params"])


def test_trainer_optimizer_uses_the_same_decay_groups(tmp_path):
    model = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(num_hidden_layers=1, num_labels=3)))
    args = ViTTrainingArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="no")
    trainer = ViTTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] > 0 for p in group["params"]}
    expected = {id(p) for name, p in model.named_parameters() if name in set(decay_parameter_names(model))}
    assert decayed == expected


def test_train_on_digits_writes_a_model_that_loads_and_predicts(tmp_path):
    model_args, data_args, training_args = parse(quick_args(tmp_path, "--logging_steps", "2"))
    metrics = train(model_args, data_args, training_args)

    for name in (
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "all_results.json",
        "training_curve.png",
        "modeling_vit_custom.py",
    ):
        assert (tmp_path / name).exists(), name
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert {"test_accuracy", "test_f1", "test_top5_accuracy", "eval_accuracy", "train_loss"} <= set(results)
    assert results["test_accuracy"] == metrics["test_accuracy"]
    losses = [
        entry["loss"]
        for entry in json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
        if "loss" in entry
    ]
    assert losses[-1] < losses[0]
    assert len(metrics["demo_predictions"]) == 3
    assert {row["true"] for row in metrics["demo_predictions"]} <= {str(d) for d in range(10)}
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config.id2label == {d: str(d) for d in range(10)}
    assert reloaded.config.image_size == 16
    with Image.open(tmp_path / "training_curve.png") as curve:
        assert curve.size == (1000, 400)
    with Image.open(tmp_path / "attention_maps.png") as grid:  # the 3 demo images, each over its attention map
        assert grid.size == (3 * 150, 340)


def test_train_on_an_image_folder(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("circle", "square"), per_class=12)
    model_args, data_args, training_args = parse(
        [
            *quick_args(tmp_path / "out"),
            "--train_dir",
            str(folder),
            "--config_name",
            "vit-tiny-patch16-224",
            "--config_overrides",
            f"{TINY_OVERRIDES},image_size=16,patch_size=4",
            "--horizontal_flip",
            "true",
        ]
    )
    metrics = train(model_args, data_args, training_args)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert reloaded.config.id2label == {0: "circle", 1: "square"}
    assert reloaded.config.num_channels == 3
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert "top5" not in " ".join(metrics)  # two classes: no top-5


def test_fine_tune_a_checkpoint_with_a_new_label_set(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=("a", "b", "c"))
    base = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(num_labels=10)))
    base.save_pretrained(tmp_path / "base")
    args = [*quick_args(tmp_path / "out"), "--train_dir", str(folder), "--model_name_or_path", str(tmp_path / "base")]
    args[args.index(TINY_OVERRIDES)] = "drop_path_rate=0.1"  # overrides that keep the weights' shapes apply
    train(*parse(args))
    tuned = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert tuned.config.drop_path_rate == 0.1
    assert tuned.classifier.out_features == 3
    assert tuned.config.label2id == {"a": 0, "b": 1, "c": 2}


def test_fine_tuning_a_checkpoint_missing_encoder_weights_is_refused(tmp_path):
    """The loading info the head replacement needs must not hide encoder weights that would stay random."""
    folder = make_image_folder(tmp_path / "images", classes=("a", "b"))
    base = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs()))
    state_dict = {key: value for key, value in base.state_dict().items() if not key.startswith("vit.layers.1.")}
    base.save_pretrained(tmp_path / "base", state_dict=state_dict)
    args = [*quick_args(tmp_path / "out"), "--train_dir", str(folder), "--model_name_or_path", str(tmp_path / "base")]
    with pytest.raises(OSError, match="lacks 12 encoder weights"):
        train(*parse(args))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_training_on_the_cpu_uses_the_cpu_speed_ups(tmp_path):
    model_args, data_args, training_args = parse(quick_args(tmp_path / "out"))
    assert training_args.use_cpu  # no accelerator here
    prepared = prepare_data_and_model(model_args, data_args, training_args)
    assert prepared.model.config._attn_implementation == CPU_SDPA


def test_trainer_trains_a_family_model_from_config_overrides(tmp_path):
    """DINOv2-style registers, SigLIP-style attention pooling, layer scale and SwiGLU through `--config_overrides`:
    Trainer trains, evaluates and saves it, and the saved folder reloads through the Auto classes."""
    family = "num_register_tokens=2,no_embed_class=true,pooling=map,layer_scale_init_value=1e-5,mlp_type=glu"
    args = quick_args(tmp_path / "out")
    args[args.index(TINY_OVERRIDES)] = f"{TINY_OVERRIDES},{family},hidden_act=silu"
    metrics = train(*parse(args))
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["train_runtime"] > 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert model.config.num_prefix_tokens == 3 and model.config.pooling == "map"
    assert model.config.layer_scale_init_value == 1e-5 and model.config.mlp_type == "glu"


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


@pytest.mark.parametrize("step", [8, 5], ids=["epoch-boundary", "mid-epoch"])  # 8 steps per epoch
def test_resume_from_checkpoint_restores_every_weight_and_matches_an_uninterrupted_run(tmp_path, step):
    # Random crops and stochastic depth on, so that any random draw the resumed run repeats or skips shows up.
    common = [
        "--min_crop_scale",
        "0.6",
        "--config_overrides",
        f"{TINY_OVERRIDES},drop_path_rate=0.1",
        "--save_strategy",
        "steps",
        "--save_steps",
        str(step),
        "--save_total_limit",
        "5",
        "--eval_strategy",
        "no",
        "--num_demo_predictions",
        "0",
    ]
    train(*parse([*quick_args(tmp_path / "full"), *common]))
    # Resume a copy of the run from its checkpoint at `step` (of 16) in a fresh output folder.
    midway = tmp_path / "resumed" / f"checkpoint-{step}"
    shutil.copytree(tmp_path / "full" / f"checkpoint-{step}", midway)
    train(*parse([*quick_args(tmp_path / "resumed"), *common, "--resume_from_checkpoint", str(midway)]))
    full, resumed = final_weights(tmp_path / "full"), final_weights(tmp_path / "resumed")
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    assert not torch.equal(load_file(midway / "model.safetensors")["classifier.weight"], full["classifier.weight"])


def weight_difference(first: Path, second: Path) -> float:
    a, b = final_weights(first), final_weights(second)
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


# SGD, no augmentation, no dropout: runs with the same global batch compute the same maths in another summation
# order. (With Adam, the attention key bias, whose true gradient is exactly zero, turns rounding noise into
# learning-rate-sized steps, so runs that should agree can differ by ~lr there.)
EQUIVALENCE = [
    "--optim",
    "sgd",
    "--learning_rate",
    "0.05",
    "--min_crop_scale",
    "1.0",
    "--eval_strategy",
    "no",
    "--save_strategy",
    "no",
    "--num_demo_predictions",
    "0",
    "--dataloader_drop_last",
    "true",
    "--warmup_steps",
    "0",
]
FLOAT32_DRIFT = 1e-5  # a few dozen steps of float32 rounding, far below any real difference (~1e-2 per step)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    train(*parse([*quick_args(tmp_path / "big"), *EQUIVALENCE, "--per_device_train_batch_size", "16"]))
    train(
        *parse(
            [
                *quick_args(tmp_path / "accumulated"),
                *EQUIVALENCE,
                "--per_device_train_batch_size",
                "8",
                "--gradient_accumulation_steps",
                "2",
            ]
        )
    )
    assert weight_difference(tmp_path / "big", tmp_path / "accumulated") <= FLOAT32_DRIFT
    state = json.loads((tmp_path / "accumulated" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 * 128 // 16


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single = run_script([*quick_args(tmp_path / "one"), *EQUIVALENCE, "--per_device_train_batch_size", "16"])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = run_script(
        [*quick_args(tmp_path / "two"), *EQUIVALENCE, "--per_device_train_batch_size", "8"], launcher=torchrun
    )
    assert "world size 1, model wrapped in ViTCustomForImageClassification" in single
    # Several launch paths silently fall back to one process: prove that two ran, inside DDP.
    assert "world size 2, model wrapped in DistributedDataParallel" in double
    assert weight_difference(tmp_path / "one", tmp_path / "two") <= FLOAT32_DRIFT
    assert "Test accuracy" in double


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_accelerate_launch_runs_two_processes_on_cpu(tmp_path):
    # Without `--multi_gpu`, `accelerate launch --num_processes 2` on a machine with no GPU starts one process.
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    result = run_script([*quick_args(tmp_path), "--num_train_epochs", "1", "--eval_strategy", "no"], launcher=launcher)
    assert "world size 2, model wrapped in DistributedDataParallel" in result
    assert json.loads((tmp_path / "all_results.json").read_text())["test_accuracy"] >= 0.0


def test_bad_dataset_column_stops_before_training(tmp_path):
    folder = make_image_folder(tmp_path / "images")
    with pytest.raises(ValueError, match="image_column"):
        train(*parse([*quick_args(tmp_path / "out"), "--train_dir", str(folder), "--image_column", "img"]))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_main_job_reaches_the_accuracy_bar_with_default_arguments(tmp_path):
    """The README's first command: default digits run, saved, reloaded through the Auto classes and `pipeline`; its
    int8 ONNX export keeps the accuracy."""
    result = run_script(["--output_dir", str(tmp_path), "--report_to", "none", "--disable_tqdm", "true"], timeout=600)
    results = json.loads((tmp_path / "all_results.json").read_text())
    assert results["test_accuracy"] >= 0.97
    assert f"Test accuracy: {results['test_accuracy']:.4f}" in result
    prediction_lines = [line for line in result.splitlines() if line.strip().startswith("predicted")]
    assert len(prediction_lines) == 8
    assert sum(line.split()[1] == line.split()[3] for line in prediction_lines) >= 6

    # Its int8 ONNX export keeps the accuracy (the test split of the same seeded split).
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from hf_vit_custom.onnx_export import OnnxImageClassifier, export_onnx

    model = AutoModelForImageClassification.from_pretrained(tmp_path)
    export_onnx(model, ViTImageProcessorPil.from_pretrained(tmp_path), tmp_path / "onnx", int8=True)
    test_split = load_digits_dataset()["test"]
    labels = np.array(test_split["label"])
    predictions = {
        int8: OnnxImageClassifier(tmp_path / "onnx", threads=1, int8=int8).logits(list(test_split["image"])).argmax(1)
        for int8 in (False, True)
    }
    assert np.mean(predictions[False] == labels) == pytest.approx(results["test_accuracy"])
    assert np.mean(predictions[True] == labels) >= results["test_accuracy"] - 0.01


def test_early_stopping_ends_training_when_accuracy_stops_improving(tmp_path):
    # A learning rate of zero freezes the model, so the second evaluation is no better than the first.
    args = [*quick_args(tmp_path), "--num_train_epochs", "4", "--learning_rate", "0", "--early_stopping_patience", "1"]
    model_args, data_args, training_args = parse(args)
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == "accuracy"
    train(model_args, data_args, training_args)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["epoch"] == 2.0
    assert len([entry for entry in state["log_history"] if "eval_accuracy" in entry]) == 2


def test_default_workers_feed_a_gpu_within_each_process_share_of_the_cpus(monkeypatch):
    from hf_vit_custom.training import default_dataloader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_dataloader_workers(use_cpu=False) == 14  # ceil(3493 / 254): the GPU's rate, not the 63 CPUs left
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_dataloader_workers(use_cpu=False) == 7  # 8 CPUs per process, one for the process itself
    assert default_dataloader_workers(use_cpu=True) == 0
    assert ViTTrainingArguments(output_dir="unused", use_cpu=True).dataloader_num_workers == 0
    assert ViTTrainingArguments(output_dir="unused", dataloader_num_workers=3).dataloader_num_workers == 3


@pytest.mark.parametrize(
    "recipe",
    [[], ["--mixup_alpha", "0.8", "--cutmix_alpha", "1.0", "--label_smoothing_factor", "0.1", "--bf16", "true"]],
    ids=["plain", "mixup-cutmix-bf16"],
)
def test_trainer_compiles_the_training_forward_without_graph_breaks(tmp_path, recipe, compile_counters):
    """`--torch_compile true` as Trainer applies it (through Accelerate, under its autocast), with labels: dynamo's
    eager backend traces the same graphs as inductor, without inductor's minutes of code generation on a CPU."""
    flags = ["--torch_compile", "true", "--torch_compile_backend", "eager", "--eval_strategy", "no", *recipe]
    train(*parse(quick_args(tmp_path, "--save_strategy", "no", "--num_demo_predictions", "0", *flags)))
    assert compile_counters["stats"]["calls_captured"] > 0  # something was compiled
    assert dict(compile_counters["graph_break"]) == {}
