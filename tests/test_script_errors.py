"""What a person at a terminal sees after a mistake: one clear line, exit status 2, and every file they had intact.

Each case of `CASES` runs a script as a user does (`python scripts/X.py ...` in a fresh interpreter, on real files
made in `tmp_path`) and checks the whole of its stderr: status 2, no traceback, at most two lines, the first
`PROGRAM: error: ...`, words that name the problem, and the user's files byte for byte as they were (nothing
changed, removed or added). Most mistakes must be refused before training starts, so each run takes seconds.

A fresh interpreter costs seconds (torch and transformers), so checks of flag values that need no terminal
(`VALUE_CASES`, `USAGE_CASES`) call the scripts' `main` through `hf_vit_custom.cli.run` in this process, and one
interpreter runs every script's `--help`. The exceptions the library raises for the same kinds of mistake are
tabled in `tests/test_bad_input.py`; this file is about what reaches the terminal.

`--skip_bad_images` leaves unreadable images out, with a warning naming each, instead of refusing the
run: one test checks that path.
"""

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_OVERRIDES, make_image_folder, tiny_config_kwargs
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTForImageClassification

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.cli import DEBUG_VARIABLE, mistake_message, run
from hf_vit_custom.conversion import convert_to_jax, convert_to_timm
from hf_vit_custom.training import DataArguments, ModelArguments, ViTTrainingArguments, parse_arguments, train

SCRIPTS = REPO / "scripts"
ALL_SCRIPTS = (
    "train.py",
    "train_accelerate.py",
    "pretrain.py",
    "convert_checkpoint.py",
    "push_to_hub.py",
    "visualize_attention.py",
    "benchmark.py",
)
# A generous bound: a refused run takes seconds, but one that is not refused yet trains (a few seconds more).
SCRIPT_TIMEOUT = 300
CLASSES = ("cat", "dog", "fox")
# 10 images per class, so that the 10% validation hold-out is stratified without a warning.
IMAGES_PER_CLASS = 10
# The tiny model on the 16x16 images of an image folder (which otherwise gets the 224x224 default preset).
FOLDER_OVERRIDES = f"{TINY_OVERRIDES},image_size=16,patch_size=4"
RUN_NAME = "my-run"


def snapshot(folder: Path) -> dict[str, str]:
    """`relative path -> sha256` of every file below `folder`, hidden ones included."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def snapshot_changes(before: dict[str, str], after: dict[str, str]) -> str:
    """What differs between two snapshots, in words (empty when nothing does)."""
    parts = []
    for what, paths in (
        ("changed", [path for path in before if path in after and before[path] != after[path]]),
        ("removed", [path for path in before if path not in after]),
        ("added", [path for path in after if path not in before]),
    ):
        if paths:
            parts.append(f"{what} {len(paths)} files, e.g. {paths[:4]}")
    return "; ".join(parts)


def all_of(*patterns: str) -> str:
    """A regular expression that matches a text containing each of `patterns`, in any order."""
    return "".join(f"(?=.*?(?:{pattern}))" for pattern in patterns)


def clear_mistake_problems(program: str, status, stderr: str, message: str) -> list[str]:
    """Every way in which (`status`, `stderr`) falls short of one clear line for a mistake; empty when it does not."""
    # Lines as the terminal shows them: a progress bar redrawn with carriage returns is one line.
    lines = [line for line in stderr.split("\n") if line.strip()]
    problems = []
    if status != 2:
        problems.append(f"exit status {status}, not 2")
    if "Traceback" in stderr:
        problems.append(f"a traceback, ending {lines[-1].strip()[:300]!r}")
    if len(lines) > 2:
        problems.append(f"{len(lines)} lines on stderr, not at most 2")
    if not lines or not lines[0].startswith(f"{program}: error: "):
        problems.append(f"the first line is not '{program}: error: ...'")
    if not re.search(message, stderr, re.DOTALL | re.IGNORECASE):
        problems.append(f"the message does not match {message!r}")
    return problems


def assert_one_clear_line(program: str, status, stderr: str, message: str, before: dict, after: dict) -> None:
    problems = clear_mistake_problems(program, status, stderr, message)
    if changes := snapshot_changes(before, after):
        problems.append(f"the user's files differ: {changes}")
    assert not problems, "; ".join(problems) + f"\n--- stderr (last 4000 characters) ---\n{stderr[-4000:]}"


def script_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop(DEBUG_VARIABLE, None)
    env.update(extra)
    return env


def run_script(script: str, argv: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python scripts/SCRIPT ARGV` from the repository root, as a user runs it."""
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *argv],
        cwd=REPO,
        env=script_env(**env),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )


def train_argv(
    output_dir: Path,
    train_dir: Path | str,
    cache_dir: Path,
    *extra: str,
    overrides: str | None = FOLDER_OVERRIDES,
    model: Path | None = None,
) -> list[str]:
    """Flags of a seconds-long run of the tiny model on an image folder, with no loggers and no demo."""
    source = ["--model_name_or_path", str(model)] if model else ["--config_name", "vit-tiny-patch16-224"]
    return [
        "--output_dir",
        str(output_dir),
        "--train_dir",
        str(train_dir),
        *source,
        *(["--config_overrides", overrides] if overrides else []),
        "--cache_dir",
        str(cache_dir),
        "--num_train_epochs",
        "1",
        "--per_device_train_batch_size",
        "8",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--num_demo_predictions",
        "0",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        *extra,
    ]


@dataclass
class Workspace:
    """`user`: every file the user has (snapshotted around each run); `cache`: the `datasets` cache, not theirs."""

    user: Path
    cache: Path
    previous_run_source: Callable[[], Path]

    def images(self, name: str = "images", classes: tuple[str, ...] = CLASSES) -> Path:
        folder = self.user / name
        if not folder.exists():
            make_image_folder(folder, classes=classes, per_class=IMAGES_PER_CLASS)
        return folder

    def train_args(self, *extra: str, train_dir: Path | None = None, **kwargs) -> list[str]:
        train_dir = self.images() if train_dir is None else train_dir
        return train_argv(self.user / RUN_NAME, train_dir, self.cache, *extra, **kwargs)

    def previous_run(self) -> Path:
        """`user/my-run`: a copy of a finished run's output folder (model, processor and `checkpoint-1`)."""
        return Path(shutil.copytree(self.previous_run_source(), self.user / RUN_NAME))

    def images_with(self, name: str, content: bytes) -> Path:
        """The image folder with one more file, `cat/NAME`, holding `content`."""
        folder = self.images()
        (folder / "cat" / name).write_bytes(content)
        return folder


@pytest.fixture(scope="module")
def previous_run(tmp_path_factory) -> Path:
    """The output folder of a finished one-step run of the tiny (32-wide) model, with its `checkpoint-1`."""
    root = tmp_path_factory.mktemp("previous-run")
    images = make_image_folder(root / "images", classes=CLASSES, per_class=IMAGES_PER_CLASS)
    output = root / RUN_NAME
    one_saved_step = ["--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1"]
    argv = train_argv(output, images, root / "cache", *one_saved_step)
    train(*parse_arguments((ModelArguments, DataArguments, ViTTrainingArguments), argv))
    assert (output / "checkpoint-1" / "trainer_state.json").is_file() and (output / "model.safetensors").is_file()
    return output


@pytest.fixture
def workspace(tmp_path, request) -> Workspace:
    (tmp_path / "user").mkdir()
    return Workspace(tmp_path / "user", tmp_path / "cache", lambda: request.getfixturevalue("previous_run"))


# --- the files the mistakes are made with ---


def tiny_vit_custom(**overrides) -> ViTCustomForImageClassification:
    return ViTCustomForImageClassification(ViTCustomConfig(**tiny_config_kwargs(num_labels=3, **overrides))).eval()


def model_with_corrupt_config(ws: Workspace) -> Path:
    folder = ws.user / "corrupt-model"
    tiny_vit_custom().save_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "vit_custom", "hidden_size": 32,')  # cut short
    return folder


def transformers_vit(ws: Workspace) -> Path:
    """A transformers `ViTForImageClassification` (model_type 'vit'), weights and all: not this package's model."""
    folder = ws.user / "transformers-model"
    ViTForImageClassification(ViTConfig(**tiny_config_kwargs(num_labels=3))).save_pretrained(folder)
    return folder


def weightless_model(ws: Workspace) -> Path:
    folder = ws.user / "weightless-model"
    ViTCustomConfig(**tiny_config_kwargs(num_labels=3)).save_pretrained(folder)
    return folder


def not_an_image() -> bytes:
    return b"This is a text file that someone named x.jpg.\n"


def truncated_jpeg() -> bytes:
    """The first half of a real JPEG: its header opens, its data ends early."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=95)
    whole = buffer.getvalue()
    return whole[: len(whole) // 2]


def decompression_bomb(width: int = 12000, height: int = 12000) -> bytes:
    """A 1-bit black PNG of `width`x`height` pixels, more than `PIL.Image.MAX_IMAGE_PIXELS`, in a few KiB.

    144 million pixels is above PIL's limit, where it only warns, and below twice the limit, where it refuses: the
    library must refuse it itself. Written from its (18 MB of) rows, so that PIL never holds the image here.
    """
    assert width * height > Image.MAX_IMAGE_PIXELS

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the row's 1-bit pixels
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height, 9))
        + chunk(b"IEND", b"")
    )


def truncated_npz(ws: Workspace) -> Path:
    """A JAX ViT `.npz` (the tiny model's weights in the JAX release's names), cut in half."""
    model = tiny_vit_custom()
    path = ws.user / "vit.npz"
    np.savez(path, **convert_to_jax(model.config, model.state_dict()))
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def timm_weights_30_wide(ws: Workspace) -> Path:
    """A bare timm state dict of a 30-wide ViT (3 heads): 4 heads cannot split that width."""
    model = tiny_vit_custom(hidden_size=30, num_attention_heads=3)
    _timm_config, state_dict = convert_to_timm(model.config, model.state_dict(), {})
    path = ws.user / "timm.safetensors"
    save_file({key: value.contiguous() for key, value in state_dict.items()}, path)
    return path


def an_image(ws: Workspace) -> Path:
    path = ws.user / "img.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)
    return path


def missing_relative_model() -> str:
    relative = "outputs/does-not-exist"
    assert not (REPO / relative).exists()
    return relative


def a_file_for_a_folder(ws: Workspace) -> Path:
    path = ws.user / "images.zip"
    path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip archive
    return path


# (id, script, argv given the workspace, regular expression the message must match)
CASES = [
    # Command lines the parser refuses
    ("unknown-flag", "train.py", lambda ws: ws.train_args("--no_such_flag"), r"--no_such_flag"),
    (
        "value-of-wrong-type",
        "train.py",
        lambda ws: ws.train_args("--learning_rate", "abc"),
        all_of("learning_rate", "abc"),
    ),
    ("missing-arguments-file", "train.py", lambda ws: [str(ws.user / "missing.json")], r"missing\.json"),
    # Config overrides
    (
        "override-of-unknown-key",
        "train.py",
        lambda ws: ws.train_args(overrides=f"{FOLDER_OVERRIDES},hiden_size=32"),
        r"hiden_size",
    ),
    (
        "override-value-of-wrong-type",
        "train.py",
        lambda ws: ws.train_args(overrides=f"{FOLDER_OVERRIDES},hidden_size=big"),
        all_of("hidden_size", "big"),
    ),
    # Resuming
    (
        "resume-from-missing-folder",
        "train.py",
        lambda ws: ws.train_args("--resume_from_checkpoint", "/nowhere"),
        r"/nowhere",
    ),
    (
        "resume-checkpoint-of-another-architecture",
        "train.py",
        lambda ws: (
            ws.previous_run(),
            ws.train_args("--resume_from_checkpoint", "latest", overrides=FOLDER_OVERRIDES.replace("=32", "=64")),
        )[1],
        all_of(r"checkpoint-1", r"hidden_size|shape|architecture"),
    ),
    (
        "output-dir-of-another-run",
        "train.py",
        lambda ws: (ws.previous_run(), ws.train_args())[1],
        all_of(RUN_NAME, r"checkpoint|model"),
    ),
    # Image folders
    (
        "train-dir-is-a-file",
        "train.py",
        lambda ws: ws.train_args(train_dir=a_file_for_a_folder(ws)),
        all_of(r"train_dir", r"images\.zip", r"not a (folder|directory)"),
    ),
    (
        "image-folder-with-one-class",
        "train.py",
        lambda ws: ws.train_args(train_dir=ws.images("one-class", classes=("cat",))),
        all_of(r"one-class", r"at least two classes|only (one|the) class|single class"),
    ),
    (
        "validation-classes-differ",
        "train.py",
        lambda ws: ws.train_args("--validation_dir", str(ws.images("validation", classes=("cat", "dog", "owl")))),
        all_of(r"validation_dir", r"owl|fox"),
    ),
    # Models to fine-tune
    (
        "model-with-corrupt-config",
        "train.py",
        lambda ws: ws.train_args(model=model_with_corrupt_config(ws), overrides=None),
        all_of(r"corrupt-model", r"config\.json", r"JSON"),
    ),
    (
        "model-of-another-type",
        "train.py",
        lambda ws: ws.train_args(model=transformers_vit(ws), overrides=None),
        all_of(r"transformers-model", r"\bvit\b", r"vit_custom|convert_checkpoint"),
    ),
    (
        "model-without-weights",
        "train.py",
        lambda ws: ws.train_args(model=weightless_model(ws), overrides=None),
        all_of(r"weightless-model", r"weights|safetensors"),
    ),
    # Bad images in the training folder: refused before training, naming the file
    (
        "file-that-is-not-an-image",
        "train.py",
        lambda ws: ws.train_args(train_dir=ws.images_with("x.jpg", not_an_image())),
        r"x\.jpg",
    ),
    (
        "truncated-jpeg",
        "train.py",
        lambda ws: ws.train_args(train_dir=ws.images_with("cut.jpg", truncated_jpeg())),
        r"cut\.jpg",
    ),
    (
        "decompression-bomb",
        "train.py",
        lambda ws: ws.train_args(train_dir=ws.images_with("bomb.png", decompression_bomb())),
        all_of(r"bomb\.png", r"pixels|decompression|too large|exceeds"),
    ),
    # Checkpoint conversion
    (
        "jax-npz-truncated",
        "convert_checkpoint.py",
        lambda ws: ["--from", "jax", str(truncated_npz(ws)), "--out", str(ws.user / "converted")],
        all_of(r"vit\.npz", r"truncated|corrupt|not a valid|cannot read|incomplete|damaged"),
    ),
    (
        "timm-width-the-heads-cannot-split",
        "convert_checkpoint.py",
        lambda ws: [
            "--from",
            "timm",
            str(timm_weights_30_wide(ws)),
            "--out",
            str(ws.user / "converted"),
            "--num_heads",
            "4",
        ],
        all_of(r"\b30\b", r"num_heads|num_attention_heads", r"\b4\b"),
    ),
    # Attention maps
    (
        "visualize-missing-model-folder",
        "visualize_attention.py",
        lambda ws: [missing_relative_model(), str(an_image(ws)), "--out", str(ws.user / "attention")],
        all_of(r"outputs/does-not-exist", r"does not exist|not found|no such"),
    ),
]


@pytest.mark.parametrize(("script", "make_argv", "message"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_at_the_terminal_is_one_clear_line(workspace, script, make_argv, message):
    argv = make_argv(workspace)
    before = snapshot(workspace.user)
    result = run_script(script, argv)
    assert_one_clear_line(script, result.returncode, result.stderr, message, before, snapshot(workspace.user))


def test_skip_bad_images_trains_without_them_and_names_each_one(workspace):
    """`--skip_bad_images` turns the refusal of each bad image into a warning that names it, and the run goes on."""
    bad = {"x.jpg": not_an_image(), "cut.jpg": truncated_jpeg(), "bomb.png": decompression_bomb()}
    for name, content in bad.items():
        images = workspace.images_with(name, content)
    before = snapshot(images)
    result = run_script("train.py", workspace.train_args("--skip_bad_images", "true", train_dir=images))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    warnings = [line for line in result.stderr.split("\n") if "skip" in line.lower()]
    for name in bad:
        assert any(name in line for line in warnings), f"no warning names {name}:\n{result.stderr[-4000:]}"
    assert snapshot(images) == before
    assert (workspace.user / RUN_NAME / "model.safetensors").is_file()


def test_the_table_names_every_case_once():
    assert len({case[0] for case in CASES}) == len(CASES) >= 20


# --- in this process: flag values, and the parsers of the scripts that take no training flags ---


_SCRIPT_MODULES = {}


def script_module(script: str):
    """`scripts/SCRIPT` imported as a module (its `main` is not run on import)."""
    if script not in _SCRIPT_MODULES:
        spec = importlib.util.spec_from_file_location(f"script_errors_{Path(script).stem}", SCRIPTS / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SCRIPT_MODULES[script] = module
    return _SCRIPT_MODULES[script]


def run_in_process(script: str, argv: list[str], monkeypatch, capfd) -> tuple[object, str]:
    """Run `scripts/SCRIPT`'s `main(argv)` through `cli.run` here; return the exit status and what reached stderr.

    Any exception other than `SystemExit` is a bug in the script and propagates with its traceback.
    """
    main = script_module(script).main
    monkeypatch.setattr(sys, "argv", [str(SCRIPTS / script), *argv])  # `run` names the program after argv[0]
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    capfd.readouterr()
    try:
        run(lambda: main(argv))
    except SystemExit as exit_:
        status = exit_.code
    _out, err = capfd.readouterr()
    return status, err


# (id, training flags, regular expression the message must match): each must be refused before training starts.
VALUE_CASES = [
    ("batch-size-zero", ["--per_device_train_batch_size", "0"], r"per_device_train_batch_size"),
    ("learning-rate-nan", ["--learning_rate", "nan"], all_of(r"learning_rate", r"\bnan\b")),
    ("learning-rate-negative", ["--learning_rate", "-1"], all_of(r"learning_rate", r"-1")),
    ("no-epochs", ["--num_train_epochs", "0"], r"num_train_epochs"),
    (
        "no-steps-and-no-epochs",
        ["--max_steps", "0", "--num_train_epochs", "0"],
        all_of("max_steps", "num_train_epochs"),
    ),
]


@pytest.mark.parametrize(("flags", "message"), [case[1:] for case in VALUE_CASES], ids=[c[0] for c in VALUE_CASES])
def test_a_training_value_that_cannot_train_is_refused(workspace, monkeypatch, capfd, flags, message):
    argv = workspace.train_args(*flags)
    before = snapshot(workspace.user)
    status, err = run_in_process("train.py", argv, monkeypatch, capfd)
    assert_one_clear_line("train.py", status, err, message, before, snapshot(workspace.user))


@pytest.mark.parametrize("script", ["train.py", "train_accelerate.py"])
def test_fp8_on_a_machine_without_fp8_is_refused(workspace, monkeypatch, capfd, script):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also where CI has a GPU
    argv = workspace.train_args("--fp8", "true")
    before = snapshot(workspace.user)
    status, err = run_in_process(script, argv, monkeypatch, capfd)
    message = all_of(r"--fp8", r"compute capability 8\.9")
    assert_one_clear_line(script, status, err, message, before, snapshot(workspace.user))


# (id, script, argv, regular expression the message must match)
USAGE_CASES = [
    (
        "convert-unknown-flag",
        "convert_checkpoint.py",
        ["--from", "jax", "vit.npz", "--out", "converted", "--no_such_flag"],
        r"--no_such_flag",
    ),
    (
        "convert-value-of-wrong-type",
        "convert_checkpoint.py",
        ["--from", "jax", "vit.npz", "--out", "converted", "--image_size", "abc"],
        all_of(r"--image_size", r"abc"),
    ),
    ("benchmark-unknown-flag", "benchmark.py", ["--no_such_flag"], r"--no_such_flag"),
    ("benchmark-value-of-wrong-type", "benchmark.py", ["--batch_size", "abc"], all_of(r"--batch_size", r"abc")),
]


@pytest.mark.parametrize(
    ("script", "argv", "message"), [case[1:] for case in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_a_command_line_the_parser_refuses_is_one_line(workspace, monkeypatch, capfd, script, argv, message):
    monkeypatch.chdir(workspace.user)
    before = snapshot(workspace.user)
    status, err = run_in_process(script, argv, monkeypatch, capfd)
    assert_one_clear_line(script, status, err, message, before, snapshot(workspace.user))


# --- the debug variable, bugs, long messages and --help ---


def test_the_debug_variable_shows_the_traceback_of_a_mistake(tmp_path):
    result = run_script("train.py", [str(tmp_path / "missing.json")], **{DEBUG_VARIABLE: "1"})
    assert result.returncode != 0, result.stderr[-3000:]
    assert "Traceback" in result.stderr, result.stderr[-3000:]
    assert "missing.json" in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]


def test_a_bug_keeps_its_traceback():
    def buggy_main():
        raise RuntimeError("a bug, not a mistake")

    with pytest.raises(RuntimeError, match="a bug, not a mistake"):
        run(buggy_main)


def test_a_long_message_is_cut_to_two_lines_that_say_how_to_see_all():
    message = mistake_message("train.py", ValueError("first\nsecond\n\nthird\nfourth"))
    assert message.splitlines() == ["train.py: error: first", f"second ... ({DEBUG_VARIABLE}=1: all)"]


HELP_DRIVER = textwrap.dedent(
    """
    import json, runpy, sys

    statuses = {}
    for script in sys.argv[1:]:
        sys.argv = [script, "--help"]
        try:
            runpy.run_path(script, run_name="__main__")
            statuses[script] = "returned without exiting"
        except SystemExit as exit_:
            statuses[script] = exit_.code or 0
        except Exception as error:
            statuses[script] = repr(error)
    print("STATUSES " + json.dumps(statuses))
    """
)


def test_every_script_still_prints_its_help_and_exits_0():
    """One interpreter runs every script's `--help` (seven would take half a minute of imports)."""
    scripts = [str(SCRIPTS / script) for script in ALL_SCRIPTS]
    result = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, *scripts],
        cwd=REPO,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = json.loads(result.stdout.rsplit("STATUSES ", 1)[1])
    assert statuses == dict.fromkeys(scripts, 0), statuses
    assert result.stdout.count("usage:") == len(scripts), result.stdout[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
