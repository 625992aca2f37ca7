"""`--fp8`: refused where the hardware or torchao is missing; where they are, the blocks' linears train in FP8.

The end-to-end runs need torchao and are skipped where it does not import (it is not a dependency: installed, it
loads with every `transformers` import). They run on the CPU with the hardware check bypassed: torchao's FP8
matmul then runs emulated, which exercises the same conversion, training, checkpoints and saving as on an FP8 GPU;
`tests/test_cuda.py` checks the GPU kernels themselves.
"""

import pytest
import torch
from conftest import needs_torchao, script_arguments, small_run_args, tiny_config_kwargs
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import hf_vit_custom.accelerate_loop as accelerate_loop
import hf_vit_custom.fp8 as fp8
import hf_vit_custom.training as training
from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.modeling_vit_custom_mae import ViTCustomForMaskedImageModeling


def converted_names(model: torch.nn.Module) -> set[str]:
    return {name for name, module in model.named_modules() if fp8.converts_to_fp8(module, name)}


def test_the_blocks_linears_convert_and_the_head_stays():
    model = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(num_hidden_layers=2, num_labels=16)))
    blocks = {f"vit.layers.{i}.{name}" for i in range(2) for name in ("attention.qkv", "attention.proj", "mlp.fc1")}
    assert converted_names(model) == blocks | {f"vit.layers.{i}.mlp.fc2" for i in range(2)}
    assert not fp8.converts_to_fp8(model.classifier, "classifier")  # 16 classes: FP8-sized, but the head


def test_mae_converts_the_encoder_and_decoder_blocks_only():
    config = ViTCustomConfig(**tiny_config_kwargs(decoder_hidden_size=32, decoder_intermediate_size=64))
    names = converted_names(ViTCustomForMaskedImageModeling(config))
    assert names and all(name.startswith(("vit.layers.", "decoder.layers.")) for name in names)
    assert any(name.startswith("decoder.layers.") for name in names)


def test_a_linear_whose_size_fp8_cannot_take_stays():
    model = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(intermediate_size=72)))
    names = converted_names(model)
    assert "vit.layers.0.attention.qkv" in names  # 32 -> 96
    assert not any(name.endswith(("fc1", "fc2")) for name in names)  # 72 is no multiple of 16


def test_fp8_is_refused_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"--fp8.*compute capability 8\.9.*none"):
        training.ViTTrainingArguments(fp8=True, report_to="none")


def test_fp8_is_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert fp8.fp8_unavailable_reason() == (
        "`--fp8` needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or later: L4, L40S, H100, H200, "
        "B200); the NVIDIA A100-SXM4-80GB has compute capability 8.0."
    )
    assert "none" in fp8.fp8_unavailable_reason(use_cpu=True)  # `--use_cpu` on that machine


def test_fp8_without_torchao_names_the_install(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(fp8, "is_torchao_available", lambda: False)
    assert (
        fp8.fp8_unavailable_reason() == "`--fp8` trains through torchao, which is not installed: `pip install torchao`."
    )


def test_fp8_with_fp16_is_refused():
    with pytest.raises(ValueError, match=r"--fp8.*--fp16"):
        training.ViTTrainingArguments(fp8=True, fp16=True, report_to="none")


def test_accelerate_launchs_fp8_switch_means_fp8_with_the_same_checks(monkeypatch):
    """`accelerate launch --mixed_precision fp8` reaches the scripts as ACCELERATE_MIXED_PRECISION."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(ValueError, match=r"--fp8.*none"):
        training.ViTTrainingArguments(use_cpu=True, report_to="none")
    monkeypatch.setattr(training, "fp8_unavailable_reason", lambda use_cpu=False: None)
    arguments = training.ViTTrainingArguments(use_cpu=True, report_to="none")
    assert arguments.fp8 and arguments.mixed_precision == "fp8"


@needs_torchao
def test_the_recipe_pads_every_batch_size_to_fp8_matmul_sizes_and_keeps_weights_saveable():
    config = fp8.fp8_recipe().config
    assert config.pad_inner_dim and not config.enable_fsdp_float8_all_gather


@pytest.fixture
def fp8_on_this_cpu(monkeypatch):
    """Let `--fp8` through on the CPU, where torchao emulates the FP8 matmul."""
    monkeypatch.setattr(training, "fp8_unavailable_reason", lambda use_cpu=False: None)


def fp8_run_args(output_dir) -> list[str]:
    return [*small_run_args(output_dir), "--fp8", "true", "--disable_tqdm", "true", "--num_demo_predictions", "2"]


def assert_saved_as_a_plain_model(output_dir, trained: torch.nn.Module) -> None:
    """The saved weights are the plain model's, under its names, and reload into `nn.Linear`s."""
    assert set(load_file(output_dir / "model.safetensors")) == set(trained.state_dict())
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir)
    assert type(reloaded.vit.layers[0].attention.qkv) is torch.nn.Linear


def layer_classes(model: torch.nn.Module) -> dict[str, str]:
    return {name: type(module).__name__ for name, module in model.named_modules()}


def assert_blocks_in_fp8(classes: dict[str, str]) -> None:
    assert {name for name, kind in classes.items() if kind == "Float8Linear"} == {
        f"vit.layers.{i}.{name}" for i in range(2) for name in ("attention.qkv", "attention.proj", "mlp.fc1", "mlp.fc2")
    }
    assert classes["classifier"] == "Linear"


@needs_torchao
def test_trainer_trains_the_blocks_in_fp8_and_saves_a_plain_model(tmp_path, monkeypatch, fp8_on_this_cpu):
    seen = {}
    train_save_and_evaluate = training.train_save_and_evaluate

    def recording(trainer, *args):
        metrics = train_save_and_evaluate(trainer, *args)  # Accelerate converts the model when training starts
        seen["classes"], seen["model"] = layer_classes(trainer.model), trainer.model
        seen["precision"] = trainer.accelerator.mixed_precision
        return metrics

    monkeypatch.setattr(training, "train_save_and_evaluate", recording)
    metrics = training.train(*script_arguments(training.ViTTrainingArguments, fp8_run_args(tmp_path)))
    assert seen["precision"] == "fp8"
    assert_blocks_in_fp8(seen["classes"])
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and len(metrics["demo_predictions"]) == 2
    assert (tmp_path / "checkpoint-8" / "model.safetensors").is_file()  # the checkpoints save too
    assert_saved_as_a_plain_model(tmp_path, seen["model"])


@needs_torchao
def test_accelerate_loop_trains_the_blocks_in_fp8_and_saves_a_plain_model(tmp_path, monkeypatch, fp8_on_this_cpu):
    seen = {}
    finish = accelerate_loop._finish

    def recording(run, data_args):
        seen["classes"], seen["precision"] = layer_classes(run.model), run.accelerator.mixed_precision
        seen["model"] = run.accelerator.unwrap_model(run.model)
        return finish(run, data_args)

    monkeypatch.setattr(accelerate_loop, "_finish", recording)
    metrics = accelerate_loop.train_with_accelerate(
        *script_arguments(accelerate_loop.AccelerateArguments, fp8_run_args(tmp_path))
    )
    assert seen["precision"] == "fp8"
    assert_blocks_in_fp8(seen["classes"])
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and len(metrics["demo_predictions"]) == 2
    assert_saved_as_a_plain_model(tmp_path, seen["model"])


@needs_torchao
def test_fp8_training_compiles_without_graph_breaks(tmp_path, fp8_on_this_cpu, compile_counters):
    """torchao's FP8 linears inside Trainer's `--torch_compile true` (dynamo's eager backend, as in
    `tests/test_training.py`): one graph per pass, as in bf16."""
    flags = ["--torch_compile", "true", "--torch_compile_backend", "eager", "--eval_strategy", "no"]
    args = [*fp8_run_args(tmp_path), "--save_strategy", "no", "--num_demo_predictions", "0", *flags]
    training.train(*script_arguments(training.ViTTrainingArguments, args))
    assert compile_counters["stats"]["calls_captured"] > 0
    assert dict(compile_counters["graph_break"]) == {}
