"""Attention maps people can look at: attention rollout and per-head attention, drawn over the image.

Attention rollout (Abnar & Zuidema, 2020, arXiv 2005.00928) follows the information from the input patches to the
pooled representation through every layer: each layer's attention, with the residual connection counted as attention
to the token itself, multiplied from the first layer to the last. The last layer's attention, head by head, shows
what each head reads just before the classifier. Both are taken from the class token's row, or, for mean-pooled
models, from the patch tokens' rows (`pooled_rows`).

Works with any attention backend: the model's attention falls back to the eager path whenever weights are requested.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    BaseImageProcessor,
    PreTrainedModel,
)

from .configuration_vit_custom import to_pair
from .data import ImageClassificationTransform, default_image_processor
from .modeling_vit_custom import pool

logger = logging.getLogger(__name__)

# How `attention_rollout` merges the heads of a layer into one token-to-token matrix.
HEAD_FUSIONS = {"mean": torch.mean, "max": torch.amax, "min": torch.amin}
# Figures are drawn at a fixed size so that their pixel size is known: inches times FIGURE_DPI.
FIGURE_DPI = 100
FIGURE_PANEL_INCHES = 2.0  # one image or overlay of `save_attention_figure`
FIGURE_TITLE_INCHES = 0.4
GRID_PANEL_INCHES = 1.5  # one image or overlay of `save_attention_grid`
GRID_TITLE_INCHES = 0.4
OVERLAY_ALPHA = 0.5


@dataclass
class AttentionMaps:
    """What `compute_attention_maps` returns, on the CPU; every map is upsampled to the input's height and width.

    The maps are the class token's attention to the patches, or for models that pool otherwise the mean attention
    of the patch tokens (see `pooled_rows`).

    Attributes:
        rollout: (batch, height, width) attention rollout over the patches.
        heads: (batch, heads, height, width) last layer's attention to the patches, one map per head.
        logits: (batch, num_labels) of a classifier; `None` for a bare encoder.
        predictions: (batch,) class indices (`logits.argmax(-1)`); `None` for a bare encoder.
    """

    rollout: torch.Tensor
    heads: torch.Tensor
    logits: torch.Tensor | None
    predictions: torch.Tensor | None


def attention_rollout(
    attentions: Sequence[torch.Tensor], discard_ratio: float = 0.0, head_fusion: str = "mean"
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token draws on each input token, over all layers.

    Per layer the heads are fused, the identity is added (the residual connection passes each token on unchanged,
    which is attention to itself) and the rows are renormalised; the layers are then multiplied in order,
    `A_L @ ... @ A_1`. Every row of the result sums to 1.

    Args:
        attentions: one (batch, heads, tokens, tokens) tensor per layer, first layer first, as the model returns
            with `output_attentions=True`.
        discard_ratio: share of each fused row's weakest weights set to zero before the identity is added, to
            suppress the low-level noise that otherwise blurs the map (Gildenblat's `vit-explain`); 0 keeps all.
        head_fusion: how the heads of a layer are merged: "mean", "max" or "min".

    Returns:
        (batch, tokens, tokens) float32; row `i` is how token `i` of the last layer mixes the input tokens.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"`head_fusion` must be one of {list(HEAD_FUSIONS)}, got {head_fusion!r}.")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"`discard_ratio` must lie in [0, 1), got {discard_ratio!r}.")
    if not attentions:
        raise ValueError("`attentions` is empty; run the model with `output_attentions=True`.")
    batch_size, _, num_tokens, _ = attentions[0].shape
    identity = torch.eye(num_tokens, device=attentions[0].device)
    rollout = identity.expand(batch_size, num_tokens, num_tokens)
    num_discarded = int(num_tokens * discard_ratio)
    for layer_attention in attentions:
        fused = HEAD_FUSIONS[head_fusion](layer_attention.float(), dim=1)  # (batch, tokens, tokens)
        if num_discarded:
            weakest = fused.topk(num_discarded, dim=-1, largest=False).indices
            fused = fused.scatter(-1, weakest, 0.0)
        # Max and min fusion and the discarding leave rows that no longer sum to 1; the identity keeps every row
        # positive, so the renormalisation is always defined.
        mixed = fused + identity
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed @ rollout
    return rollout


def class_token_attention(attentions: Sequence[torch.Tensor], num_prefix_tokens: int = 1) -> torch.Tensor:
    """The last layer's attention from the class token (index 0) to the patch tokens, head by head.

    Returns:
        (batch, heads, grid_height * grid_width), patches in row-major order as the patch embedding flattens them.
    """
    return pooled_rows(attentions[-1], pooling="cls", num_prefix_tokens=num_prefix_tokens)


def pooled_rows(attention: torch.Tensor, pooling: str = "cls", num_prefix_tokens: int = 1) -> torch.Tensor:
    """The rows of a token-to-token matrix that the pooled representation is made of, over the patch columns.

    The rows are pooled as the model pools its tokens (`modeling_vit_custom.pool`): with `pooling="cls"` the class
    token's row; with `"cls_mean"` the mean of that row and the patch rows' mean, as the representation concatenates
    both. Otherwise (`"mean"`, and `"map"` / `"none"`, whose learned query or absent pooling is not part of the
    encoder's attention) the classifier never reads the class token, so its row (or a register's, without one) would
    show attention that does not reach the prediction, and the mean of the patch rows is taken instead.

    Args:
        attention: (..., tokens, tokens), e.g. a rollout (batch, tokens, tokens) or one layer (batch, heads, ...).
        pooling: `config.pooling`.
        num_prefix_tokens: `config.num_prefix_tokens`, the tokens in front of the patches.

    Returns:
        (..., tokens - num_prefix_tokens), one weight per patch.
    """
    if pooling == "cls_mean":
        rows = (pool(attention, "cls", num_prefix_tokens) + pool(attention, "mean", num_prefix_tokens)) / 2
    else:
        rows = pool(attention, "cls" if pooling == "cls" else "mean", num_prefix_tokens)
    return rows[..., num_prefix_tokens:]


def patch_map_to_image(
    patch_map: torch.Tensor, image_size: tuple[int, int], patch_size: int | Sequence[int]
) -> torch.Tensor:
    """Lay a per-patch map out on the patch grid and upsample it bilinearly to the image's height and width.

    The grid is `image_size // patch_size` along each side, as the patch embedding cuts it, so non-square inputs and
    inputs at another resolution than the configured one (`interpolate_pos_encoding=True`) work alike.

    Args:
        patch_map: (..., grid_height * grid_width), e.g. (batch, patches) or (batch, heads, patches).
        image_size: (height, width) of the model input.
        patch_size: `config.patch_size`, an int or (height, width).

    Returns:
        (..., height, width) float32.
    """
    height, width = image_size
    patch_height, patch_width = to_pair(patch_size)
    grid_size = (height // patch_height, width // patch_width)
    if patch_map.shape[-1] != grid_size[0] * grid_size[1]:
        raise ValueError(
            f"A {height}x{width} input cut into {patch_height}x{patch_width} patches has a {grid_size[0]}x"
            f"{grid_size[1]} grid, but the map has {patch_map.shape[-1]} patches."
        )
    leading_shape = patch_map.shape[:-1]
    grid_map = patch_map.float().reshape(-1, 1, *grid_size)  # (maps, 1, grid_height, grid_width)
    image_map = torch.nn.functional.interpolate(grid_map, size=(height, width), mode="bilinear", align_corners=False)
    return image_map.reshape(*leading_shape, height, width)


def compute_attention_maps(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    interpolate_pos_encoding: bool | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> AttentionMaps:
    """Run `model` once with `output_attentions=True` and turn its attention into image-sized maps.

    The model runs in eval mode (dropout would perturb the attention) and is put back in its previous mode after.

    Args:
        model: a `ViTCustomModel`, `ViTCustomForImageClassification`, or any model with `config.patch_size` whose
            output carries `attentions` (and `logits` for a classifier).
        pixel_values: (batch, channels, height, width) from the image processor; moved to the model's device.
        interpolate_pos_encoding: passed to the model; `None` uses `config.interpolate_pos_encoding`.
        head_fusion, discard_ratio: see [`attention_rollout`].
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs = model(
                pixel_values.to(model.device), interpolate_pos_encoding=interpolate_pos_encoding, output_attentions=True
            )
    finally:
        model.train(was_training)
    attentions = [layer_attention.cpu() for layer_attention in outputs.attentions]
    image_size = tuple(pixel_values.shape[-2:])
    # transformers' own ViT has neither field: it pools its one class token.
    pooling = getattr(model.config, "pooling", "cls")
    num_prefix_tokens = getattr(model.config, "num_prefix_tokens", 1)
    rollout = attention_rollout(attentions, discard_ratio=discard_ratio, head_fusion=head_fusion)
    last_layer = attentions[-1].float()  # (batch, heads, tokens, tokens)
    logits = getattr(outputs, "logits", None)
    logits = None if logits is None else logits.float().cpu()
    return AttentionMaps(
        rollout=patch_map_to_image(
            pooled_rows(rollout, pooling, num_prefix_tokens), image_size, model.config.patch_size
        ),
        heads=patch_map_to_image(
            pooled_rows(last_layer, pooling, num_prefix_tokens), image_size, model.config.patch_size
        ),
        logits=logits,
        predictions=None if logits is None else logits.argmax(dim=-1),
    )


def images_to_pixel_values(
    images: Sequence[Image.Image], image_processor: BaseImageProcessor, num_channels: int
) -> torch.Tensor:
    """PIL images as (batch, channels, height, width) model input, prepared exactly as evaluation prepares them."""
    return ImageClassificationTransform(image_processor, num_channels=num_channels).pixel_values(images)


def processor_at_native_size(
    image_processor: BaseImageProcessor, image: Image.Image, patch_size: int | Sequence[int]
) -> BaseImageProcessor:
    """A copy of `image_processor` that keeps `image` at its own size, rounded to whole patches.

    For `interpolate_pos_encoding=True`, where the point is to look at the image at its own resolution.
    """
    patch_height, patch_width = to_pair(patch_size)
    native_processor = copy.deepcopy(image_processor)
    native_processor.size = {
        "height": max(patch_height, round(image.height / patch_height) * patch_height),
        "width": max(patch_width, round(image.width / patch_width) * patch_width),
    }
    native_processor.do_center_crop = False  # a cropping processor (CLIP's, DINOv2's) would cut the image down again
    return native_processor


def save_attention_figure(
    image: Image.Image, maps: AttentionMaps, path: str | os.PathLike, title: str | None = None, index: int = 0
) -> None:
    """Save one PNG: the image, the rollout over it, and each head's last-layer attention over it.

    The PNG is `(2 + heads) * 200` pixels wide and 240 high (panels of 2 x 2 inches plus a 0.4 inch title band,
    at 100 dpi).

    Args:
        image: the image the maps were computed from, at any size (it is stretched onto the maps' frame).
        maps: from `compute_attention_maps`.
        path: where the PNG goes.
        title: shown above the panels.
        index: which image of the batch in `maps` to draw.
    """
    plt = _pyplot()
    num_heads = maps.heads.shape[1]
    num_panels = 2 + num_heads
    figure, axes = plt.subplots(
        1,
        num_panels,
        figsize=(num_panels * FIGURE_PANEL_INCHES, FIGURE_PANEL_INCHES + FIGURE_TITLE_INCHES),
        squeeze=False,
    )
    axes = axes[0]
    _draw(axes[0], image, None, "image")
    _draw(axes[1], image, maps.rollout[index], "rollout")
    for head in range(num_heads):
        _draw(axes[2 + head], image, maps.heads[index, head], f"head {head + 1}")
    if title:
        figure.suptitle(title)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.8, wspace=0.05)
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def save_attention_grid(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    images: Sequence[Image.Image],
    true_labels: Sequence[int],
    path: str | os.PathLike,
    max_images: int = 8,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> None:
    """Save one PNG with up to `max_images` images over their rollout maps, titled "pred X / true Y".

    Meant for the end of training, on a few raw test images. The PNG is `n * 150` pixels wide and 340 high for `n`
    images (a column of two 1.5 inch panels plus a 0.4 inch title band each, at 100 dpi). Titles of wrong
    predictions are red.

    Args:
        model: a classifier (`config.id2label` names the classes).
        image_processor: the model's processor; the images are prepared as for evaluation.
        images: PIL images, any mode (converted to the model's channels).
        true_labels: class indices of `images`, in `config.id2label`'s numbering.
        path: where the PNG goes.
        max_images: draw only the first `max_images` images.
        head_fusion, discard_ratio: see [`attention_rollout`].
    """
    images = list(images)[:max_images]
    true_labels = list(true_labels)[: len(images)]
    pixel_values = images_to_pixel_values(images, image_processor, model.config.num_channels)
    maps = compute_attention_maps(model, pixel_values, head_fusion=head_fusion, discard_ratio=discard_ratio)
    id2label = model.config.id2label

    plt = _pyplot()
    figure, axes = plt.subplots(
        2,
        len(images),
        figsize=(len(images) * GRID_PANEL_INCHES, 2 * GRID_PANEL_INCHES + GRID_TITLE_INCHES),
        squeeze=False,
    )
    for column, (image, true_label) in enumerate(zip(images, true_labels, strict=True)):
        predicted = int(maps.predictions[column])
        title = f"pred {id2label.get(predicted, predicted)} / true {id2label.get(true_label, true_label)}"
        _draw(axes[0, column], image, None, None)
        axes[0, column].set_title(title, fontsize=9, color="black" if predicted == true_label else "red")
        _draw(axes[1, column], image, maps.rollout[column], None)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.05, hspace=0.05)
    figure.savefig(path, dpi=FIGURE_DPI)
    plt.close(figure)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file completely, so that a missing or unreadable file fails here, naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"Image {str(path)!r} does not exist.") from None
    except OSError as error:  # PIL's UnidentifiedImageError, truncated files, folders
        raise OSError(f"Cannot read image {str(path)!r}: {error}") from error
    return image


def load_saved_model(model_name_or_path: str | os.PathLike) -> PreTrainedModel:
    """Load a saved model as what it was saved as (classifier or bare encoder).

    Loading an encoder checkpoint as a classifier would bolt on a random head and show meaningless predictions, so
    the Auto class follows the checkpoint's `architectures`. A path that does not exist gets an `OSError` saying so.
    """
    source = str(model_name_or_path)
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:  # the Hub client's words, about what was likely meant as a path
        if os.path.exists(source):
            raise
        reason = str(error).strip().splitlines()[0]
        raise OSError(
            f"No model folder at {source!r}: the path does not exist (nor could the Hub give a model of that name: "
            f"{reason})"
        ) from error
    is_classifier = any(name.endswith("ForImageClassification") for name in config.architectures or [])
    auto_class = AutoModelForImageClassification if is_classifier else AutoModel
    return auto_class.from_pretrained(model_name_or_path)


def load_model_and_processor(model_name_or_path: str | os.PathLike) -> tuple[PreTrainedModel, BaseImageProcessor]:
    """`load_saved_model` and the folder's image processor; a folder without one gets the default for the model's
    size."""
    model = load_saved_model(model_name_or_path)
    config = model.config
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_name_or_path)
    except OSError:
        logger.warning("No image processor in %s: using defaults for the model's size.", model_name_or_path)
        image_processor = default_image_processor(to_pair(config.image_size), config.num_channels)
    return model, image_processor


def save_attention_figures(
    model: PreTrainedModel,
    image_processor: BaseImageProcessor,
    images: Mapping[str, Image.Image],
    output_dir: str | os.PathLike,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    interpolate_pos_encoding: bool = False,
) -> list[Path]:
    """Save one `save_attention_figure` PNG per image into `output_dir`; return their paths.

    Args:
        images: image file path -> image (see `open_image`); each PNG is named after its image file,
            `<stem>_attention.png` (`<stem>_attention_2.png`, ... for repeated stems).
        interpolate_pos_encoding: look at each image at its own size (rounded to whole patches) with resampled
            position embeddings, instead of resizing it to the processor's size.
        head_fusion, discard_ratio: see [`attention_rollout`].
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    id2label = model.config.id2label
    written: list[Path] = []
    for image_path, image in images.items():
        processor = image_processor
        if interpolate_pos_encoding:
            processor = processor_at_native_size(image_processor, image, model.config.patch_size)
        pixel_values = images_to_pixel_values([image], processor, model.config.num_channels)
        maps = compute_attention_maps(
            model,
            pixel_values,
            # Without the flag the images have the processor's size: leave the choice to the model's config.
            interpolate_pos_encoding=True if interpolate_pos_encoding else None,
            head_fusion=head_fusion,
            discard_ratio=discard_ratio,
        )
        title = Path(image_path).name
        if maps.predictions is not None:
            predicted = int(maps.predictions[0])
            title += f": predicted {id2label.get(predicted, predicted)}"
        figure_path = _unused_path(output_dir, Path(image_path).stem, written)
        save_attention_figure(image, maps, figure_path, title=title)
        written.append(figure_path)
    return written


def _unused_path(output_dir: Path, stem: str, taken: list[Path]) -> Path:
    # Two images may share a file name in different folders; neither figure should overwrite the other.
    path, number = output_dir / f"{stem}_attention.png", 1
    while path in taken:
        number += 1
        path = output_dir / f"{stem}_attention_{number}.png"
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _draw(axis, image: Image.Image, attention_map: torch.Tensor | None, title: str | None) -> None:
    """Show `image` on `axis`, stretched onto the map's frame, with `attention_map` over it when given."""
    pixels = np.asarray(image.convert("RGB"))
    height, width = attention_map.shape if attention_map is not None else pixels.shape[:2]
    extent = (0, width, height, 0)
    axis.imshow(pixels, extent=extent, interpolation="nearest")
    if attention_map is not None:
        axis.imshow(attention_map.numpy(), extent=extent, cmap="jet", alpha=OVERLAY_ALPHA, interpolation="bilinear")
    if title:
        axis.set_title(title, fontsize=9)
    axis.set_axis_off()


__all__ = [
    "AttentionMaps",
    "attention_rollout",
    "class_token_attention",
    "compute_attention_maps",
    "images_to_pixel_values",
    "load_model_and_processor",
    "open_image",
    "patch_map_to_image",
    "pooled_rows",
    "processor_at_native_size",
    "save_attention_figure",
    "save_attention_figures",
    "save_attention_grid",
]
