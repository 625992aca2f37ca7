"""Data pipeline shared by the Trainer and the Accelerate training scripts.

Every loader returns a `datasets.DatasetDict` with the columns `image` (`datasets.Image`) and `label`
(`datasets.ClassLabel`), so the rest of the pipeline (`validate_dataset`, `label_maps`, the transform) never has to
know where the images came from. Images stay PIL images inside the data set; `ImageClassificationTransform` turns
them into tensors lazily through `Dataset.with_transform`, which keeps random augmentation fresh for every epoch.

Note for `Trainer` users: pass `remove_unused_columns=False`, otherwise `Trainer` drops the `image` and `label`
columns (they are not arguments of the model's forward) before the transform can read them.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from transformers import ViTImageProcessorPil

from .configuration_vit_custom import to_pair
from .recipes import SOFT_LABELS, TrivialAugmentWide

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
SPLITS = ("train", "validation", "test")
# Common formats PIL decodes; the pre-scan passes only these files to `imagefolder`, so nothing else is loaded.
IMAGE_EXTENSIONS = frozenset(
    {".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp", ".jfif", ".jpe"}
)
DIGITS_CLASS_NAMES = [str(digit) for digit in range(10)]
UNLABELED_CLASS = "unlabeled"  # the one class of `load_unlabeled_image_folder`


# ---------------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------------


def load_digits_dataset(seed: int = 42, validation_size: float = 0.1, test_size: float = 0.2) -> datasets.DatasetDict:
    """Load scikit-learn's bundled 8x8 digits (1,797 images) as a stratified train/validation/test `DatasetDict`.

    It ships with scikit-learn, so it is the default that works offline and is small enough for tests and smoke runs.

    Args:
        seed: seed of both stratified splits; the same seed always gives the same splits.
        validation_size: fraction of *all* images that goes to the validation split.
        test_size: fraction of *all* images that goes to the test split; 0 gives no test split.

    Returns:
        Splits `train`, `validation` (and `test` when `test_size > 0`), each with an 8x8 grayscale ("L") `image`
        and a `label` `ClassLabel` named "0" ... "9".
    """
    _check_fraction("validation_size", validation_size)
    if not 0.0 <= test_size < 1.0:
        raise ValueError(f"`test_size` must lie in [0, 1), got {test_size!r}.")
    if validation_size + test_size >= 1.0:
        raise ValueError(
            f"`validation_size` + `test_size` must be below 1 to leave a training split, got "
            f"{validation_size} + {test_size}."
        )
    digits = load_digits()
    # The raw values are ink counts 0..16; stretch them to the full 8-bit range so the images look like images and
    # the processor's usual 1/255 rescaling maps them to [0, 1].
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))

    split_indices: dict[str, np.ndarray] = {}
    if test_size > 0:
        indices, split_indices["test"] = train_test_split(
            indices, test_size=test_size, random_state=seed, stratify=labels[indices]
        )
    # Both fractions refer to the whole data set, so rescale the validation fraction to what is left after the test.
    train_indices, split_indices["validation"] = train_test_split(
        indices, test_size=validation_size / (1.0 - test_size), random_state=seed, stratify=labels[indices]
    )
    split_indices = {"train": train_indices, **split_indices}

    features = datasets.Features(
        {IMAGE_COLUMN: datasets.Image(), LABEL_COLUMN: datasets.ClassLabel(names=DIGITS_CLASS_NAMES)}
    )
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    # A 2-D uint8 array becomes a grayscale ("L") image.
                    IMAGE_COLUMN: [Image.fromarray(pixels[index]) for index in split_indices[split]],
                    LABEL_COLUMN: labels[split_indices[split]].tolist(),
                },
                features=features,
                split=datasets.NamedSplit(split),
            )
            for split in SPLITS
            if split in split_indices
        }
    )


def load_image_folder(
    train_dir: str | os.PathLike,
    validation_dir: str | os.PathLike | None = None,
    test_dir: str | os.PathLike | None = None,
    validation_size: float = 0.1,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    skip_bad_images: bool = False,
) -> datasets.DatasetDict:
    """Load `train_dir/<class>/<image>` folders (plus optional validation/test folders with the same classes).

    Each folder is checked before loading, because `imagefolder` silently drops the labels when the layout is off
    (images directly in the folder, a single class, mixed depths), and then training fails far from the cause.

    Args:
        train_dir: folder with one sub-folder per class; the sub-folder names become the class names.
        validation_dir: same layout and classes as `train_dir`; without it, `validation_size` of the training
            images are held out (stratified by class when every class has enough images).
        test_dir: optional folder with the same layout and classes as `train_dir`.
        validation_size: fraction of the training images held out when there is no `validation_dir`.
        seed: seed of the held-out split.
        cache_dir: where `datasets` writes its Arrow cache (defaults to the `datasets` cache).
        skip_bad_images: leave out, with a warning naming each, the files that do not decode (see
            `check_image_files`), instead of refusing the folder.

    Returns:
        Splits `train`, `validation` (and `test` with `test_dir`), columns `image` and `label` (`ClassLabel` with
        the sorted class-folder names).
    """
    _check_fraction("validation_size", validation_size)
    train_files, class_names = _scan_image_folder(train_dir, "train_dir")
    dataset = datasets.DatasetDict({"train": _load_image_files(train_files, cache_dir, skip_bad_images)})
    for split, folder, argument in (("validation", validation_dir, "validation_dir"), ("test", test_dir, "test_dir")):
        if folder is None:
            continue
        files, split_class_names = _scan_image_folder(folder, argument)
        _check_classes_match(class_names, split_class_names, train_dir, folder, argument)
        dataset[split] = _load_image_files(files, cache_dir, skip_bad_images)
    if "validation" not in dataset:
        dataset["train"], dataset["validation"] = _hold_out(dataset["train"], validation_size, seed, LABEL_COLUMN)
    return datasets.DatasetDict({split: dataset[split] for split in SPLITS if split in dataset})


def check_same_classes(train_dir: str | os.PathLike, validation_dir: str | os.PathLike) -> None:
    """Raise the `ValueError` `load_image_folder` raises for differing class folders, from the listings alone (before
    any image is read)."""
    _, class_names = _scan_image_folder(train_dir, "train_dir")
    _, validation_class_names = _scan_image_folder(validation_dir, "validation_dir")
    _check_classes_match(class_names, validation_class_names, train_dir, validation_dir, "validation_dir")


def _check_classes_match(
    class_names: list[str], split_class_names: list[str], train_dir, folder, argument: str
) -> None:
    if split_class_names != class_names:
        raise ValueError(
            f"The classes of `{argument}` ({folder}) differ from those of `train_dir` ({train_dir}): "
            f"missing {sorted(set(class_names) - set(split_class_names))}, "
            f"extra {sorted(set(split_class_names) - set(class_names))}. Both need the same class sub-folders."
        )


def load_unlabeled_image_folder(
    train_dir: str | os.PathLike,
    validation_dir: str | os.PathLike | None = None,
    validation_size: float = 0.1,
    seed: int = 42,
    skip_bad_images: bool = False,
) -> datasets.DatasetDict:
    """Load every image below `train_dir` (any layout; sub-folder names are ignored) for self-supervised training.

    The images get one placeholder class, `UNLABELED_CLASS`, so that the rest of the pipeline (validation, transforms,
    `label_maps`) stays the classifier's; nothing trains on it. Without `validation_dir`, `validation_size` of the
    images are held out.
    """
    _check_fraction("validation_size", validation_size)
    dataset = datasets.DatasetDict({"train": _unlabeled_images(train_dir, "train_dir", skip_bad_images)})
    if validation_dir is not None:
        dataset["validation"] = _unlabeled_images(validation_dir, "validation_dir", skip_bad_images)
    else:
        dataset["train"], dataset["validation"] = _hold_out(dataset["train"], validation_size, seed, LABEL_COLUMN)
    return dataset


def _unlabeled_images(folder: str | os.PathLike, argument: str, skip_bad_images: bool) -> datasets.Dataset:
    files = check_image_files([str(path) for path in _image_files_below(folder, argument)], skip_bad_images)
    features = datasets.Features(
        {IMAGE_COLUMN: datasets.Image(), LABEL_COLUMN: datasets.ClassLabel(names=[UNLABELED_CLASS])}
    )
    return datasets.Dataset.from_dict({IMAGE_COLUMN: files, LABEL_COLUMN: [0] * len(files)}, features=features)


def load_hub_dataset(
    dataset_name: str,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
    validation_size: float = 0.1,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """Load a data set with `datasets.load_dataset` and bring it to the `image` / `label` layout.

    Works with Hub names (offline only when already cached) and with local folders of Parquet/CSV/JSON files.
    Integer or string labels are turned into a `ClassLabel` (integers keep their values, named "0" ... "max";
    strings are sorted), consistently across splits; a string image column is read as image paths.

    Args:
        dataset_name: Hub id (`"cifar10"`, `"ylecun/mnist"`) or local path accepted by `datasets.load_dataset`.
        dataset_config_name: the data set's configuration, if it has several.
        image_column: column holding the images; renamed to `image`.
        label_column: column holding the class labels; renamed to `label`.
        validation_size: fraction of the training split held out when the data set has no `validation` split.
        seed: seed of the held-out split.
        cache_dir: where `datasets` caches downloads and Arrow files.

    Returns:
        Splits `train`, `validation` (and `test` when the data set has one); other splits are dropped.
    """
    _check_fraction("validation_size", validation_size)
    loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"Expected `load_dataset({dataset_name!r})` to return splits, got {type(loaded).__name__}.")
    # Common spellings of the validation split on the Hub.
    for alias in ("valid", "val", "dev"):
        if "validation" not in loaded and alias in loaded:
            loaded["validation"] = loaded.pop(alias)
    if "train" not in loaded:
        raise ValueError(f"Data set {dataset_name!r} has no 'train' split; it has {list(loaded)}.")
    dropped = [split for split in loaded if split not in SPLITS]
    if dropped:
        logger.warning("Ignoring the splits %s of %r: only %s are used.", dropped, dataset_name, list(SPLITS))
    dataset = datasets.DatasetDict({split: loaded[split] for split in SPLITS if split in loaded})

    for split, split_dataset in dataset.items():
        for column in (image_column, label_column):
            if column not in split_dataset.column_names:
                raise ValueError(
                    f"Column {column!r} not found in split {split!r} of {dataset_name!r}; available columns: "
                    f"{split_dataset.column_names}. Pass `image_column` / `label_column`."
                )
        for column, target in ((image_column, IMAGE_COLUMN), (label_column, LABEL_COLUMN)):
            if column != target and target in split_dataset.column_names:
                raise ValueError(
                    f"Cannot rename {column!r} to {target!r} in split {split!r} of {dataset_name!r}: a column "
                    f"{target!r} already exists."
                )
    dataset = dataset.rename_columns(
        {
            column: target
            for column, target in ((image_column, IMAGE_COLUMN), (label_column, LABEL_COLUMN))
            if column != target
        }
    )
    image_feature = dataset["train"].features[IMAGE_COLUMN]
    if isinstance(image_feature, datasets.Value) and image_feature.dtype in ("string", "large_string"):
        dataset = dataset.cast_column(IMAGE_COLUMN, datasets.Image())
    dataset = encode_labels(dataset, LABEL_COLUMN)
    if "validation" not in dataset:
        dataset["train"], dataset["validation"] = _hold_out(dataset["train"], validation_size, seed, LABEL_COLUMN)
    return datasets.DatasetDict({split: dataset[split] for split in SPLITS if split in dataset})


def build_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | os.PathLike | None = None,
    validation_dir: str | os.PathLike | None = None,
    test_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str = "label",
    validation_size: float = 0.1,
    test_size: float = 0.2,
    seed: int = 42,
    cache_dir: str | os.PathLike | None = None,
    labeled: bool = True,
    skip_bad_images: bool = False,
) -> datasets.DatasetDict:
    """Pick the data source from the arguments, load it and validate it: the one entry point of the scripts.

    `dataset_name` loads a Hub or local data set (`load_hub_dataset`), `train_dir` loads image folders
    (`load_image_folder`), neither loads the bundled digits (`load_digits_dataset`). Arguments that the chosen
    source would ignore raise instead, so a typo on the command line cannot silently train on the wrong data.

    Args:
        dataset_name: Hub id or local path for `datasets.load_dataset`.
        dataset_config_name: configuration of `dataset_name`.
        train_dir: image folder with one sub-folder per class.
        validation_dir: validation image folder (only with `train_dir`).
        test_dir: test image folder (only with `train_dir`).
        image_column: image column of `dataset_name`.
        label_column: label column of `dataset_name`.
        validation_size: fraction held out for validation where the source has no validation split.
        test_size: fraction of the digits held out for testing (digits only).
        seed: seed of every split made here.
        cache_dir: `datasets` cache folder.
        labeled: `False` reads `train_dir` (and `validation_dir`) as unlabeled images in any layout
            (`load_unlabeled_image_folder`), for self-supervised pre-training; `test_dir` is then not used.
        skip_bad_images: image folders only: leave out undecodable files with a warning instead of refusing.

    Returns:
        A validated `DatasetDict` with splits `train`, `validation` and, where available, `test`, and the columns
        `image` (`datasets.Image`) and `label` (`datasets.ClassLabel`).
    """
    if dataset_name is not None and train_dir is not None:
        raise ValueError("Pass either `dataset_name` or `train_dir`, not both.")
    if train_dir is None and (validation_dir is not None or test_dir is not None):
        raise ValueError("`validation_dir` and `test_dir` need `train_dir`.")
    if dataset_name is None and (image_column != IMAGE_COLUMN or label_column != LABEL_COLUMN):
        raise ValueError(
            "`image_column` / `label_column` only apply to `dataset_name`; image folders and the digits always use "
            f"{IMAGE_COLUMN!r} and {LABEL_COLUMN!r}."
        )
    if dataset_name is None and dataset_config_name is not None:
        raise ValueError("`dataset_config_name` needs `dataset_name`.")

    if dataset_name is not None:
        dataset = load_hub_dataset(
            dataset_name,
            dataset_config_name,
            image_column=image_column,
            label_column=label_column,
            validation_size=validation_size,
            seed=seed,
            cache_dir=cache_dir,
        )
    elif train_dir is not None and not labeled:
        if test_dir is not None:
            raise ValueError("`test_dir` has no use without labels.")
        dataset = load_unlabeled_image_folder(
            train_dir, validation_dir, validation_size=validation_size, seed=seed, skip_bad_images=skip_bad_images
        )
    elif train_dir is not None:
        dataset = load_image_folder(
            train_dir,
            validation_dir,
            test_dir,
            validation_size=validation_size,
            seed=seed,
            cache_dir=cache_dir,
            skip_bad_images=skip_bad_images,
        )
    else:
        dataset = load_digits_dataset(seed=seed, validation_size=validation_size, test_size=test_size)
    validate_dataset(dataset)
    if "validation" not in dataset:
        raise ValueError(f"The data set has no 'validation' split; it has {list(dataset)}.")
    return dataset


# ---------------------------------------------------------------------------------------------------------------------
# Checks and label handling
# ---------------------------------------------------------------------------------------------------------------------


def validate_dataset(dataset: datasets.DatasetDict, image_column: str = "image", label_column: str = "label") -> None:
    """Raise a `ValueError` naming the problem when `dataset` cannot train an image classifier.

    Checking up front turns errors that would surface deep inside the first training step (a missing column, a
    label the classifier head has no row for) into one clear message. This only checks and never converts: turn
    integer or string labels into a `ClassLabel` with `encode_labels` first (the loaders here already do).

    Checks: a `train` split exists; no split is empty; both columns exist; the image column is a `datasets.Image`;
    the label column is a `datasets.ClassLabel` with the same names in every split; every label lies in
    [0, num_classes).
    """
    if not isinstance(dataset, datasets.DatasetDict):
        raise ValueError(f"Expected a `datasets.DatasetDict`, got {type(dataset).__name__}.")
    if "train" not in dataset:
        raise ValueError(f"The data set has no 'train' split; it has {list(dataset)}.")
    train_names = None
    for split, split_dataset in dataset.items():
        if len(split_dataset) == 0:
            raise ValueError(f"Split {split!r} is empty.")
        for column in (image_column, label_column):
            if column not in split_dataset.column_names:
                raise ValueError(
                    f"Column {column!r} not found in split {split!r}; available columns: {split_dataset.column_names}."
                )
        image_feature = split_dataset.features[image_column]
        if not isinstance(image_feature, datasets.Image):
            raise ValueError(
                f"Column {image_column!r} of split {split!r} must be a `datasets.Image`, got {image_feature!r}."
            )
        label_feature = split_dataset.features[label_column]
        if not isinstance(label_feature, datasets.ClassLabel):
            raise ValueError(
                f"Column {label_column!r} of split {split!r} must be a `datasets.ClassLabel`, got {label_feature!r}; "
                "convert it with `hf_vit_custom.data.encode_labels`."
            )
        if train_names is None:
            train_names = label_feature.names
        elif label_feature.names != train_names:
            raise ValueError(
                f"The class names of split {split!r} ({label_feature.names}) differ from the other splits' "
                f"({train_names})."
            )
        labels = _label_array(split_dataset, label_column)
        bad = labels[(labels < 0) | (labels >= label_feature.num_classes)]
        if bad.size:
            raise ValueError(
                f"Split {split!r} has {bad.size} labels outside [0, {label_feature.num_classes}), e.g. "
                f"{sorted(set(bad.tolist()))[:5]}"
                + (" (-1 marks an unlabelled example)." if (bad == -1).any() else ".")
            )


def encode_labels(dataset: datasets.DatasetDict, label_column: str = "label") -> datasets.DatasetDict:
    """Turn an integer or string label column into a `ClassLabel` with one shared mapping for all splits.

    `DatasetDict.class_encode_column` encodes each split on its own (a split lacking a class gets shifted ids) and
    sorts integers as strings ("10" before "2"); this keeps integer labels as they are (names "0" ... "max") and
    sorts string labels once over all splits. A column that already is a `ClassLabel` is left alone.
    """
    features = [split_dataset.features[label_column] for split_dataset in dataset.values()]
    if all(isinstance(feature, datasets.ClassLabel) for feature in features):
        return dataset
    if not all(isinstance(feature, datasets.Value) for feature in features):
        raise ValueError(f"Cannot turn label column {label_column!r} with features {features} into class labels.")
    dtypes = {feature.dtype for feature in features}
    if all(dtype.startswith(("int", "uint")) for dtype in dtypes):
        values = np.concatenate([_label_array(split_dataset, label_column) for split_dataset in dataset.values()])
        if values.min() < 0:
            raise ValueError(
                f"Label column {label_column!r} has negative labels ({values.min()}); class ids must be >= 0 "
                "(-1 usually marks unlabelled examples, which cannot be trained on)."
            )
        class_label = datasets.ClassLabel(names=[str(index) for index in range(int(values.max()) + 1)])
        return dataset.cast_column(label_column, class_label)
    if dtypes <= {"string", "large_string"}:
        names = sorted({name for split_dataset in dataset.values() for name in split_dataset.unique(label_column)})
        class_label = datasets.ClassLabel(names=names)
        label2id = {name: index for index, name in enumerate(names)}
        encoded = dataset.map(
            lambda batch: {label_column: [label2id[name] for name in batch[label_column]]},
            batched=True,
            desc="Encoding labels",
        )
        return encoded.cast_column(label_column, class_label)
    raise ValueError(f"Label column {label_column!r} must hold integers or strings, got dtypes {sorted(dtypes)}.")


def label_maps(
    dataset: datasets.DatasetDict | datasets.Dataset, label_column: str = "label"
) -> tuple[dict[int, str], dict[str, int]]:
    """Return `(id2label, label2id)` from the `ClassLabel` feature, for the model config.

    Storing the names in the config makes predictions readable (`pipeline` shows "cat", not "LABEL_3").
    """
    split_dataset = dataset["train"] if isinstance(dataset, datasets.DatasetDict) else dataset
    feature = split_dataset.features.get(label_column)
    if not isinstance(feature, datasets.ClassLabel):
        raise ValueError(
            f"Column {label_column!r} must be a `datasets.ClassLabel` to name the classes, got {feature!r}."
        )
    id2label = dict(enumerate(feature.names))
    return id2label, {name: index for index, name in id2label.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Transform and collation
# ---------------------------------------------------------------------------------------------------------------------


def default_image_processor(image_size: int | Sequence[int] = 224, num_channels: int = 3) -> ViTImageProcessorPil:
    """Create the ViT image processor used with `ViTCustomConfig`: resize to `image_size`, scale to [-1, 1].

    The PIL backend needs no torchvision. Mean and std 0.5 per channel match the ViT paper's checkpoints and work
    for any channel count; `do_convert_rgb=False` keeps single-channel images single-channel.
    """
    if num_channels not in (1, 3):
        raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
    height, width = to_pair(image_size if isinstance(image_size, int) else tuple(image_size))
    return ViTImageProcessorPil(
        size={"height": height, "width": width},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
        do_convert_rgb=False,
    )


# 16-bit integer modes: PIL's own conversion to 8 bits clips instead of rescaling, which turns the image white.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def convert_image(image: Image.Image, mode: str) -> Image.Image:
    """Convert `image` to "L" or "RGB" the way a person would read it, or raise a `ValueError` naming the problem.

    16-bit images are rescaled to 8 bits (PIL would clip them); transparent images are laid on white, as
    transformers' `convert_to_rgb` does, rather than keeping whatever colour hides under the transparent pixels.
    """
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Image of size {image.width}x{image.height} has no pixels.")
    if image.mode == "F":
        raise ValueError("Floating-point ('F' mode) images have no defined pixel range; convert them to 8 bits first.")
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == mode else image.convert(mode)


def open_image(image: Any) -> Image.Image:
    """A PIL image, or the encoded image of a `datasets.Image(decode=False)` column (`{"bytes", "path"}`) opened
    lazily: PIL reads the header (size, format) and decodes on first use."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and (image.get("bytes") is not None or image.get("path")):
        return Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"])
    raise ValueError(f"Expected a PIL image or an encoded image ({{'bytes', 'path'}}), got {type(image).__name__}.")


def _decode_for_crop(
    image: Image.Image, box: tuple[float, float, float, float], output_size: tuple[int, int]
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """Ask a not yet decoded JPEG for the smallest scale (1/2, 1/4, 1/8) at which `box` still covers at least
    `output_size` pixels; return the image and `box` in its new coordinates. Anything else is returned as it is."""
    reduction = min((box[2] - box[0]) / output_size[1], (box[3] - box[1]) / output_size[0])
    if image.format != "JPEG" or reduction < 2:  # (`draft` does nothing to an image already decoded)
        return image, box
    full_width, full_height = image.size
    image.draft(None, (math.ceil(full_width / reduction), math.ceil(full_height / reduction)))
    scale_x, scale_y = image.size[0] / full_width, image.size[1] / full_height
    return image, (box[0] * scale_x, box[1] * scale_y, box[2] * scale_x, box[3] * scale_y)


class ImageClassificationTransform:
    """Batch transform for `Dataset.with_transform`: PIL images and labels in, `pixel_values` and `labels` out.

    Training applies a random resized crop (as in torchvision's `RandomResizedCrop`) and, only when asked, a
    horizontal flip; evaluation applies neither. The augmentation is written with PIL so that torchvision is not
    needed; resizing and normalising are left to the image processor, so that inference with the saved processor
    sees exactly the same preprocessing.

    Randomness: the augmentation draws from the generator of each image's `example_seeds` when given (the training
    loops' path, see `PerExampleSeededDataset`), otherwise from torch's global generator, which `set_seed` seeds and
    `DataLoader` reseeds differently in every worker.

    Args:
        image_processor: a transformers image processor with `size={"height", "width"}` (e.g. `ViTImageProcessorPil`),
            or one that resizes the short side and centre-crops to `crop_size={"height", "width"}` (CLIP's).
        num_channels: 1 converts every image to grayscale ("L"), 3 to "RGB".
        train: apply the random augmentation.
        crop_scale: range of the crop's area as a fraction of the image; `None` disables the random crop.
        crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        horizontal_flip: flip half of the images left-right; leave off for digits and text, whose meaning flips.
        trivial_augment: after the crop and flip, apply TrivialAugment (`recipes.TrivialAugmentWide`).
        image_column: input column with the images.
        label_column: input column with the labels.
    """

    def __init__(
        self,
        image_processor: Any,
        num_channels: int = 3,
        train: bool = False,
        crop_scale: tuple[float, float] | None = (0.8, 1.0),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        horizontal_flip: bool = False,
        image_column: str = "image",
        label_column: str = "label",
        trivial_augment: bool = False,
    ):
        if num_channels not in (1, 3):
            raise ValueError(f"`num_channels` must be 1 (grayscale) or 3 (RGB), got {num_channels!r}.")
        mean = image_processor.image_mean
        if not isinstance(mean, (int, float)) and len(mean) != num_channels:
            raise ValueError(
                f"The image processor normalises {len(mean)} channels (image_mean={list(mean)}) but "
                f"`num_channels` is {num_channels}."
            )
        # The model's input size: the centre crop of a processor that crops (CLIP's, DINOv2's, a converted timm
        # model's: resize the short side, then crop), else the processor's resize target.
        self.crops = bool(
            getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None)
        )
        size = image_processor.crop_size if self.crops else image_processor.size
        height, width = size.get("height"), size.get("width")
        if not height or not width:
            raise ValueError(
                "The image processor needs `size` (or, when it centre-crops, `crop_size`) with 'height' and 'width', "
                f"got {size!r}."
            )
        if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"`crop_scale` must satisfy 0 < low <= high <= 1, got {crop_scale!r}.")
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"`crop_ratio` must satisfy 0 < low <= high, got {crop_ratio!r}.")
        self.image_processor = image_processor
        self.num_channels = num_channels
        self.mode = "L" if num_channels == 1 else "RGB"
        self.train = train
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.horizontal_flip = horizontal_flip
        self.trivial_augment = TrivialAugmentWide() if trivial_augment else None
        self.image_column = image_column
        self.label_column = label_column
        self.output_size = (int(height), int(width))

    def __call__(self, batch: dict[str, list], example_seeds: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Transform a batch `{image: [PIL, ...], label: [int, ...]}` into tensors.

        `example_seeds` (one per image) seed each image's augmentation on its own, leaving the global generator as it
        was; see `PerExampleSeededDataset`.

        Returns:
            `pixel_values` float32 (batch, num_channels, height, width) and `labels` int64 (batch,).
        """
        pixel_values = self.pixel_values(batch[self.image_column], example_seeds)
        return {"pixel_values": pixel_values, "labels": torch.as_tensor(batch[self.label_column], dtype=torch.long)}

    def pixel_values(self, images: Sequence[Any], example_seeds: list[int] | None = None) -> torch.Tensor:
        """Images alone (no labels) as float32 (batch, num_channels, height, width): converted, augmented when
        training, resized and normalised by the processor.

        `images` are PIL images or, from a column cast to `datasets.Image(decode=False)`, their encoded bytes; the
        training path then decodes each JPEG at the smallest scale its random crop allows (`augment`).
        """
        images = [open_image(image) for image in images]
        if self.train and example_seeds is None:
            images = [self.augment(image) for image in images]
        elif self.train:
            generator = torch.Generator()  # reseeded per image: cheaper than seeding the global generator
            seeded = zip(images, example_seeds, strict=True)
            images = [self.augment(image, generator.manual_seed(seed)) for image, seed in seeded]
        else:
            images = [convert_image(image, self.mode) for image in images]
        if self.train and self.crop_scale is not None and self.crops:
            # The random crop already has the model's size: a cropping processor's own resize and crop would zoom in.
            return self.image_processor(images, do_resize=False, do_center_crop=False, return_tensors="pt")[
                "pixel_values"
            ]
        return self.image_processor(images, return_tensors="pt")["pixel_values"]

    def augment(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """Convert, randomly crop-and-resize to the processor size, then maybe flip and TrivialAugment (training only).

        The crop is drawn from the image's size alone, before decoding, so that a JPEG is decoded at 1/2, 1/4 or 1/8
        of its size (PIL's `draft`, a scaled inverse DCT) whenever the crop keeps at least the output's pixels then:
        most random resized crops shrink the image, and the full-size decode is most of their cost. Draws from
        `generator` when given, otherwise from torch's global generator.
        """
        if self.crop_scale is not None:
            top, left, height, width = self._crop_box(image.width, image.height, generator)
            box = (left, top, left + width, top + height)
            image, box = _decode_for_crop(image, box, self.output_size)
            # One resampling step for crop and resize; the processor's own resize is then the identity.
            image = convert_image(image, self.mode).resize(
                (self.output_size[1], self.output_size[0]), resample=Image.Resampling.BILINEAR, box=box
            )
        else:
            image = convert_image(image, self.mode)
        if self.horizontal_flip and self._uniform(generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.trivial_augment is not None:
            image = self.trivial_augment(image, generator)
        return image

    def _crop_box(
        self, image_width: int, image_height: int, generator: torch.Generator | None
    ) -> tuple[int, int, int, int]:
        """Sample `(top, left, height, width)` as torchvision's `RandomResizedCrop.get_params` does."""
        area = image_width * image_height
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            scale = self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * self._uniform(generator)
            target_area = area * scale
            aspect_ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * self._uniform(generator))
            width = round(math.sqrt(target_area * aspect_ratio))
            height = round(math.sqrt(target_area / aspect_ratio))
            if 0 < width <= image_width and 0 < height <= image_height:
                top = self._randint(image_height - height + 1, generator)
                left = self._randint(image_width - width + 1, generator)
                return top, left, height, width
        # Fallback after 10 misses (extreme aspect ratios): the largest central crop within the ratio range.
        in_ratio = image_width / image_height
        if in_ratio < self.crop_ratio[0]:
            width, height = image_width, round(image_width / self.crop_ratio[0])
        elif in_ratio > self.crop_ratio[1]:
            height, width = image_height, round(image_height * self.crop_ratio[1])
        else:
            width, height = image_width, image_height
        return (image_height - height) // 2, (image_width - width) // 2, height, width

    @staticmethod
    def _uniform(generator: torch.Generator | None) -> float:
        return torch.rand((), generator=generator).item()

    @staticmethod
    def _randint(high: int, generator: torch.Generator | None) -> int:
        return int(torch.randint(high, (), generator=generator).item())


class PerExampleSeededDataset(torch.utils.data.Dataset):
    """A training split whose random augmentation depends only on (seed, epoch, example index).

    Without `example_seeds`, `ImageClassificationTransform` draws from torch's global generator, so a crop depends on
    everything drawn before it. That breaks exact resumption: the data loader fetches one batch ahead, so the
    generator state a checkpoint stores after step N already includes batch N+1's crops, and the resumed run draws
    batch N+1 again from there. Here every example's crop comes from a generator seeded with (seed, epoch, index):
    the crops are the same whatever the process count, the number of workers, the prefetching or the resumption, and
    the global generator is left to the model (dropout, stochastic depth).

    A `batch_mixer` (`recipes.MixupCutmix`) mixes each batch the data loader fetches, with a generator seeded from
    (seed, epoch, the batch's indices): the same batch is mixed alike in a resumed run. Its examples then carry
    `soft_labels` beside their `labels`.

    Args:
        dataset: the raw split, with PIL images (no transform attached).
        transform: the training transform (`ImageClassificationTransform(train=True)`).
        seed: the run's seed.
        batch_mixer: mixes a batch's `pixel_values` and makes its soft labels, or None.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        transform: ImageClassificationTransform,
        seed: int,
        batch_mixer: Callable[[torch.Tensor, torch.Tensor, np.random.Generator], tuple] | None = None,
    ):
        # The transform decodes the images itself, at the scale each crop needs.
        self.dataset = dataset.cast_column(transform.image_column, datasets.Image(decode=False))
        self.transform = transform
        self.seed = seed
        self.batch_mixer = batch_mixer
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the crops of `epoch` (call before iterating; workers copy the dataset when the epoch starts)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        indices = [int(index) for index in indices]
        # One image-processor call for the whole batch; only the augmentation is seeded example by example.
        transformed = self.transform(self.dataset[indices], example_seeds=[self.example_seed(i) for i in indices])
        if self.batch_mixer is not None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, *indices]))
            transformed["pixel_values"], transformed[SOFT_LABELS] = self.batch_mixer(
                transformed["pixel_values"], transformed["labels"], rng
            )
        return [{name: value[position] for name, value in transformed.items()} for position in range(len(indices))]

    def example_seed(self, index: int) -> int:
        return seed_from(self.seed, self.epoch, index)


def seed_from(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's `SeedSequence` hashes them all): a generator seeded with it
    draws alike whenever the same keys come again, e.g. in a resumed run."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0]) & (2**63 - 1)


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch, for `DataLoader(collate_fn=...)` and `Trainer(data_collator=...)`.

    Returns:
        `pixel_values` (batch, channels, height, width) and `labels` int64 (batch,), and `soft_labels` (batch,
        num_labels) when the examples carry them (Mixup / CutMix).
    """
    batch = {
        "pixel_values": torch.stack([torch.as_tensor(example["pixel_values"]) for example in examples]),
        "labels": torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long),
    }
    if SOFT_LABELS in examples[0]:
        batch[SOFT_LABELS] = torch.stack([example[SOFT_LABELS] for example in examples])
    return batch


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"`{name}` must lie strictly between 0 and 1, got {value!r}.")


def _label_array(split_dataset: datasets.Dataset, label_column: str) -> np.ndarray:
    # Reads only the label column (no image decoding) and honours any indices mapping left by select/split.
    table = split_dataset.with_format("arrow", columns=[label_column])[:]
    return table.column(label_column).to_numpy(zero_copy_only=False).astype(np.int64)


def _image_files_below(folder: str | os.PathLike, argument: str, layout_hint: str = "") -> list[Path]:
    """The image files at any depth below `folder`, sorted, or a clear error naming `argument`."""
    root = Path(folder)
    if not root.exists():
        raise ValueError(f"`{argument}` {str(folder)!r} does not exist.")
    if not root.is_dir():
        raise ValueError(f"`{argument}` {str(folder)!r} is not a folder.")
    images = sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(
            f"`{argument}` {str(folder)!r} contains no images (extensions {sorted(IMAGE_EXTENSIONS)}){layout_hint}."
        )
    return images


def _scan_image_folder(folder: str | os.PathLike, argument: str) -> tuple[list[str], list[str]]:
    """Return the image files of `folder/<class>/<image>` and the sorted class names, or raise a clear error."""
    root = Path(folder)
    images = _image_files_below(folder, argument, "; expected one sub-folder per class with the images inside")
    loose = [path for path in images if path.parent == root]
    if loose:
        raise ValueError(
            f"`{argument}` {str(folder)!r} has {len(loose)} images directly inside it (e.g. {loose[0].name!r}), "
            "which have no class; put every image in a sub-folder named after its class."
        )
    nested = [path for path in images if path.parent.parent != root]
    if nested:
        raise ValueError(
            f"`{argument}` {str(folder)!r} has images nested below the class sub-folders (e.g. "
            f"{str(nested[0].relative_to(root))!r}); expected exactly `{argument}/<class>/<image>`."
        )
    class_names = sorted({path.parent.name for path in images})
    if len(class_names) < 2:
        raise ValueError(
            f"`{argument}` {str(folder)!r} has only the class sub-folder {class_names}; classification needs at "
            "least two classes."
        )
    return [str(path) for path in images], class_names


def check_image_files(files: list[str], skip_bad_images: bool = False) -> list[str]:
    """Decode every file completely, so that a non-image, a truncated file or a decompression bomb (more pixels than
    `PIL.Image.MAX_IMAGE_PIXELS`) is named before training starts rather than inside it, without its name.

    Returns the files that decode; a bad one raises a `ValueError` naming it, or with `skip_bad_images` is left out
    with a warning naming it. Decoding costs a few milliseconds per photo, once per run.
    """
    readable = []
    for file in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL only warns up to 2x the limit
                with Image.open(file) as image:
                    image.load()
        except Exception as error:  # PIL raises many types for bad files: all mean the same here
            problem = f"Cannot read image {file!r}: {error}"
            if not skip_bad_images:
                raise ValueError(f"{problem}. Remove or replace the file, or pass `--skip_bad_images`.") from error
            logger.warning("%s; skipping it (--skip_bad_images).", problem)
            continue
        readable.append(file)
    if not readable:
        raise ValueError(f"None of the {len(files)} image files decodes (e.g. {files[0]!r}).")
    return readable


def _load_image_files(
    files: list[str], cache_dir: str | os.PathLike | None, skip_bad_images: bool = False
) -> datasets.Dataset:
    # An explicit file list rather than `data_dir`: with `data_dir`, `datasets` infers splits from path names, so a
    # class folder or file named like "test_1.png" silently becomes a separate split and the rest is dropped.
    # `drop_labels=False` keeps the labels that `imagefolder` would otherwise only infer heuristically.
    files = check_image_files(files, skip_bad_images)
    loaded = datasets.load_dataset(
        "imagefolder",
        data_files={"train": files},
        drop_labels=False,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )
    return loaded["train"]


def _hold_out(
    train: datasets.Dataset, validation_size: float, seed: int, label_column: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Split `train` into (train, validation), stratified by class whenever every class can be represented."""
    try:
        split = train.train_test_split(test_size=validation_size, seed=seed, stratify_by_column=label_column)
    except ValueError as error:
        # Stratification needs >= 2 images per class and a held-out set with room for every class.
        logger.warning("Holding out the validation split without stratification: %s", error)
        split = train.train_test_split(test_size=validation_size, seed=seed)
    if len(split["train"]) == 0 or len(split["test"]) == 0:
        raise ValueError(
            f"Holding out `validation_size`={validation_size} of {len(train)} training images leaves an empty split."
        )
    return split["train"], split["test"]


__all__ = [
    "ImageClassificationTransform",
    "PerExampleSeededDataset",
    "build_datasets",
    "collate_fn",
    "convert_image",
    "default_image_processor",
    "encode_labels",
    "label_maps",
    "load_digits_dataset",
    "load_hub_dataset",
    "load_image_folder",
    "load_unlabeled_image_folder",
    "validate_dataset",
]
