"""Fine-tuning recipes shared by both training loops: layer-wise learning-rate decay, Mixup / CutMix with the soft
targets they need, label smoothing, TrivialAugment, and an exponential moving average of the weights.

Each follows the reference that made it standard: layer-wise decay as BEiT and MAE fine-tune (`param_groups_lrd` in
MAE's `util/lr_decay.py`), Mixup / CutMix as timm's `timm.data.Mixup` (batch mode, the batch paired with itself
reversed, label smoothing folded into the mixed targets), the average through PyTorch's own
`torch.optim.swa_utils.AveragedModel`, TrivialAugment as torchvision's `TrivialAugmentWide` applies it to PIL
images (the same Pillow operations, magnitudes and draws). timm's `Mixup` and torchvision's `TrivialAugmentWide`
are not used directly: timm installs torchvision, which this package must not need.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from safetensors.torch import load_file, save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

logger = logging.getLogger(__name__)

# The batch key that carries the mixed targets, (batch, num_labels) probabilities; `labels` keep the class indices.
SOFT_LABELS = "soft_labels"
# Where a checkpoint keeps the average, and where the final one is saved as a model folder.
EMA_CHECKPOINT_FILE = "ema.safetensors"
EMA_FOLDER = "ema"
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class TrivialAugmentWide:
    """TrivialAugment (Müller and Hutter, 2021) in its wide magnitude space: one operation per image, drawn uniformly
    from 14, at a strength drawn uniformly from 31 steps, with a random sign for the signed ones.

    Written out on Pillow's own operations exactly as torchvision's `TrivialAugmentWide` applies them to PIL images
    (nearest-neighbour resampling, black fill, the same draws in the same order), because torchvision cannot be a
    dependency; kornia's `TrivialAugment` was measured and differs from the paper (see the README).
    """

    num_magnitude_bins = 31

    def __init__(self):
        bins = self.num_magnitude_bins

        def steps(low: float, high: float) -> list[float]:  # float32, as torchvision's: int(16.0 - 1 ulp) is 15
            return torch.linspace(low, high, bins).tolist()

        # operation -> (magnitudes, signed), torchvision's `_augmentation_space` of `TrivialAugmentWide`
        self.space = {
            "Identity": (None, False),
            "ShearX": (steps(0.0, 0.99), True),
            "ShearY": (steps(0.0, 0.99), True),
            "TranslateX": (steps(0.0, 32.0), True),
            "TranslateY": (steps(0.0, 32.0), True),
            "Rotate": (steps(0.0, 135.0), True),
            "Brightness": (steps(0.0, 0.99), True),
            "Color": (steps(0.0, 0.99), True),
            "Contrast": (steps(0.0, 0.99), True),
            "Sharpness": (steps(0.0, 0.99), True),
            "Posterize": ((8 - (torch.arange(bins) / ((bins - 1) / 6)).round().int()).tolist(), False),
            "Solarize": (steps(255.0, 0.0), False),
            "AutoContrast": (None, False),
            "Equalize": (None, False),
        }

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> Image.Image:
        """`image` with one drawn operation applied; draws from `generator` (else torch's global generator)."""
        name, magnitude = self.draw(generator)
        return self.apply(image, name, magnitude)

    def draw(self, generator: torch.Generator | None = None) -> tuple[str, float]:
        """The operation and its signed magnitude (0 for those without one)."""
        names = list(self.space)
        name = names[int(torch.randint(len(names), (1,), generator=generator).item())]
        magnitudes, signed = self.space[name]
        magnitude = 0.0
        if magnitudes is not None:
            magnitude = float(magnitudes[int(torch.randint(len(magnitudes), (1,), generator=generator).item())])
        if signed and torch.randint(2, (1,), generator=generator).item():
            magnitude = -magnitude
        return name, magnitude

    @staticmethod
    def apply(image: Image.Image, name: str, magnitude: float) -> Image.Image:
        """torchvision's `_apply_op` for a PIL image: the affine ones as `F.affine` builds their inverse matrix."""
        nearest = Image.Resampling.NEAREST
        if name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
            shift = int(magnitude)  # torchvision truncates the translation to whole pixels
            matrix = {
                "ShearX": (1.0, magnitude, 0.0, 0.0, 1.0, 0.0),  # shear angle atan(magnitude), about the corner
                "ShearY": (1.0, 0.0, 0.0, magnitude, 1.0, 0.0),
                "TranslateX": (1.0, 0.0, -shift, 0.0, 1.0, 0.0),
                "TranslateY": (1.0, 0.0, 0.0, 0.0, 1.0, -shift),
            }[name]
            return image.transform(image.size, Image.Transform.AFFINE, matrix, resample=nearest, fillcolor=0)
        if name == "Rotate":
            return image.rotate(magnitude, resample=nearest, fillcolor=0)
        enhancers = {
            "Brightness": ImageEnhance.Brightness,
            "Color": ImageEnhance.Color,
            "Contrast": ImageEnhance.Contrast,
            "Sharpness": ImageEnhance.Sharpness,
        }
        if name in enhancers:
            return enhancers[name](image).enhance(1.0 + magnitude)
        if name == "Posterize":
            return ImageOps.posterize(image, int(magnitude))
        if name == "Solarize":
            return ImageOps.solarize(image, magnitude)
        if name == "AutoContrast":
            return ImageOps.autocontrast(image)
        if name == "Equalize":
            return ImageOps.equalize(image)
        return image  # Identity


def layer_id(parameter_name: str, num_layers: int) -> int:
    """0 for the embeddings (patch projection, prefix tokens, positions), i + 1 for encoder layer i, and
    `num_layers + 1` for everything after the encoder (final norm, pooling, heads), as MAE's `get_layer_id_for_vit`.
    """
    if match := _LAYER_INDEX.search(parameter_name):
        return int(match.group(1)) + 1
    if "embeddings." in parameter_name:
        return 0
    return num_layers + 1


def layer_learning_rates(learning_rate: float, layer_decay: float, num_layers: int) -> list[float]:
    """The learning rate of every layer id: the head trains at `learning_rate`, each layer below at `layer_decay`
    times the one above it, the embeddings at `learning_rate * layer_decay ** (num_layers + 1)`."""
    return [learning_rate * layer_decay ** (num_layers + 1 - index) for index in range(num_layers + 2)]


class MixupCutmix:
    """timm's batch-mode Mixup / CutMix: one mixing coefficient per batch, the batch mixed with itself reversed.

    With both alphas set, each batch is CutMix with probability `switch_probability`, else Mixup. CutMix's
    coefficient is corrected to the area of the box actually pasted (the box is clipped at the image border).
    `label_smoothing` is folded into the targets, as timm's `mixup_target` does, so no other loss smooths them again.

    Args:
        num_labels: the classes of the targets.
        mixup_alpha: Beta(alpha, alpha) of Mixup's coefficient; 0 disables Mixup.
        cutmix_alpha: Beta(alpha, alpha) of CutMix's area share; 0 disables CutMix.
        label_smoothing: share of each target spread uniformly over the classes.
        switch_probability: chance of CutMix when both are enabled (timm's default 0.5).
    """

    def __init__(
        self,
        num_labels: int,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float = 0.0,
        switch_probability: float = 0.5,
    ):
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise ValueError("MixupCutmix needs `mixup_alpha` or `cutmix_alpha` above 0.")
        self.num_labels = num_labels
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.label_smoothing = label_smoothing
        self.switch_probability = switch_probability

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch into new tensors and return `(pixel_values, soft_labels)`."""
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < self.switch_probability)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        share = float(rng.beta(alpha, alpha))  # of the image itself; the rest comes from its partner
        partner = pixel_values.flip(0)
        if use_cutmix:
            top, bottom, left, right = self.cutmix_box(pixel_values.shape[-2:], share, rng)
            mixed = pixel_values.clone()
            mixed[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
            height, width = pixel_values.shape[-2:]
            share = 1.0 - (bottom - top) * (right - left) / (height * width)
        else:
            mixed = pixel_values * share + partner * (1.0 - share)
        targets = self.smoothed_one_hot(labels)
        return mixed, targets * share + targets.flip(0) * (1.0 - share)

    @staticmethod
    def cutmix_box(size: Sequence[int], share: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """timm's `rand_bbox`: a box of `1 - share` of the area around a uniform centre, clipped to the image."""
        height, width = size
        ratio = math.sqrt(1.0 - share)
        cut_height, cut_width = int(height * ratio), int(width * ratio)
        centre_y, centre_x = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = np.clip([centre_y - cut_height // 2, centre_y + cut_height // 2], 0, height)
        left, right = np.clip([centre_x - cut_width // 2, centre_x + cut_width // 2], 0, width)
        return int(top), int(bottom), int(left), int(right)

    def smoothed_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.label_smoothing / self.num_labels
        targets = torch.full((len(labels), self.num_labels), off)
        return targets.scatter_(1, labels.view(-1, 1), 1.0 - self.label_smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions, averaged over the batch (timm's `SoftTargetCrossEntropy`)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def training_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float) -> torch.Tensor:
    """The training loss of a batch: against its soft labels when Mixup / CutMix made them, cross-entropy with
    `label_smoothing` when asked, else the model's own loss (which follows `config.problem_type`)."""
    if SOFT_LABELS in batch:
        return soft_target_cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch[SOFT_LABELS])
    if label_smoothing > 0:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=label_smoothing)
    return model(**batch).loss


class WeightAverage:
    """An exponential moving average of a model's weights (and buffers), updated after every optimiser step.

    Kept beside the model on the same device; each process of a data-parallel run keeps its own, identical copy.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.eval()

    @property
    def module(self) -> torch.nn.Module:
        return self.averaged.module

    def update(self, model: torch.nn.Module) -> None:
        self.averaged.update_parameters(model)

    def save(self, folder: str | Path) -> None:
        save_file(
            {name: tensor.contiguous() for name, tensor in self.averaged.state_dict().items()},
            Path(folder) / EMA_CHECKPOINT_FILE,
        )

    def load(self, folder: str | Path) -> None:
        state = load_file(Path(folder) / EMA_CHECKPOINT_FILE, device=str(self.averaged.n_averaged.device))
        self.averaged.load_state_dict(state)

    def restart_from(self, model: torch.nn.Module) -> None:
        """Start the average afresh at `model`'s weights (a checkpoint saved without one)."""
        self.module.load_state_dict(model.state_dict())
        self.averaged.n_averaged.zero_()

    def resume(self, checkpoint: str | Path, model: torch.nn.Module) -> None:
        """Load the average a checkpoint kept; one saved without an average starts it afresh, with a warning."""
        if (Path(checkpoint) / EMA_CHECKPOINT_FILE).is_file():
            self.load(checkpoint)
        else:
            logger.warning("%s holds no weight average: `--ema_decay` starts one from its weights.", checkpoint)
            self.restart_from(model)

    def save_model_folder(self, output_dir: str | Path, image_processor) -> None:
        """The average as a model folder of its own, `output_dir/ema`, loadable like the trained model."""
        folder = Path(output_dir) / EMA_FOLDER
        self.module.save_pretrained(folder)
        image_processor.save_pretrained(folder)


@contextmanager
def weights_of(model: torch.nn.Module, source: torch.nn.Module) -> Iterator[None]:
    """Run `model` with `source`'s weights inside the block, its own restored after: evaluates the average through
    the loop's prepared (possibly DDP-wrapped) model, whose parameters are these same tensors."""
    own = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        model.load_state_dict(source.state_dict())
    try:
        yield
    finally:
        with torch.no_grad():
            model.load_state_dict(own)


__all__ = [
    "EMA_FOLDER",
    "SOFT_LABELS",
    "MixupCutmix",
    "TrivialAugmentWide",
    "WeightAverage",
    "layer_id",
    "layer_learning_rates",
    "soft_target_cross_entropy",
    "training_loss",
    "weights_of",
]
