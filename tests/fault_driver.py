"""Runs a training script or a save, and makes it die at an exact point of a write, for `tests/test_faults.py`.

    python tests/fault_driver.py FAULT STEP SCRIPT [SCRIPT ARGS...]    # train, die while checkpoint STEP is written
    python tests/fault_driver.py save-killed|save-too-large FOLDER   # save a model over FOLDER and fail half-way

FAULT is `kill` (SIGKILL: the process ends at once, as on pre-emption or the OOM killer) or `interrupt` (SIGINT, as
Ctrl-C). The signal is real and sent to this process by itself, after part of the checkpoint's files are on disk;
only the moment is arranged. `save-too-large` lowers the file-size limit (RLIMIT_FSIZE) below the weights' size, so
the write fails as on a full disk.
"""

import os
import resource
import runpy
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import accelerate.checkpointing
import safetensors.torch
import torch
import transformers
from conftest import tiny_config_kwargs  # this script's folder is on sys.path, as for the tests

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification


def die(fault: str) -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGINT)


def truncate(path: Path) -> None:
    """Cut `path` to half its size: what a write stopped half-way leaves on disk."""
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


def break_trainer_checkpoint(fault: str, step: int) -> None:
    """Die after checkpoint `step`'s model and half its optimiser state are written, before its trainer state."""
    original = transformers.Trainer._save_optimizer_and_scheduler

    def save_then_die(self, output_dir):
        original(self, output_dir)
        if self.state.global_step == step:
            truncate(Path(output_dir) / "optimizer.pt")
            die(fault)

    transformers.Trainer._save_optimizer_and_scheduler = save_then_die


def break_accelerate_checkpoint(fault: str, step: int) -> None:
    """Die after checkpoint `step`'s model and half its optimiser state are written into the staging folder."""
    original = accelerate.checkpointing.save_accelerator_state

    def save_then_die(output_dir, *args, **kwargs):
        result = original(output_dir, *args, **kwargs)
        if Path(output_dir).name == f".step_{step}.partial":
            truncate(Path(output_dir) / "optimizer.bin")
            die(fault)
        return result

    # `Accelerator.save_state` calls it through the name it imported.
    accelerate.accelerator.save_accelerator_state = save_then_die


def save_over(folder: Path, fault: str) -> None:
    """Save a differently initialised model over the complete one in `folder`, failing while the weights are written."""
    torch.manual_seed(1)
    model = ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs()))
    if fault == "save-too-large":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the oversized write then fails with EFBIG
        limit = (folder / "model.safetensors").stat().st_size // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        model.save_pretrained(folder)  # raises OSError: File too large
        return
    original = safetensors.torch.save_file

    def write_half_then_die(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        truncate(Path(filename))
        die("kill")

    transformers.modeling_utils.safe_save_file = write_half_then_die  # the name `save_pretrained` calls
    model.save_pretrained(folder)


def main() -> None:
    fault = sys.argv[1]
    if fault.startswith("save-"):
        save_over(Path(sys.argv[2]), fault)
        return
    step, script, script_args = int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    if script.endswith("train_accelerate.py"):
        break_accelerate_checkpoint(fault, step)
    else:
        break_trainer_checkpoint(fault, step)
    sys.argv = [script, *script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
