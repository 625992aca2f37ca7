"""Shared fixtures: tiny configurations that build in milliseconds on a CPU."""

import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch

import hf_vit_custom  # registers the Auto classes

# Under pytest-xdist (`-n 2`, a worker per core): one thread per worker, so that the workers' thread pools do not spin
# against each other on the same cores (the processes the tests start already run with OMP_NUM_THREADS=1).
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)


def tiny_config_kwargs(**overrides):
    """A 2-layer, 32-wide ViT on 16x16 images with 4x4 patches (16 patches + the class token)."""
    kwargs = {
        "image_size": 16,
        "patch_size": 4,
        "num_channels": 3,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "num_labels": 5,
    }
    kwargs.update(overrides)
    return kwargs


# The same tiny model as `tiny_config_kwargs`, as `--config_overrides` of the training scripts.
def out_of_the_memory_map(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (loaded by `from_pretrained`) with its weights copied out of the safetensors file's memory map.

    MKL's float32 matmul sums in an order that depends on the operands' alignment, and the map's is only 8 bytes: a
    loaded model's logits can differ from the saved model's in the last bit (seen: 7.5e-8) although every weight is
    equal. Fresh allocations are aligned as the saved model's were, so bitwise comparisons compare the weights.
    """
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
    return model


TINY_OVERRIDES = "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64"


def small_run_args(output_dir) -> list[str]:
    """Training-script flags for a seconds-long run: the tiny model on a slice of the digits, no loggers."""
    return [
        "--output_dir",
        str(output_dir),
        "--config_overrides",
        TINY_OVERRIDES,
        "--max_train_samples",
        "128",
        "--max_eval_samples",
        "64",
        "--num_train_epochs",
        "2",
        "--per_device_train_batch_size",
        "16",
        "--report_to",
        "none",
    ]


def make_image_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 6, seed: int = 0) -> Path:
    """Write `root/<class>/<image>.png` random RGB images of varying sizes; return `root`."""
    rng = np.random.default_rng(seed)
    for class_index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            height, width = 10 + index, 12 + 2 * class_index
            pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{name}_{index}.png")
    return root


# FP8 training runs through torchao, which is not a dependency: the tests that train in FP8 need it installed.
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")


def script_arguments(training_arguments_class: type, args: list[str]) -> tuple:
    """A training script's flags parsed as its `main` parses them: model, data and `training_arguments_class`."""
    from hf_vit_custom.training import DataArguments, ModelArguments, parse_arguments

    return parse_arguments((ModelArguments, DataArguments, training_arguments_class), args)


@pytest.fixture
def compile_counters():
    """`torch.compile`'s counters (graphs captured, graph breaks by reason) from a fresh dynamo, which is reset again
    afterwards: compiled code and its counters are per process, shared by the tests a worker runs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture
def tiny_config():
    return hf_vit_custom.ViTCustomConfig(**tiny_config_kwargs())


REPO = Path(__file__).resolve().parents[1]


def run_bounded(command: list[str], timeout: int = 300, returncode: int | None = 0) -> str:
    """Run `command` from the repository root in its own process group and return its output.

    Fails unless the command exits with `returncode` (`None` accepts any).

    A hang is ended with SIGTERM, then SIGKILL, sent to the whole group: SIGKILL of torchrun alone would orphan its
    workers. One thread per process keeps several processes from fighting over the cores.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
        pytest.fail(f"{command} timed out:\n{output[-3000:]}")
    assert returncode is None or process.returncode == returncode, output[-5000:]
    return output
