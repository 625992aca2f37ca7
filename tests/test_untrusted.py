"""Files from strangers: loading weights, checkpoints or a model folder never runs code the user did not ask for.

Each planted file, if it were executed, would write a marker file; every test asserts the marker never appears.
"""

import ast
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_config_kwargs
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, pipeline

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.data import default_image_processor


class RunsCode:
    """Unpickling this runs `open(marker, "w")`: what a malicious pickle does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"state": RunsCode(marker)}))


def plant_code(folder: Path, marker: Path) -> None:
    """Replace the copied code files with ones that write `marker` when imported."""
    payload = f"open({str(marker)!r}, 'w').write('imported')\nraise SystemExit('planted code ran')\n"
    for name in ("modeling_vit_custom.py", "configuration_vit_custom.py"):
        (folder / name).write_text(payload)


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs())).save_pretrained(folder)
    default_image_processor(16, 3).save_pretrained(folder)
    return folder


def test_a_pickled_weights_file_is_not_unpickled(model_folder, tmp_path):
    marker = tmp_path / "marker"
    plant_pickle(model_folder / "pytorch_model.bin", marker)
    ViTCustomForImageClassification.from_pretrained(model_folder)  # the safetensors file wins
    assert not marker.exists()
    (model_folder / "model.safetensors").unlink()
    with pytest.raises(Exception, match=r"Weights only load failed|weights_only"):
        ViTCustomForImageClassification.from_pretrained(model_folder)
    assert not marker.exists()


def test_every_torch_load_in_the_package_and_scripts_is_weights_only():
    calls = []
    for path in [*REPO.joinpath("src").rglob("*.py"), *REPO.joinpath("scripts").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
                weights_only = {k.arg: ast.unparse(k.value) for k in node.keywords}.get("weights_only")
                calls.append((path.name, weights_only))
    assert calls, "expected the checkpoint converter's torch.load"
    assert all(weights_only == "True" for _, weights_only in calls), calls


def test_resuming_an_accelerate_checkpoint_with_a_planted_pickle_runs_nothing(tmp_path):
    """The loop's own progress is JSON; Accelerate's RNG pickles are read with `weights_only=True`."""
    from hf_vit_custom.accelerate_loop import AccelerateArguments, train_with_accelerate
    from hf_vit_custom.training import DataArguments, ModelArguments, parse_arguments

    flags = [
        "--output_dir",
        str(tmp_path / "run"),
        "--config_overrides",
        "hidden_size=32,num_hidden_layers=1,num_attention_heads=4,intermediate_size=64",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "16",
        "--num_train_epochs",
        "1",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--report_to",
        "none",
        "--num_demo_predictions",
        "0",
        "--disable_tqdm",
        "true",
    ]
    parse = lambda extra: parse_arguments((ModelArguments, DataArguments, AccelerateArguments), [*flags, *extra])  # noqa: E731
    train_with_accelerate(*parse([]))
    checkpoint = tmp_path / "run" / "step_1"
    marker = tmp_path / "marker"
    # What `register_for_checkpointing` would unpickle with `weights_only=False`: Accelerate refuses the folder.
    plant_pickle(checkpoint / "custom_checkpoint_0.pkl", marker)
    with pytest.raises(RuntimeError, match="Number of custom checkpoints"):
        train_with_accelerate(*parse(["--resume_from_checkpoint", str(checkpoint)]))
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    plant_pickle(checkpoint / "random_states_0.pkl", marker)
    train_with_accelerate(*parse(["--resume_from_checkpoint", str(checkpoint)]))
    assert not marker.exists()


def test_a_folder_with_planted_code_loads_our_classes_and_never_imports_it(model_folder, tmp_path):
    marker = tmp_path / "marker"
    plant_code(model_folder, marker)
    config = AutoConfig.from_pretrained(model_folder)
    encoder = AutoModel.from_pretrained(model_folder)
    classifier = AutoModelForImageClassification.from_pretrained(model_folder)
    classify = pipeline("image-classification", model=str(model_folder))
    assert type(config) is ViTCustomConfig
    assert type(encoder).__module__ == type(classifier).__module__ == "hf_vit_custom.modeling_vit_custom"
    assert type(classify.model) is ViTCustomForImageClassification
    assert not marker.exists()


def test_without_the_package_planted_code_runs_only_with_trust_remote_code(model_folder, tmp_path):
    marker = tmp_path / "marker"
    plant_code(model_folder, marker)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_vit_custom"] = None  # a user who has only transformers
        from transformers import AutoConfig, AutoModelForImageClassification
        for load in (AutoConfig.from_pretrained, AutoModelForImageClassification.from_pretrained):
            try:
                load({str(model_folder)!r})
            except ValueError as error:
                assert "trust_remote_code" in str(error), error
            else:
                raise AssertionError("loaded without trust_remote_code=True")
        print("refused")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused" in result.stdout
    assert not marker.exists()


def test_torch_load_of_a_planted_pickle_with_weights_only_runs_nothing(tmp_path):
    """The guard the package relies on, checked against this torch: `weights_only=True` refuses the payload."""
    marker = tmp_path / "marker"
    plant_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt", weights_only=True)
    assert not marker.exists()
