"""User mistakes, one table: each case must end in one exception whose message names the problem.

Config values and types, tensors, images, data sets, checkpoints and command-line flags. A case passes only when the
expected exception type is raised with the expected words, never a silent wrong result or an error from deep
inside torch. The conversions that are not mistakes (grayscale, RGBA and 16-bit images) are checked for the right
result at the end.
"""

import json
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES, make_image_folder, small_run_args, tiny_config_kwargs
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, BertConfig

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.cli import run
from hf_vit_custom.data import (
    ImageClassificationTransform,
    build_datasets,
    convert_image,
    default_image_processor,
    validate_dataset,
)
from hf_vit_custom.training import DataArguments, ModelArguments, ViTTrainingArguments, parse_arguments, train


def config(**overrides) -> ViTCustomConfig:
    return ViTCustomConfig(**tiny_config_kwargs(**overrides))


def model() -> ViTCustomForImageClassification:
    torch.manual_seed(0)
    return ViTCustomForImageClassification(config()).eval()


def images(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype)


def one_pixel(value: float) -> torch.Tensor:
    pixels = images(2, 3, 16, 16)
    pixels[1, 2, 7, 9] = value
    return pixels


def transform(image: Image.Image) -> dict:
    return ImageClassificationTransform(default_image_processor(16, 3))({"image": [image], "label": [0]})


def digits_like(splits: dict[str, int], labels: list[int] | None = None, **columns) -> datasets.DatasetDict:
    """A small image data set with `splits` sizes and 3 classes; `columns` replaces or adds (untyped) columns."""
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    result = {}
    for split, size in splits.items():
        data = {"image": [Image.new("L", (8, 8), 40 * i) for i in range(size)], "label": [i % 3 for i in range(size)]}
        if labels is not None:
            data["label"] = labels[:size]
        data.update({name: values[:size] for name, values in columns.items()})
        result[split] = datasets.Dataset.from_dict(data, features=features if not columns else None)
    return datasets.DatasetDict(result)


def saved_model(tmp_path: Path, change: Callable[[Path], None] | None = None) -> Path:
    folder = tmp_path / "model"
    model().save_pretrained(folder)
    if change is not None:
        change(folder)
    return folder


def truncate_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def drop_layer_weights(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    kept = {name: tensor for name, tensor in weights.items() if ".layers.1." not in name}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


def widen_config(folder: Path) -> None:
    values = json.loads((folder / "config.json").read_text())
    values["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(values))


def write_bert_config(folder: Path) -> None:
    BertConfig().save_pretrained(folder)


def corrupt_config(folder: Path) -> None:
    (folder / "config.json").write_text("{not json")


def folder_with_bad_file(tmp_path: Path, content: bytes) -> Path:
    folder = make_image_folder(tmp_path / "images", classes=("a", "b"), per_class=3)
    (folder / "a" / "broken.png").write_bytes(content)
    return folder


def truncated_png(tmp_path: Path) -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # does not compress
    Image.fromarray(noise).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    return whole[: len(whole) // 2]


def loose_images_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "loose"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (8, 8)).save(folder / f"{index}.png")
    return folder


def train_with(tmp_path: Path, *flags: str) -> None:
    """The training script's path, in process: parse flags, then train (every case fails before the first step)."""
    arguments = [*small_run_args(tmp_path / "out"), "--num_demo_predictions", "0", *flags]
    train(*parse_arguments((ModelArguments, DataArguments, ViTTrainingArguments), arguments))


# (id, what to do given tmp_path, expected exception, words of the message)
CASES = [
    # Config values and types
    ("heads-do-not-divide-width", lambda t: config(hidden_size=30), ValueError, r"must be divisible by `num_attention"),
    ("zero-patch", lambda t: config(patch_size=0), ValueError, r"`patch_size` must be positive"),
    ("image-smaller-than-patch", lambda t: config(image_size=3), ValueError, r"must hold at least one patch"),
    ("dropout-above-one", lambda t: config(hidden_dropout_prob=1.5), ValueError, r"is a probability"),
    ("unknown-activation", lambda t: config(hidden_act="swishy"), ValueError, r"`hidden_act` 'swishy' is unknown"),
    ("unknown-pooling", lambda t: config(pooling="max"), ValueError, r"`pooling` must be one of"),
    ("zero-layer-norm-eps", lambda t: config(layer_norm_eps=0.0), ValueError, r"`layer_norm_eps` must be positive"),
    ("image-size-triple", lambda t: config(image_size=[16, 16, 16]), ValueError, r"int or a \(height, width\) pair"),
    ("no-layers", lambda t: config(num_hidden_layers=0), ValueError, r"`num_hidden_layers` must be a positive"),
    ("width-as-string", lambda t: config(hidden_size="64"), StrictDataclassFieldValidationError, r"expected int"),
    ("layers-as-float", lambda t: config(num_hidden_layers=2.5), StrictDataclassFieldValidationError, r"expected int"),
    ("unknown-preset", lambda t: ViTCustomConfig.from_preset("vit-giant-patch16-224"), ValueError, r"Unknown preset"),
    # Tensors given to the model
    ("rank-3-pixels", lambda t: model()(images(3, 16, 16)), ValueError, r"shape \(batch, channels, height, width\)"),
    ("one-channel-for-rgb", lambda t: model()(images(1, 1, 16, 16)), ValueError, r"has 1 channels but the model"),
    ("wrong-size", lambda t: model()(images(1, 3, 32, 32)), ValueError, r"does not match the model's 16x16"),
    (
        "size-not-multiple-of-patch",
        lambda t: model()(images(1, 3, 18, 18), interpolate_pos_encoding=True),
        ValueError,
        r"must be divisible by the patch size 4x4",
    ),
    ("uint8-pixels", lambda t: model()(images(1, 3, 16, 16, dtype=torch.uint8)), ValueError, r"floating-point"),
    ("nan-pixels", lambda t: model()(images(1, 3, 16, 16) * float("nan")), ValueError, r"NaN or infinite"),
    ("one-infinite-pixel", lambda t: model()(one_pixel(float("-inf"))), ValueError, r"NaN or infinite"),
    ("one-nan-pixel", lambda t: model()(one_pixel(float("nan"))), ValueError, r"NaN or infinite"),
    ("no-pixels", lambda t: model()(), ValueError, r"`pixel_values` is required"),
    ("meta-pixels", lambda t: model()(torch.empty(1, 3, 16, 16, device="meta")), ValueError, r"on the meta device"),
    ("empty-batch", lambda t: model()(images(0, 3, 16, 16)), ValueError, r"`pixel_values` is an empty batch"),
    ("overflowing-pixels", lambda t: model()(torch.full((1, 3, 16, 16), 1e20)), ValueError, r"overflows to NaN"),
    (
        "bool-labels",
        lambda t: model()(images(2, 3, 16, 16), labels=torch.tensor([True, False])),
        ValueError,
        r"`labels` of dtype torch.bool: class indices need an integer dtype \(int64",
    ),
    (
        "label-outside-head",
        lambda t: model()(images(2, 3, 16, 16), labels=torch.tensor([0, 7])),
        ValueError,
        r"class indices in \[0, 5\)",
    ),
    (
        "float-labels-as-indices",
        lambda t: model()(images(2, 3, 16, 16), labels=torch.tensor([0.0, 1.0])),
        ValueError,
        r"multi-hot targets and need shape \(2, 5\)",
    ),
    # Images
    ("empty-image", lambda t: transform(Image.new("RGB", (0, 0))), ValueError, r"0x0 has no pixels"),
    ("float-image", lambda t: transform(Image.new("F", (8, 8))), ValueError, r"Floating-point \('F' mode\)"),
    (
        "truncated-image-file",
        lambda t: build_datasets(train_dir=folder_with_bad_file(t, truncated_png(t)), cache_dir=t / "cache"),
        ValueError,
        r"Cannot read image '.*broken.png'",
    ),
    (
        "zero-byte-image-file",
        lambda t: build_datasets(train_dir=folder_with_bad_file(t, b""), cache_dir=t / "cache"),
        ValueError,
        r"Cannot read image '.*broken.png': cannot identify",
    ),
    # Data sets
    ("no-image-column", lambda t: validate_dataset(digits_like({"train": 3}), "img"), ValueError, r"'img' not found"),
    ("no-label-column", lambda t: validate_dataset(digits_like({"train": 3}), "image", "y"), ValueError, r"'y' not"),
    (
        "unlabelled-examples",  # `datasets` itself refuses labels >= num_classes, but takes -1
        lambda t: validate_dataset(digits_like({"train": 3}, labels=[0, 1, -1])),
        ValueError,
        r"1 labels outside \[0, 3\), e.g. \[-1\] \(-1 marks an unlabelled example\)",
    ),
    (
        "labels-not-class-labels",
        lambda t: validate_dataset(digits_like({"train": 3}, label=["x", "y", "z"])),
        ValueError,
        r"must be a `datasets.ClassLabel`",
    ),
    (
        "empty-split",
        lambda t: validate_dataset(digits_like({"train": 3, "validation": 0})),
        ValueError,
        r"Split 'validation' is empty",
    ),
    (
        "folder-without-class-folders",
        lambda t: build_datasets(train_dir=loose_images_folder(t)),
        ValueError,
        r"directly inside it .* which have no class",
    ),
    (
        "single-class-folder",
        lambda t: build_datasets(train_dir=make_image_folder(t / "one", classes=("a",))),
        ValueError,
        r"only the class sub-folder \['a'\]",
    ),
    ("missing-folder", lambda t: build_datasets(train_dir=t / "nope"), ValueError, r"`train_dir` '.*nope' does not"),
    # Checkpoints
    (
        "truncated-safetensors",
        lambda t: ViTCustomForImageClassification.from_pretrained(saved_model(t, truncate_weights)),
        OSError,
        r"not a readable safetensors file .* truncated or corrupt",
    ),
    (
        "missing-encoder-weights",
        lambda t: AutoModelForImageClassification.from_pretrained(saved_model(t, drop_layer_weights)),
        OSError,
        r"lacks 12 encoder weights",
    ),
    (
        "weights-of-another-shape",
        lambda t: AutoModelForImageClassification.from_pretrained(saved_model(t, widen_config)),
        RuntimeError,
        r"ignore_mismatched_sizes",
    ),
    (
        "config-of-another-model-type",
        lambda t: ViTCustomForImageClassification.from_pretrained(saved_model(t, write_bert_config)),
        ValueError,
        r"`model_type` 'bert', not 'vit_custom'",
    ),
    (
        "corrupt-config-json",
        lambda t: AutoModelForImageClassification.from_pretrained(saved_model(t, corrupt_config)),
        OSError,
        r"not a valid JSON file",
    ),
    (
        "missing-model-folder",
        lambda t: ViTCustomForImageClassification.from_pretrained(str(t / "nope")),
        OSError,
        r"No model folder at .* does not exist",
    ),
    # Command-line flags of the training scripts
    ("misspelt-flag", lambda t: train_with(t, "--lerning_rate", "1e-3"), ValueError, r"not used by the HfArgument"),
    (
        "override-of-unknown-field",
        lambda t: train_with(t, "--config_overrides", f"{TINY_OVERRIDES},hiden_size=3"),
        ValueError,
        r"hiden_size",
    ),
    (
        "override-with-a-bad-value",
        lambda t: train_with(t, "--config_overrides", f"{TINY_OVERRIDES},num_attention_heads=5"),
        ValueError,
        r"must be divisible by `num_attention_heads` \(5\)",
    ),
    (
        "override-that-reshapes-a-checkpoint",
        lambda t: train_with(t, "--model_name_or_path", str(saved_model(t)), "--config_overrides", "hidden_size=64"),
        ValueError,
        r"no longer fits \d+ of its encoder weights",
    ),
    ("unknown-preset-flag", lambda t: train_with(t, "--config_name", "vit-giant-patch4-16"), ValueError, r"preset"),
    ("crop-scale-zero", lambda t: train_with(t, "--min_crop_scale", "0"), ValueError, r"`crop_scale` must satisfy"),
    (
        "validation-share-above-one",
        lambda t: train_with(t, "--validation_size", "1.5"),
        ValueError,
        r"`validation_size` must lie strictly between 0 and 1",
    ),
    (
        "resume-from-missing-folder",
        lambda t: train_with(t, "--resume_from_checkpoint", str(t / "nope")),
        ValueError,
        r"`resume_from_checkpoint` '.*nope' is not a folder",
    ),
    (
        "resume-latest-without-checkpoints",
        lambda t: train_with(t, "--resume_from_checkpoint", "latest"),
        ValueError,
        r"No complete checkpoint-N folder to resume from",
    ),
]


@pytest.mark.parametrize(("make_mistake", "error", "message"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_a_mistake_ends_in_one_clear_error(tmp_path, make_mistake, error, message):
    with pytest.raises(error, match=message):
        make_mistake(tmp_path)


def test_finite_pixels_whose_sum_overflows_are_not_mistaken_for_infinite_ones():
    """They are finite, but the model's arithmetic overflows on them (NaN logits): named as too large."""
    pixels = torch.full((2, 3, 16, 16), 3e38)
    assert torch.isinf(pixels.sum()) and torch.isfinite(pixels).all()
    with pytest.raises(ValueError, match=r"holds values up to 3e\+38, so large that the model's float arithmetic"):
        model()(pixels)


def test_pixels_off_the_cpu_are_not_read_back_for_the_nan_check():
    """On a GPU the check would wait for every queued kernel; a meta tensor, which has no values, stands in for one."""
    on_meta = model().to("meta")
    with torch.no_grad():
        logits = on_meta(torch.empty(2, 3, 16, 16, device="meta")).logits
    assert logits.shape == (2, 5) and logits.device.type == "meta"


def test_the_table_covers_every_kind_of_mistake():
    assert len(CASES) >= 30
    assert len({case[0] for case in CASES}) == len(CASES)


def test_a_bad_flag_value_exits_with_a_usage_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: train_with(tmp_path, "--num_train_epochs", "many"))
    assert exit_info.value.code == 2
    assert "argument --num_train_epochs/--num-train-epochs: invalid float value: 'many'" in capsys.readouterr().err


def test_grayscale_rgba_and_16_bit_images_are_converted_as_a_person_reads_them():
    gray = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4)
    as_rgb = np.asarray(convert_image(gray, "RGB"))
    assert as_rgb.shape == (8, 8, 3) and all((as_rgb[..., c] == np.asarray(gray)).all() for c in range(3))

    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # black under full transparency: shown as white
    assert (np.asarray(convert_image(transparent, "RGB")) == 255).all()

    sixteen_bit = Image.fromarray(np.asarray(gray, dtype=np.uint16) * 257)  # the same picture, 16 bits per pixel
    assert sixteen_bit.mode == "I;16"
    assert (np.asarray(convert_image(sixteen_bit, "L")) == np.asarray(gray)).all()
    assert transform(sixteen_bit)["pixel_values"].equal(transform(gray)["pixel_values"])


def test_int32_labels_are_class_indices():
    classifier = model()
    pixels = images(2, 3, 16, 16)
    int32_loss = classifier(pixels, labels=torch.tensor([0, 3], dtype=torch.int32)).loss
    torch.testing.assert_close(int32_loss, classifier(pixels, labels=torch.tensor([0, 3])).loss, rtol=0, atol=0)


def test_a_failed_call_leaves_the_problem_type_unset():
    """transformers' loss infers `problem_type` from the first labels and stores it: not from labels it refuses."""
    classifier = model()
    pixels = images(2, 3, 16, 16)
    for wrong in (torch.tensor([True, False]), torch.ones(2, 3)):  # bool; float of the wrong shape
        with pytest.raises(ValueError):
            classifier(pixels, labels=wrong)
        assert classifier.config.problem_type is None
    assert torch.isfinite(classifier(pixels, labels=torch.tensor([0, 1])).loss)  # correct labels still work
    assert classifier.config.problem_type == "single_label_classification"
