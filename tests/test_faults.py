"""Faults caused for real: a training run killed (SIGKILL) or interrupted (SIGINT) between or during checkpoints, a
save killed half-way or stopped by a full disk, an output folder that cannot be written.

Each run that must die runs in its own process. The claim tested is the same everywhere: what was complete before
the fault is still complete and loadable afterwards, nothing half-written is resumed from or left behind, and a run
resumed from the newest complete checkpoint ends with exactly the weights and metrics of an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, run_bounded, small_run_args, tiny_config_kwargs
from safetensors.torch import load_file

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.persistence import OutputFolderError
from hf_vit_custom.training import DataArguments, ModelArguments, ViTTrainingArguments, parse_arguments, train

SCRIPTS = {"trainer": REPO / "scripts" / "train.py", "accelerate": REPO / "scripts" / "train_accelerate.py"}
DRIVER = REPO / "tests" / "fault_driver.py"
# 128 images in batches of 16: 8 optimiser steps an epoch, 2 epochs, a checkpoint every 8 steps.
CHECKPOINT_EVERY = 8


def run_args(output_dir: Path) -> list[str]:
    """A short run with crops, dropout and stochastic depth on, so that every random draw must be restored; the same
    flags for both scripts."""
    return [
        *small_run_args(output_dir),
        "--config_overrides",
        f"{TINY_OVERRIDES},hidden_dropout_prob=0.1,drop_path_rate=0.1",
        "--min_crop_scale",
        "0.6",
        "--logging_steps",
        "4",
        "--num_demo_predictions",
        "0",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "steps",
        "--save_steps",
        str(CHECKPOINT_EVERY),
        "--save_total_limit",
        "5",
    ]


def checkpoint(script: str, output_dir: Path, step: int) -> Path:
    return output_dir / (f"checkpoint-{step}" if script == "trainer" else f"step_{step}")


def is_complete(script: str, folder: Path) -> bool:
    marker = "trainer_state.json" if script == "trainer" else "training_progress.json"
    try:
        json.loads((folder / marker).read_text())
    except (OSError, ValueError):
        return False
    return True


def train_script(script: str, output_dir: Path, *extra: str, returncode: int | None = 0) -> str:
    return run_bounded([sys.executable, str(SCRIPTS[script]), *run_args(output_dir), *extra], 300, returncode)


@pytest.fixture(autouse=True)
def ctrl_c_reaches_the_scripts():
    """A test run started in the background of a non-interactive shell ignores SIGINT, and so would every script it
    starts (an ignored signal stays ignored across `exec`): give them Ctrl-C back, as in a terminal's foreground."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def drive(*args: str, returncode: int | None) -> str:
    return run_bounded([sys.executable, str(DRIVER), *args], 300, returncode)


def final_state(output_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    results = json.loads((output_dir / "all_results.json").read_text())
    return load_file(output_dir / "model.safetensors"), results


def assert_same_run(resumed_dir: Path, reference_dir: Path) -> None:
    """Bitwise-equal final weights and equal evaluation metrics.

    `train_loss` is left out for Trainer: it averages only the losses seen since the resume.
    """
    (resumed_weights, resumed_results), (weights, results) = final_state(resumed_dir), final_state(reference_dir)
    assert resumed_weights.keys() == weights.keys()
    for name in weights:
        assert torch.equal(resumed_weights[name], weights[name]), name
    for key in ("eval_loss", "eval_accuracy", "test_loss", "test_accuracy"):
        assert resumed_results[key] == results[key], key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run of each script, trained once per module."""
    runs = {}

    def get(script: str) -> Path:
        if script not in runs:
            runs[script] = tmp_path_factory.mktemp(f"uninterrupted-{script}")
            train_script(script, runs[script])
        return runs[script]

    return get


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_sigkill_between_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path, script, uninterrupted):
    command = [sys.executable, str(SCRIPTS[script]), *run_args(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    first = checkpoint(script, tmp_path, CHECKPOINT_EVERY)
    deadline = time.monotonic() + 240
    while not is_complete(script, first) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # as a pre-empted machine or the OOM killer would
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert not (tmp_path / "model.safetensors").exists(), "the run ended before it was killed"

    train_script(script, tmp_path, "--resume_from_checkpoint", "latest")
    assert_same_run(tmp_path, uninterrupted(script))


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_kill_while_a_checkpoint_is_written_keeps_the_previous_one_and_resume_skips_the_broken_one(
    tmp_path, script, uninterrupted
):
    step = 2 * CHECKPOINT_EVERY
    drive("kill", str(step), str(SCRIPTS[script]), *run_args(tmp_path), returncode=-signal.SIGKILL)
    previous, broken = checkpoint(script, tmp_path, CHECKPOINT_EVERY), checkpoint(script, tmp_path, step)
    assert is_complete(script, previous)
    if script == "trainer":
        assert broken.is_dir() and not is_complete(script, broken)  # Trainer writes in place: the marker is missing
    else:
        assert not broken.exists()  # staged under a hidden name, never renamed
        assert (tmp_path / f".step_{step}.partial").is_dir()
    # The previous checkpoint holds exactly the weights the reference run saved at that step.
    reference = checkpoint(script, uninterrupted(script), CHECKPOINT_EVERY)
    kept, saved = load_file(previous / "model.safetensors"), load_file(reference / "model.safetensors")
    assert kept.keys() == saved.keys()
    assert all(torch.equal(kept[name], saved[name]) for name in saved)
    if script == "trainer":  # a Trainer checkpoint is also a model folder
        ViTCustomForImageClassification.from_pretrained(previous)

    train_script(script, tmp_path, "--resume_from_checkpoint", "latest")
    assert is_complete(script, broken)  # written again, completely, by the resumed run
    assert_same_run(tmp_path, uninterrupted(script))


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_ctrl_c_while_a_checkpoint_is_written_leaves_nothing_half_written_and_says_how_to_resume(tmp_path, script):
    step = 2 * CHECKPOINT_EVERY
    output = drive("interrupt", str(step), str(SCRIPTS[script]), *run_args(tmp_path), returncode=130)
    previous = checkpoint(script, tmp_path, CHECKPOINT_EVERY)
    assert f"Training interrupted. The newest complete checkpoint is '{previous}'" in output
    assert "--resume_from_checkpoint latest" in output
    assert "Traceback" not in output
    assert not checkpoint(script, tmp_path, step).exists()
    assert not list(tmp_path.glob(".*partial"))
    assert not (tmp_path / "model.safetensors").exists()
    assert is_complete(script, previous)


def test_ctrl_c_between_checkpoints_exits_with_a_message(tmp_path):
    command = [sys.executable, str(SCRIPTS["trainer"]), *run_args(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    first = checkpoint("trainer", tmp_path, CHECKPOINT_EVERY)
    deadline = time.monotonic() + 240
    while not is_complete("trainer", first) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process group
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 130, output[-3000:]
    assert "Training interrupted. The newest complete checkpoint is" in output
    assert all(is_complete("trainer", folder) for folder in tmp_path.glob("checkpoint-*"))


@pytest.fixture
def saved_model(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs()))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return folder, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_loads_unchanged(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    reloaded = ViTCustomForImageClassification.from_pretrained(folder)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_save_pretrained_killed_half_way_leaves_the_previous_model_loadable(saved_model):
    folder, weights = saved_model
    drive("save-killed", str(folder), returncode=-signal.SIGKILL)
    assert_loads_unchanged(folder, weights)


def test_save_pretrained_on_a_full_disk_fails_and_leaves_the_previous_model_loadable(saved_model):
    folder, weights = saved_model
    output = drive("save-too-large", str(folder), returncode=1)
    assert "File too large" in output
    assert_loads_unchanged(folder, weights)
    assert not list(folder.parent.glob(".model.saving-*"))  # the staging folder was cleaned up


@pytest.mark.parametrize("script", ["trainer", "accelerate"])
def test_unwritable_output_folder_stops_before_training(tmp_path, script):
    """An output folder below a regular file (chmod cannot block the root user the tests may run as)."""
    from hf_vit_custom.accelerate_loop import AccelerateArguments, train_with_accelerate

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    arguments = run_args(blocker / "out")
    with pytest.raises(OutputFolderError, match=r"Cannot write to the output folder '.*a-file/out': .*Not a directory"):
        if script == "trainer":
            train(*parse_arguments((ModelArguments, DataArguments, ViTTrainingArguments), arguments))
        else:
            train_with_accelerate(*parse_arguments((ModelArguments, DataArguments, AccelerateArguments), arguments))
    assert blocker.read_text() == "not a folder"


def test_too_little_free_space_stops_before_training(tmp_path, monkeypatch):
    nearly_full = SimpleNamespace(total=2**30, used=2**30 - 1024, free=1024)
    monkeypatch.setattr("hf_vit_custom.persistence.shutil.disk_usage", lambda path: nearly_full)
    with pytest.raises(OutputFolderError, match=r"Only 0.0 MiB free in .* need about"):
        train(*parse_arguments((ModelArguments, DataArguments, ViTTrainingArguments), run_args(tmp_path)))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_full_disk_during_a_checkpoint_names_the_folder_and_the_room_then_latest_resumes(tmp_path, monkeypatch):
    """torch's save says only "enforce fail ... unexpected pos" when the disk fills; the run says where and how much,
    drops the half-written checkpoint, and resumes from the complete one once there is room."""
    output_dir = tmp_path / "run"
    args = [*small_run_args(output_dir), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1"]
    args += ["--disable_tqdm", "true"]
    real_save = torch.save

    def save_until_the_disk_fills(obj, file, *rest, **kwargs):
        if "checkpoint-2" in str(file) and str(file).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")
        return real_save(obj, file, *rest, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(OutputFolderError, match=rf"The disk filled up while writing to '{output_dir}': the run needs"):
        train(*parse_arguments((ModelArguments, DataArguments, ViTTrainingArguments), args))
    assert (output_dir / "checkpoint-1" / "trainer_state.json").exists()
    assert not (output_dir / "checkpoint-2").exists()  # half-written: removed
    monkeypatch.setattr(torch, "save", real_save)
    metrics = train(
        *parse_arguments(
            (ModelArguments, DataArguments, ViTTrainingArguments), [*args, "--resume_from_checkpoint", "latest"]
        )
    )
    assert metrics["train_runtime"] > 0 and (output_dir / "checkpoint-2" / "trainer_state.json").exists()
