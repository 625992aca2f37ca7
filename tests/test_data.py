"""Tests of the data pipeline: loaders, validation, label maps, transform and collation. No network."""

from __future__ import annotations

import io
import logging
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from transformers import CLIPImageProcessorPil
from transformers.image_utils import load_image

from hf_vit_custom.data import (
    ImageClassificationTransform,
    PerExampleSeededDataset,
    _decode_for_crop,
    build_datasets,
    collate_fn,
    convert_image,
    default_image_processor,
    encode_labels,
    label_maps,
    load_digits_dataset,
    load_hub_dataset,
    load_image_folder,
    open_image,
    validate_dataset,
)

CLASSES = ["cat", "dog", "fox"]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> datasets.DatasetDict:
    return load_digits_dataset(seed=42)


def image_bytes(dataset: datasets.Dataset) -> list[bytes]:
    """Raw encoded images, compared without decoding."""
    return [
        item["bytes"] or Path(item["path"]).read_bytes()
        for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]
    ]


def image_paths(dataset: datasets.Dataset) -> list[str]:
    return [item["path"] for item in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


def labelled_dataset(labels, names=("a", "b", "c"), size=(5, 5), features=None) -> datasets.Dataset:
    images = [Image.fromarray(np.full((*size, 3), 20 * index, dtype=np.uint8)) for index in range(len(labels))]
    features = features or datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))}
    )
    return datasets.Dataset.from_dict({"image": images, "label": list(labels)}, features=features)


def asymmetric_image(size: int = 16) -> Image.Image:
    """A gradient that changes under a left-right flip."""
    row = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.tile(row, (size, 1))).convert("RGB")


# ---------------------------------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------------------------------


def test_digits_split_sizes_and_features(digits):
    assert list(digits) == ["train", "validation", "test"]
    sizes = {split: len(digits[split]) for split in digits}
    assert sum(sizes.values()) == 1797
    # sklearn rounds the held-out sizes up: ceil(0.2 * 1797) = 360, ceil(0.125 * 1437) = 180.
    assert sizes == {"train": 1257, "validation": 180, "test": 360}
    for split in digits.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["label"].names == [str(digit) for digit in range(10)]


def test_digits_are_stratified(digits):
    overall = Counter(label for split in digits.values() for label in split["label"])
    for split in digits.values():
        counts = Counter(split["label"])
        assert sorted(counts) == list(range(10))
        for label, count in counts.items():
            assert abs(count / len(split) - overall[label] / 1797) < 0.01


def test_digits_images_are_8x8_grayscale_scaled_to_255(digits):
    image = digits["train"][0]["image"]
    assert image.mode == "L"
    assert image.size == (8, 8)
    stacked = np.stack([np.asarray(item["image"]) for item in digits["validation"]])
    assert stacked.dtype == np.uint8
    assert stacked.min() == 0 and stacked.max() == 255
    # Values come from 0..16 multiplied by 255 / 16, so only 17 levels occur.
    assert len(np.unique(stacked)) <= 17


def test_digits_are_deterministic_per_seed(digits):
    again = load_digits_dataset(seed=42)
    other = load_digits_dataset(seed=7)
    for split in digits:
        assert again[split]["label"][:] == digits[split]["label"][:]
        assert image_bytes(again[split]) == image_bytes(digits[split])
    assert image_bytes(other["train"]) != image_bytes(digits["train"])
    assert {split: len(other[split]) for split in other} == {split: len(digits[split]) for split in digits}


def test_digits_without_test_split_and_bad_fractions():
    no_test = load_digits_dataset(test_size=0.0, validation_size=0.2)
    assert list(no_test) == ["train", "validation"]
    assert len(no_test["train"]) + len(no_test["validation"]) == 1797
    with pytest.raises(ValueError, match="validation_size"):
        load_digits_dataset(validation_size=0.0)
    with pytest.raises(ValueError, match="below 1"):
        load_digits_dataset(validation_size=0.5, test_size=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------------


def test_image_folder_with_validation_and_test_folders(tmp_path):
    train = make_image_folder(tmp_path / "train")
    validation = make_image_folder(tmp_path / "validation", per_class=2, seed=1)
    test = make_image_folder(tmp_path / "test", per_class=3, seed=2)
    dataset = load_image_folder(train, validation, test, cache_dir=tmp_path / "cache")
    assert {split: len(dataset[split]) for split in dataset} == {"train": 18, "validation": 6, "test": 9}
    for split in dataset.values():
        assert split.features["label"].names == CLASSES
        # Every label is the name of the folder the image came from.
        names = [CLASSES[label] for label in split["label"]]
        assert names == [Path(path).parent.name for path in image_paths(split)]
    image = dataset["train"][0]["image"]
    assert image.mode == "RGB"
    assert {item["image"].size for item in dataset["train"]} > {image.size}  # sizes differ


def test_image_folder_holds_out_stratified_validation(tmp_path):
    train = make_image_folder(tmp_path / "train")
    dataset = load_image_folder(train, validation_size=0.5, seed=3, cache_dir=tmp_path / "cache")
    assert list(dataset) == ["train", "validation"]
    assert Counter(dataset["validation"]["label"]) == {0: 3, 1: 3, 2: 3}
    assert Counter(dataset["train"]["label"]) == {0: 3, 1: 3, 2: 3}
    assert not set(image_paths(dataset["train"])) & set(image_paths(dataset["validation"]))
    again = load_image_folder(train, validation_size=0.5, seed=3, cache_dir=tmp_path / "cache")
    assert image_paths(again["validation"]) == image_paths(dataset["validation"])


def test_image_folder_falls_back_to_random_split_when_stratification_is_impossible(tmp_path):
    # 10% of 18 images is 2 images, too few to hold one of each of the 3 classes.
    dataset = load_image_folder(make_image_folder(tmp_path / "train"), cache_dir=tmp_path / "cache")
    assert len(dataset["validation"]) == 2
    assert len(dataset["train"]) == 16


def test_image_folder_file_named_like_a_split_stays_in_train(tmp_path):
    # With `data_dir`, `datasets` would turn "test_0.png" into a separate "test" split and drop everything else.
    train = make_image_folder(tmp_path / "train")
    Image.new("RGB", (9, 9)).save(train / "cat" / "test_0.png")
    dataset = load_image_folder(train, validation_size=0.5, cache_dir=tmp_path / "cache")
    assert len(dataset["train"]) + len(dataset["validation"]) == 19


def test_image_folder_errors(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="does not exist"):
        load_image_folder(tmp_path / "missing", cache_dir=cache)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="contains no images"):
        load_image_folder(tmp_path / "empty", cache_dir=cache)

    (tmp_path / "text" / "cat").mkdir(parents=True)
    (tmp_path / "text" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="contains no images"):
        load_image_folder(tmp_path / "text", cache_dir=cache)

    (tmp_path / "flat").mkdir()
    for index in range(3):
        Image.new("RGB", (4, 4)).save(tmp_path / "flat" / f"{index}.png")
    with pytest.raises(ValueError, match="directly inside it"):
        load_image_folder(tmp_path / "flat", cache_dir=cache)

    single = make_image_folder(tmp_path / "single", classes=["cat"])
    with pytest.raises(ValueError, match="at least two classes"):
        load_image_folder(single, cache_dir=cache)

    nested = make_image_folder(tmp_path / "nested")
    (nested / "cat" / "deeper").mkdir()
    Image.new("RGB", (4, 4)).save(nested / "cat" / "deeper" / "x.png")
    with pytest.raises(ValueError, match="nested below"):
        load_image_folder(nested, cache_dir=cache)

    train = make_image_folder(tmp_path / "train")
    other = make_image_folder(tmp_path / "other", classes=["cat", "dog", "owl"], per_class=1)
    with pytest.raises(ValueError, match=r"classes of `validation_dir`.*missing \['fox'\], extra \['owl'\]"):
        load_image_folder(train, validation_dir=other, cache_dir=cache)


# ---------------------------------------------------------------------------------------------------------------------
# Hub-style data sets (a local folder of Parquet files, which `load_dataset` reads like a Hub repository)
# ---------------------------------------------------------------------------------------------------------------------


def write_parquet_dataset(root: Path, train_labels, test_labels, label_feature) -> Path:
    features = datasets.Features({"img": datasets.Image(), "fine": label_feature, "extra": datasets.Value("int64")})
    (root / "data").mkdir(parents=True)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        images = [Image.fromarray(np.full((6, 7, 3), index, dtype=np.uint8)) for index in range(len(labels))]
        split_dataset = datasets.Dataset.from_dict(
            {"img": images, "fine": list(labels), "extra": list(range(len(labels)))}, features=features
        )
        split_dataset.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_hub_dataset_renames_columns_encodes_string_labels_and_adds_validation(tmp_path):
    root = write_parquet_dataset(tmp_path / "hub", ["b", "a", "c", "a"] * 5, ["c", "c", "a"], datasets.Value("string"))
    dataset = load_hub_dataset(
        str(root), image_column="img", label_column="fine", validation_size=0.25, cache_dir=tmp_path / "cache"
    )
    assert list(dataset) == ["train", "validation", "test"]
    assert len(dataset["train"]) + len(dataset["validation"]) == 20
    assert len(dataset["test"]) == 3
    for split in dataset.values():
        assert {"image", "label"} <= set(split.column_names)
        assert split.features["label"].names == ["a", "b", "c"]
    # The test split lacks "b" but still maps "c" to 2 (per-split encoding would give 1).
    assert dataset["test"]["label"][:] == [2, 2, 0]
    assert dataset["train"][0]["image"].size == (7, 6)
    validate_dataset(dataset)


def test_hub_dataset_keeps_integer_label_values(tmp_path):
    root = write_parquet_dataset(tmp_path / "hub", [0, 2, 10, 2] * 3, [10, 0], datasets.Value("int64"))
    dataset = load_hub_dataset(str(root), image_column="img", label_column="fine", cache_dir=tmp_path / "cache")
    assert dataset["train"].features["label"].names == [str(index) for index in range(11)]
    assert dataset["test"]["label"][:] == [10, 0]
    assert sorted(set(dataset["train"]["label"]) | set(dataset["validation"]["label"])) == [0, 2, 10]


def test_hub_dataset_unknown_column_lists_available_columns(tmp_path):
    root = write_parquet_dataset(tmp_path / "hub", [0, 1] * 4, [0, 1], datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"Column 'image' not found .*\['img', 'fine', 'extra'\]"):
        load_hub_dataset(str(root), label_column="fine", cache_dir=tmp_path / "cache")


# ---------------------------------------------------------------------------------------------------------------------
# build_datasets
# ---------------------------------------------------------------------------------------------------------------------


def test_build_datasets_picks_the_source(tmp_path):
    digits = build_datasets(seed=1)
    assert list(digits) == ["train", "validation", "test"]
    assert digits["train"].features["label"].num_classes == 10

    folder = build_datasets(train_dir=make_image_folder(tmp_path / "train"), validation_size=0.5, cache_dir=tmp_path)
    assert list(folder) == ["train", "validation"]
    assert folder["train"].features["label"].names == CLASSES

    root = write_parquet_dataset(tmp_path / "hub", [0, 1] * 6, [1, 0], datasets.Value("int64"))
    hub = build_datasets(dataset_name=str(root), image_column="img", label_column="fine", cache_dir=tmp_path / "c")
    assert list(hub) == ["train", "validation", "test"]


def test_build_datasets_rejects_conflicting_arguments(tmp_path):
    with pytest.raises(ValueError, match="either `dataset_name` or `train_dir`"):
        build_datasets(dataset_name="x", train_dir=tmp_path)
    with pytest.raises(ValueError, match="need `train_dir`"):
        build_datasets(validation_dir=tmp_path)
    with pytest.raises(ValueError, match="only apply to `dataset_name`"):
        build_datasets(train_dir=tmp_path, label_column="fine")
    with pytest.raises(ValueError, match="needs `dataset_name`"):
        build_datasets(dataset_config_name="plain")


# ---------------------------------------------------------------------------------------------------------------------
# validate_dataset, encode_labels, label_maps
# ---------------------------------------------------------------------------------------------------------------------


def test_validate_dataset_accepts_a_good_dataset():
    dataset = datasets.DatasetDict({"train": labelled_dataset([0, 1, 2]), "validation": labelled_dataset([2, 0])})
    assert validate_dataset(dataset) is None


def test_validate_dataset_errors():
    good = labelled_dataset([0, 1, 2])
    with pytest.raises(ValueError, match="no 'train' split; it has \\['validation'\\]"):
        validate_dataset(datasets.DatasetDict({"validation": good}))
    with pytest.raises(ValueError, match="Split 'validation' is empty"):
        validate_dataset(datasets.DatasetDict({"train": good, "validation": good.select([])}))
    with pytest.raises(
        ValueError, match=r"Column 'labels' not found in split 'train'; available columns: \['image', 'label'\]"
    ):
        validate_dataset(datasets.DatasetDict({"train": good}), label_column="labels")

    as_int = good.cast_column("label", datasets.Value("int64"))
    with pytest.raises(ValueError, match=r"must be a `datasets\.ClassLabel`"):
        validate_dataset(datasets.DatasetDict({"train": as_int}))

    # Casting to ClassLabel does not check the values, so out-of-range labels do reach training code.
    out_of_range = (
        as_int.select([0, 1])
        .map(lambda example: {"label": example["label"] + 2})
        .cast_column("label", datasets.ClassLabel(names=["a", "b", "c"]))
    )
    with pytest.raises(ValueError, match=r"1 labels outside \[0, 3\), e.g. \[3\]"):
        validate_dataset(datasets.DatasetDict({"train": out_of_range}))
    unlabelled = labelled_dataset([0, -1])
    with pytest.raises(ValueError, match="-1 marks an unlabelled example"):
        validate_dataset(datasets.DatasetDict({"train": good, "test": unlabelled}))

    other_names = labelled_dataset([0], names=("x", "y", "z"))
    with pytest.raises(ValueError, match="class names of split 'validation'"):
        validate_dataset(datasets.DatasetDict({"train": good, "validation": other_names}))

    not_images = good.cast_column("image", datasets.Image(decode=False)).map(lambda _: {"path_only": "x"})
    not_images = not_images.remove_columns("image").rename_column("path_only", "image")
    with pytest.raises(ValueError, match=r"must be a `datasets\.Image`"):
        validate_dataset(datasets.DatasetDict({"train": not_images}))


def test_encode_labels_shares_one_mapping_across_splits():
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")})
    dataset = datasets.DatasetDict(
        {
            "train": labelled_dataset(["dog", "cat", "fox"], features=features),
            "test": labelled_dataset(["fox"], features=features),
        }
    )
    encoded = encode_labels(dataset)
    assert encoded["train"].features["label"].names == ["cat", "dog", "fox"]
    assert encoded["train"]["label"][:] == [1, 0, 2]
    assert encoded["test"]["label"][:] == [2]
    int_features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    negative = datasets.DatasetDict({"train": labelled_dataset([0, -1], features=int_features)})
    with pytest.raises(ValueError, match="negative labels"):
        encode_labels(negative)


def test_label_maps(digits, tmp_path):
    id2label, label2id = label_maps(digits)
    assert id2label == {index: str(index) for index in range(10)}
    assert label2id == {str(index): index for index in range(10)}
    id2label, label2id = label_maps(labelled_dataset([0], names=CLASSES))
    assert id2label == {0: "cat", 1: "dog", 2: "fox"} and label2id == {"cat": 0, "dog": 1, "fox": 2}
    with pytest.raises(ValueError, match=r"must be a `datasets\.ClassLabel`"):
        label_maps(labelled_dataset([0]).cast_column("label", datasets.Value("int64")))


# ---------------------------------------------------------------------------------------------------------------------
# Image processor, transform, collation
# ---------------------------------------------------------------------------------------------------------------------


def test_default_image_processor_keeps_one_channel_and_normalises():
    processor = default_image_processor((16, 12), num_channels=1)
    image = Image.fromarray(np.full((8, 8), 255, dtype=np.uint8))
    pixel_values = processor([image, image.resize((5, 9))], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (2, 1, 16, 12)
    assert torch.allclose(pixel_values, torch.ones_like(pixel_values))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="num_channels"):
        default_image_processor(16, num_channels=2)


@pytest.mark.parametrize("num_channels", [1, 3])
def test_eval_transform_shapes_dtypes_and_determinism(digits, num_channels):
    processor = default_image_processor(16, num_channels)
    transform = ImageClassificationTransform(processor, num_channels=num_channels, train=False)
    batch = digits["validation"][:4]
    output = transform(batch)
    assert set(output) == {"pixel_values", "labels"}
    assert output["pixel_values"].shape == (4, num_channels, 16, 16)
    assert output["pixel_values"].dtype == torch.float32
    assert output["labels"].dtype == torch.int64
    assert output["labels"].tolist() == batch["label"]
    assert output["pixel_values"].min() >= -1 and output["pixel_values"].max() <= 1
    assert torch.equal(transform(batch)["pixel_values"], output["pixel_values"])
    # Evaluation is exactly the processor on the converted images: no augmentation.
    mode = "L" if num_channels == 1 else "RGB"
    expected = processor([image.convert(mode) for image in batch["image"]], return_tensors="pt")["pixel_values"]
    assert torch.equal(output["pixel_values"], expected)


def test_three_channel_transform_on_image_folder_of_mixed_sizes(tmp_path):
    dataset = load_image_folder(make_image_folder(tmp_path / "train"), validation_size=0.5, cache_dir=tmp_path / "c")
    transform = ImageClassificationTransform(default_image_processor(16, 3), num_channels=3, train=True)
    output = transform(dataset["train"][:5])
    assert output["pixel_values"].shape == (5, 3, 16, 16)
    assert output["labels"].shape == (5,)


def test_train_transform_is_seeded_per_example_and_augments(digits):
    processor = default_image_processor(16, 1)
    batch = digits["train"][:8]
    transform = ImageClassificationTransform(processor, num_channels=1, train=True)
    first = transform(batch, example_seeds=list(range(8)))["pixel_values"]
    second = transform(batch, example_seeds=list(range(8)))["pixel_values"]
    other = transform(batch, example_seeds=list(range(1, 9)))["pixel_values"]
    plain = ImageClassificationTransform(processor, num_channels=1, train=False)(batch)["pixel_values"]
    assert first.shape == plain.shape == (8, 1, 16, 16)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert not torch.equal(first, plain)
    # Without seeds it draws from the global generator: new crops on every call (every epoch).
    assert not torch.equal(transform(batch)["pixel_values"], transform(batch)["pixel_values"])


def test_per_example_seeds_give_the_same_crops_with_any_worker_count_and_new_ones_each_epoch(digits):
    dataset = PerExampleSeededDataset(
        digits["train"].select(range(8)),
        ImageClassificationTransform(default_image_processor(16, 1), num_channels=1, train=True),
        seed=5,
    )

    def crops(num_workers: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=num_workers, collate_fn=collate_fn)
        return torch.cat([batch["pixel_values"] for batch in loader])

    in_process = crops(0)
    assert torch.equal(crops(2), in_process)  # two workers, each with a copy of the dataset
    dataset.set_epoch(1)
    assert not torch.equal(crops(0), in_process)


def test_no_flip_unless_enabled():
    processor = default_image_processor(16, 3)
    image = asymmetric_image(16)
    batch = {"image": [image] * 16, "label": [0] * 16}
    plain = processor([image], return_tensors="pt")["pixel_values"][0]
    flipped = torch.flip(plain, dims=[-1])

    torch.manual_seed(0)
    no_flip = ImageClassificationTransform(processor, train=True, crop_scale=None, horizontal_flip=False)
    for pixel_values in no_flip(batch)["pixel_values"]:
        assert torch.equal(pixel_values, plain)

    flip = ImageClassificationTransform(processor, train=True, crop_scale=None, horizontal_flip=True)
    outcomes = [torch.equal(values, flipped) for values in flip(batch)["pixel_values"]]
    assert all(torch.equal(values, flipped) or torch.equal(values, plain) for values in flip(batch)["pixel_values"])
    assert 0 < sum(outcomes) < 16


def test_crop_boxes_stay_inside_the_image():
    transform = ImageClassificationTransform(default_image_processor(16, 3), train=True, crop_scale=(0.08, 1.0))
    generator = torch.Generator().manual_seed(0)
    for width, height in [(8, 8), (40, 4), (4, 40), (17, 9)]:
        for _ in range(50):
            top, left, crop_height, crop_width = transform._crop_box(width, height, generator)
            assert top >= 0 and top + crop_height <= height and crop_height > 0
            assert left >= 0 and left + crop_width <= width and crop_width > 0


def test_transform_rejects_mismatched_processor():
    with pytest.raises(ValueError, match="normalises 3 channels"):
        ImageClassificationTransform(default_image_processor(16, 3), num_channels=1)
    with pytest.raises(ValueError, match="num_channels"):
        ImageClassificationTransform(default_image_processor(16, 3), num_channels=4)


def test_with_transform_and_collate_fn(digits):
    transform = ImageClassificationTransform(default_image_processor(16, 1), num_channels=1, train=True)
    transformed = digits["validation"].with_transform(transform)
    example = transformed[0]
    assert example["pixel_values"].shape == (1, 16, 16)
    assert example["labels"].shape == ()
    batch = collate_fn([transformed[index] for index in range(5)])
    assert batch["pixel_values"].shape == (5, 1, 16, 16)
    assert batch["labels"].dtype == torch.int64
    assert batch["labels"].tolist() == digits["validation"]["label"][:5]
    loader = torch.utils.data.DataLoader(transformed, batch_size=4, collate_fn=collate_fn)
    first = next(iter(loader))
    assert first["pixel_values"].shape == (4, 1, 16, 16) and first["labels"].shape == (4,)


def test_a_cropping_processor_gives_its_crop_size_and_training_skips_its_crop():
    """CLIP-style preprocessing (resize the short side, centre-crop), as converted DINOv2, CLIP and timm folders carry:
    evaluation uses it whole; training's random crop already has the crop size, so the processor only normalises."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    processor = CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})
    evaluation = ImageClassificationTransform(processor)({"image": [image], "label": [0]})["pixel_values"]
    torch.testing.assert_close(evaluation, processor([image], return_tensors="pt")["pixel_values"])
    whole_image = {"crop_scale": (1.0, 1.0), "crop_ratio": (70 / 50, 70 / 50)}
    training = ImageClassificationTransform(processor, train=True, **whole_image)
    pixels = training({"image": [image], "label": [0]})["pixel_values"]
    resized = image.resize((32, 32), resample=Image.Resampling.BILINEAR)
    expected = processor([resized], do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    torch.testing.assert_close(pixels, expected)


def write_bad_image(folder: Path, kind: str) -> Path:
    """Into `folder/cat`: a non-image named .jpg, a truncated JPEG, or a decompression bomb (under a pixel limit
    lowered to 1,000 by the test, so that a 200x200 image is one)."""
    path = folder / "cat" / {"not-an-image": "notes.jpg", "truncated": "cut.jpg", "bomb": "bomb.png"}[kind]
    if kind == "not-an-image":
        path.write_text("not an image")
    elif kind == "truncated":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        path.write_bytes(path.read_bytes()[:400])  # the header survives: only decoding finds it
    else:
        Image.new("L", (200, 200)).save(path)
    return path


@pytest.mark.parametrize("kind", ["not-an-image", "truncated", "bomb"])
def test_an_image_that_does_not_decode_is_named_before_training(kind, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    train = make_image_folder(tmp_path / "train")
    bad = write_bad_image(train, kind)
    with pytest.raises(ValueError, match=rf"Cannot read image '.*{bad.name}'.*--skip_bad_images"):
        load_image_folder(train, cache_dir=tmp_path / "cache")


def test_skip_bad_images_leaves_them_out_with_a_warning_naming_each(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    train = make_image_folder(tmp_path / "train")
    bad = [write_bad_image(train, kind) for kind in ("not-an-image", "truncated", "bomb")]
    with caplog.at_level(logging.WARNING, logger="hf_vit_custom.data"):
        dataset = load_image_folder(train, validation_size=0.5, cache_dir=tmp_path / "cache", skip_bad_images=True)
    assert dataset["train"].num_rows + dataset["validation"].num_rows == 3 * 6  # the good images, all of them
    for path in bad:
        assert path.name in caplog.text


def test_the_pipelines_image_loading_clips_16_bit_images_and_convert_image_rescales_them():
    """What the README warns of: transformers' `load_image` (the pipeline's way in) turns a 16-bit image white;
    `convert_image` scales it to 8 bits first."""
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(buffer, format="PNG")  # 0 ... 63,000
    buffer.seek(0)
    sixteen_bit = Image.open(buffer)
    assert sixteen_bit.mode == "I;16"
    assert (np.asarray(load_image(sixteen_bit))[..., 0] == 255).mean() > 0.9
    rescaled = np.asarray(convert_image(sixteen_bit, "RGB"))[..., 0]
    assert rescaled.max() < 255 and len(np.unique(rescaled)) == 64


# ---------------------------------------------------------------------------------------------------------------------
# Reduced-size JPEG decoding in the training transform
# ---------------------------------------------------------------------------------------------------------------------


def camera_sized_jpeg(scale: int = 3) -> bytes:
    """scikit-learn's first sample photo (640x427) enlarged `scale` times, as JPEG bytes."""
    import sklearn.datasets

    photo = sorted(Path(sklearn.datasets.__file__).parent.joinpath("images").glob("*.jpg"))[0]
    buffer = io.BytesIO()
    with Image.open(photo) as image:
        image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC).save(buffer, "JPEG")
    return buffer.getvalue()


def test_a_large_crop_of_a_jpeg_is_decoded_at_a_reduced_scale_with_the_box_rescaled():
    encoded = camera_sized_jpeg()
    image, box = _decode_for_crop(Image.open(io.BytesIO(encoded)), (0, 0, 1800, 1200), (224, 224))
    # 1/4: the box becomes 450x300, still above 224x224; at 1/8 (225x150) it would not be.
    assert image.size == (480, 321)
    assert box == pytest.approx((0, 0, 1800 * 480 / 1920, 1200 * 321 / 1281))
    small_crop = Image.open(io.BytesIO(encoded))
    assert _decode_for_crop(small_crop, (0, 0, 400, 400), (224, 224))[0].size == (1920, 1281)  # under 2x: as it is
    png = io.BytesIO()
    Image.open(io.BytesIO(encoded)).save(png, "PNG")
    assert _decode_for_crop(Image.open(png), (0, 0, 1800, 1200), (224, 224))[0].size == (1920, 1281)


def test_the_training_transform_on_encoded_jpegs_matches_it_on_decoded_images():
    encoded = camera_sized_jpeg()
    processor = default_image_processor(224)
    transform = ImageClassificationTransform(processor, train=True, crop_scale=(0.08, 1.0))
    seeds = list(range(16))
    from_bytes = transform.pixel_values([{"bytes": encoded, "path": None}] * 16, seeds)
    decoded = transform.pixel_values([Image.open(io.BytesIO(encoded)).convert("RGB")] * 16, seeds)
    # The same crops (the random draws do not depend on the decode), the pixels of a scaled inverse DCT: close.
    assert from_bytes.shape == decoded.shape == (16, 3, 224, 224)
    assert (from_bytes - decoded).abs().mean() < 0.03
    assert not torch.equal(from_bytes, decoded)  # some crops were large enough to decode at 1/2 .. 1/8


def test_open_image_refuses_what_is_not_an_image():
    with pytest.raises(ValueError, match="Expected a PIL image or an encoded image"):
        open_image({"bytes": None, "path": None})
