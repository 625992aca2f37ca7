"""Checkpoint conversion to and from `ViTCustom` with exact numerical parity.

Three sources are read, each by one pure function that returns a `ViTCustomConfig` and a state dict:

* `convert_from_transformers`: transformers' `ViTModel` / `ViTForImageClassification`, in the transformers 5.x layout
  (`layers.{i}.attention.{q,k,v,o}_proj`) or the older BERT-style one (`encoder.layer.{i}.attention.attention.query`).
* `convert_from_timm`: timm's `VisionTransformer` (class token, learned absolute position embeddings).
* `convert_from_jax`: the `.npz` files of google-research/vision_transformer.

`convert_to_transformers` goes back to transformers' layout and `convert_to_jax` to the JAX `.npz` layout (used by
the tests to build a JAX checkpoint from a random model). `resample_position_embeddings` changes the grid.

The returned state dict has the keys of `ViTCustomForImageClassification` (`vit.` prefix plus `classifier.*`) when the
source has a classification head, and those of `ViTCustomModel` (no prefix) when it does not; `build_model` picks the
class and loads it strictly.

Every problem (missing keys, keys no rule knows, wrong shapes, architecture features `ViTCustom` does not have) stops
the conversion with one `ValueError` that lists all of them: a checkpoint that loads "mostly" is worse than none.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .configuration_vit_custom import ViTCustomConfig, to_pair
from .modeling_vit_custom import ViTCustomForImageClassification, ViTCustomModel, resample_patch_positions

logger = logging.getLogger(__name__)

# The LayerNorm epsilon of the JAX release (flax's default).
JAX_LAYER_NORM_EPS = 1e-6

# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------------


# Fields that transformers' `ViTConfig` and `ViTCustomConfig` share under the same name and meaning.
SHARED_CONFIG_FIELDS = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
)


def expected_shapes(config: ViTCustomConfig, with_head: bool) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of `ViTCustomModel` (or `ViTCustomForImageClassification` when `with_head`).

    Read off the model itself, built on the meta device (no memory, no initialisation), so that every knob the model
    has is covered without a second description of its layout here.
    """
    with torch.device("meta"):
        model = ViTCustomForImageClassification(config) if with_head else ViTCustomModel(config)
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}


def _check_keys(
    source: str, keys: Iterable[str], required: Iterable[str], optional: Iterable[str] = (), missing: Iterable[str] = ()
) -> None:
    """Raise one `ValueError` listing every missing and every unknown key (`missing`: ones known missing already)."""
    keys, required = set(keys), list(required)
    missing = [*missing, *(key for key in required if key not in keys)]
    unknown = sorted(keys - set(required) - set(optional))
    if missing or unknown:
        lines = [f"Cannot convert this {source} checkpoint:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {missing}")
        if unknown:
            lines.append(f"  unknown keys ({len(unknown)}): {unknown}")
        raise ValueError("\n".join(lines))


def _check_unsupported(source: str, keys: Iterable[str], rules: Iterable[tuple[str, str]]) -> None:
    """Raise a `ValueError` naming each architecture feature (and its keys) that `ViTCustom` does not implement."""
    found: dict[str, list[str]] = {}
    for key in keys:
        for pattern, feature in rules:
            if re.search(pattern, key):
                found.setdefault(feature, []).append(key)
    if found:
        details = "; ".join(
            f"{feature} (keys {sorted(hits)[:4]}{' ...' if len(hits) > 4 else ''})" for feature, hits in found.items()
        )
        raise ValueError(f"Unsupported {source} variant, ViTCustom has no {details}.")


def _finalize(
    source: str,
    config: ViTCustomConfig,
    base: dict[str, torch.Tensor],
    head: dict[str, torch.Tensor],
    missing: Iterable[str] = (),
):
    """Add the `vit.` prefix when there is a head, then compare every key and shape with the model's (`missing`:
    source keys found missing already, reported with the rest)."""
    state_dict = {f"vit.{key}": value for key, value in base.items()} | head if head else dict(base)
    expected = expected_shapes(config, with_head=bool(head))
    _check_keys(source, state_dict, expected, missing=missing)
    wrong = [
        f"{key}: {tuple(value.shape)} != expected {expected[key]}"
        for key, value in state_dict.items()
        if tuple(value.shape) != expected[key]
    ]
    if wrong:
        raise ValueError(f"Shape mismatches in the {source} checkpoint:\n  " + "\n  ".join(wrong))
    return config, {key: value.contiguous() for key, value in state_dict.items()}


def _num_layers(keys: Iterable[str], pattern: str) -> int:
    """1 + the largest layer index matched by `pattern` (whose group 1 is the index); gaps show up as missing keys."""
    indices = [int(match[1]) for key in keys if (match := re.match(pattern, key))]
    if not indices:
        raise ValueError(f"No encoder layers found (no key matches {pattern!r}).")
    return max(indices) + 1


def _label_kwargs(num_labels: int, id2label: Mapping | None) -> dict[str, Any]:
    if id2label:
        id2label = {int(index): str(label) for index, label in id2label.items()}
        if len(id2label) != num_labels:
            raise ValueError(f"id2label has {len(id2label)} entries but the head has {num_labels} outputs.")
        return {"id2label": id2label, "label2id": {label: index for index, label in id2label.items()}}
    return {"num_labels": num_labels}


def _square_grid(num_positions: int, patch_size: tuple[int, int], source: str) -> tuple[int, int]:
    """Image size of a square grid with `num_positions` patches; non-square checkpoints must give `image_size`."""
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(
            f"The {source} position embeddings hold {num_positions} patches, not a square grid: pass `image_size`."
        )
    return side * patch_size[0], side * patch_size[1]


def resample_position_embeddings(
    position_embeddings: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resample `(1, prefix + old_h * old_w, D)` position embeddings to a `new_h` x `new_w` grid (bicubic).

    Uses the model's own `resample_patch_positions`, so a converted model at the new size computes exactly what the
    source model computes at that size with `interpolate_pos_encoding=True`. The prefix tokens' embeddings are kept.
    """
    old_grid, new_grid = to_pair(tuple(old_grid)), to_pair(tuple(new_grid))
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if position_embeddings.ndim != 3 or position_embeddings.shape[:2] != (1, expected):
        raise ValueError(
            f"Position embeddings of shape {tuple(position_embeddings.shape)} do not fit a {old_grid} grid plus "
            f"{num_prefix_tokens} prefix token(s): expected (1, {expected}, D)."
        )
    with torch.no_grad():
        return resample_patch_positions(position_embeddings, num_prefix_tokens, old_grid, new_grid).clone()


def resize_state_dict(
    config: ViTCustomConfig, state_dict: dict[str, torch.Tensor], image_size: int | tuple[int, int]
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """Return a config and state dict for a new `image_size`, with the position embeddings resampled."""
    new_config = ViTCustomConfig(**{**config.to_dict(), "image_size": image_size})
    key = next(key for key in state_dict if key.endswith("embeddings.position_embeddings"))
    new_state_dict = dict(state_dict)
    new_state_dict[key] = resample_position_embeddings(
        state_dict[key], config.grid_size, new_config.grid_size, config.num_prefix_tokens
    )
    return new_config, new_state_dict


def build_model(config: ViTCustomConfig, state_dict: Mapping[str, torch.Tensor]):
    """`ViTCustomForImageClassification` when the state dict has a head, else `ViTCustomModel`; loaded strictly."""
    model_class = ViTCustomForImageClassification if "classifier.weight" in state_dict else ViTCustomModel
    model = model_class(config)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _split_head(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split one of our state dicts into encoder keys (without `vit.`) and head keys."""
    head = {key: value for key, value in state_dict.items() if key.startswith("classifier.")}
    base = {key.removeprefix("vit."): value for key, value in state_dict.items() if key not in head}
    return base, head


# ---------------------------------------------------------------------------------------------------------------------
# transformers: vit, deit, dinov2, dinov2_with_registers, siglip, clip, vit_mae, vit_msn
# ---------------------------------------------------------------------------------------------------------------------

# transformers < 5 stored ViT with BERT-style module names; transformers 5.x renames them at load time with the
# "ViTModel" entry of `transformers/conversion_mapping.py`. The same renames, applied in order:
TRANSFORMERS_OLD_TO_NEW = (
    (r"(^|\.)encoder\.layer\.(\d+)\.", r"\1layers.\2."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),  # after `attention.output.dense`, which it would also match
)
# Every family's 5.x names -> ours, applied in order after `TRANSFORMERS_OLD_TO_NEW` and after the encoder prefix
# (`vit.`, `dinov2.`, `vision_model.`, ...) is stripped. Every Linear / LayerNorm / Conv2d is laid out as ours; what
# needs more than a rename (q/k/v and gate/up fusion, CLIP's unbatched class and position embeddings, SigLIP's packed
# in-projection, the final norm's place) is done by `convert_from_transformers` below.
TRANSFORMERS_RENAMES = (
    (r"^encoder\.layers\.(\d+)\.", r"layers.\1."),  # SigLIP, CLIP (DINOv2's `encoder.layer` is renamed above)
    (r"\.layernorm_before\.", ".norm1."),  # ViT, DeiT, ViT-MAE, ViT-MSN
    (r"\.layernorm_after\.", ".norm2."),
    (r"\.layer_norm([12])\.", r".norm\1."),  # SigLIP, CLIP
    (r"\.self_attn\.out_proj\.", ".attention.proj."),
    (r"\.self_attn\.", ".attention."),
    (r"\.attention\.o_proj\.", ".attention.proj."),
    (r"\.layer_scale([12])\.lambda1$", r".layer_scale\1.gamma"),  # DINOv2
    (r"\.mlp\.weights_in\.", ".mlp.fc1."),  # DINOv2's SwiGLU before 5.x: gate and up packed, as ours
    (r"\.mlp\.weights_out\.", ".mlp.fc2."),
    (r"\.mlp\.down_proj\.", ".mlp.fc2."),
    (r"^embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"^embeddings\.position_embedding\.weight$", "embeddings.position_embeddings"),
    (r"^embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"^pre_layrnorm\.", "pre_layernorm."),
    (r"^head\.probe$", "attention_pool.probe"),  # SigLIP's attention-pooling head
    (r"^head\.attention\.out_proj\.", "attention_pool.proj."),
    (r"^head\.layernorm\.", "attention_pool.norm."),
    (r"^head\.mlp\.", "attention_pool.mlp."),
    (r"^cls_classifier\.", "classifier."),  # DeiT with a teacher: the class token's head
)
# Weights of a source that the converted model does not need, each dropped with a note.
TRANSFORMERS_DROPPED = (
    (r"^pooler\.dense\.", "the pooler (dense + tanh on the class token, unused by the classifiers)"),
    (r"^embeddings\.mask_token$", "the mask token (only masked-image-modeling training uses it)"),
    (r"^decoder\.", "the masked-autoencoder decoder (the encoder is converted)"),
    (r"^(text_model|text_projection|visual_projection)\.|^logit_(scale|bias)$", "the text tower and projections"),
)


@dataclass(frozen=True)
class TransformersFamily:
    """What a transformers `model_type` needs beyond the shared renames."""

    prefixes: tuple[str, ...]  # where the encoder sits in the family's models
    knobs: Callable[[dict[str, Any]], dict[str, Any]] = lambda source: {}  # source config -> our knobs
    final_norm: str = "layernorm"  # our module for the source's `post_layernorm`
    # Fold the class token's position embedding into the class token, because the registers between them have none.
    fold_class_position: bool = False


def _dinov2_knobs(source: dict[str, Any]) -> dict[str, Any]:
    intermediate_size = int(source["hidden_size"] * source.get("mlp_ratio", 4))
    knobs = {
        "layer_scale_init_value": source.get("layerscale_value", 1.0),
        "intermediate_size": intermediate_size,
        # transformers' DINOv2 resamples its position embeddings to every input (its processor crops 224 px for a
        # model trained at 518).
        "interpolate_pos_encoding": True,
    }
    if source.get("use_swiglu_ffn"):
        # DINOv2's SwiGLU keeps two thirds of the MLP width, rounded up to a multiple of 8.
        knobs |= {
            "mlp_type": "glu",
            "hidden_act": "silu",
            "intermediate_size": (intermediate_size * 2 // 3 + 7) // 8 * 8,
        }
    return knobs


TRANSFORMERS_FAMILIES = {
    "vit": TransformersFamily(("vit.",)),
    "vit_msn": TransformersFamily(("vit.",)),
    "vit_mae": TransformersFamily(("vit.",)),
    "deit": TransformersFamily(("deit.",), lambda source: {"distillation_token": True}),
    "dinov2": TransformersFamily(("dinov2.",), _dinov2_knobs),
    "dinov2_with_registers": TransformersFamily(
        ("dinov2_with_registers.",),
        lambda source: (
            _dinov2_knobs(source)
            | {
                "num_register_tokens": source["num_register_tokens"],
                "no_embed_class": True,
                "interpolate_antialias": True,
            }
        ),
        fold_class_position=True,
    ),
    "siglip_vision_model": TransformersFamily(
        ("vision_model.",),
        lambda source: {
            "class_token": False,
            "pooling": "map" if source.get("vision_use_head", True) else "none",
            "qkv_bias": True,
        },
    ),
    "clip_vision_model": TransformersFamily(
        ("vision_model.",),
        lambda source: {"pre_norm": True, "patch_embedding_bias": False, "fc_norm": True, "qkv_bias": True},
        final_norm="fc_norm",
    ),
}
# A full SigLIP or CLIP checkpoint converts its vision tower.
TRANSFORMERS_VISION_TOWERS = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}


def _transformers_config_dict(source_config: Any) -> dict[str, Any]:
    """The config as a dict; a full SigLIP / CLIP config gives its `vision_config`."""
    source = source_config.to_dict() if hasattr(source_config, "to_dict") else dict(source_config)
    if tower := TRANSFORMERS_VISION_TOWERS.get(source.get("model_type")):
        vision = source["vision_config"]
        source = {"model_type": tower, **(vision.to_dict() if hasattr(vision, "to_dict") else vision)}
    return source


def transformers_family(source: dict[str, Any]) -> tuple[str, TransformersFamily]:
    """The supported family of a transformers config dict (a full SigLIP / CLIP config: its vision tower's), or a
    `ValueError` naming the `model_type` and the supported ones."""
    model_type = source.get("model_type") or "vit"
    model_type = TRANSFORMERS_VISION_TOWERS.get(model_type, model_type)
    if model_type not in TRANSFORMERS_FAMILIES:
        raise ValueError(
            f"transformers `model_type` {model_type!r} is not supported; supported: "
            f"{sorted([*TRANSFORMERS_FAMILIES, *TRANSFORMERS_VISION_TOWERS])}."
        )
    return model_type, TRANSFORMERS_FAMILIES[model_type]


def config_from_transformers(source_config: Any, num_labels: int | None = None, pooling: str | None = None):
    """A transformers config (or its dict) of a supported family -> `ViTCustomConfig`.

    Every architectural field is copied as it is; `layer_norm_eps` in particular keeps transformers' ViT default of
    1e-12 (ours is 1e-6): the outputs would differ otherwise. `num_labels` is the head's width; labels come from
    `id2label` when it has that many entries. `pooling` overrides the family's (a task head's own pooling).
    """
    source = _transformers_config_dict(source_config)
    _, family = transformers_family(source)
    kwargs = {name: source[name] for name in SHARED_CONFIG_FIELDS if name in source}
    if "attention_dropout" in source:  # SigLIP and CLIP's name
        kwargs["attention_probs_dropout_prob"] = source["attention_dropout"]
    kwargs |= family.knobs(source)
    if pooling is not None:
        kwargs["pooling"] = pooling
    id2label = source.get("id2label")
    if num_labels is not None:
        kwargs |= _label_kwargs(num_labels, id2label if id2label and len(id2label) == num_labels else None)
    return ViTCustomConfig(**kwargs)


def _fuse(tensors: dict[str, torch.Tensor], parts: Iterable[str], fused: str) -> list[str]:
    """Concatenate the rows of `{layer}.{part}.{weight,bias}` into `{layer}.{fused}.*`, in place, for every layer.

    Our fused projections are one Linear whose output rows are the parts' rows one after the other (q, k, v heads-major
    as the separate projections order theirs; the gate before the up projection), so fusion is a concatenation.
    Returns the parts that some layer lacks, for the error report.
    """
    parts = list(parts)
    missing = []
    for key in [key for key in tensors if re.fullmatch(rf"layers\.\d+\.{re.escape(parts[0])}\.(weight|bias)", key)]:
        layer, parameter = key.rsplit(f".{parts[0]}.", 1)
        names = [f"{layer}.{part}.{parameter}" for part in parts]
        missing += [name for name in names if name not in tensors]
        if all(name in tensors for name in names):
            tensors[f"{layer}.{fused}.{parameter}"] = torch.cat([tensors.pop(name) for name in names], dim=0)
    return missing


def convert_from_transformers(
    state_dict: Mapping[str, torch.Tensor], source_config: Any, pooler: str = "drop"
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """A transformers state dict (5.x layout, or ViT's older BERT-style one) + its config -> ours.

    Families: `vit`, `deit` (a teacher model's two heads are averaged, as DeiT predicts), `dinov2` (its classifier's
    class-token-and-mean input becomes `pooling="cls_mean"`), `dinov2_with_registers`, `siglip_vision_model` and
    `siglip`, `clip_vision_model` and `clip` (a full checkpoint gives its vision tower), `vit_mae` (the encoder) and
    `vit_msn`. Weights the converted model does not use (poolers, mask tokens, a text tower) are dropped with a logged
    note; with `pooler="error"` a ViT pooler refuses instead.
    """
    if pooler not in ("drop", "error"):
        raise ValueError(f"`pooler` must be 'drop' or 'error', got {pooler!r}.")
    source = _transformers_config_dict(source_config)
    model_type, family = transformers_family(source)
    source_name = f"transformers {model_type}"
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in TRANSFORMERS_OLD_TO_NEW:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    prefix = next((p for p in family.prefixes if any(key.startswith(p) for key in renamed)), "")
    tensors = {}
    for key, value in renamed.items():
        key = key.removeprefix(prefix)
        for pattern, replacement in TRANSFORMERS_RENAMES:
            key = re.sub(pattern, replacement, key)
        tensors[key] = value

    dropped = {note: [key for key in tensors if re.search(pattern, key)] for pattern, note in TRANSFORMERS_DROPPED}
    dropped = {note: keys for note, keys in dropped.items() if keys}
    pooler_keys = [key for key in tensors if key.startswith("pooler.")]
    if pooler_keys and pooler == "error":
        raise ValueError(
            f"The checkpoint has a pooler ({pooler_keys}: dense + tanh on the class token) and ViTCustom has "
            "none; convert with pooler='drop' to keep only the encoder."
        )
    for note, keys in dropped.items():
        logger.warning("Dropping %s: %s.", note, keys if len(keys) <= 4 else f"{keys[:4]} and {len(keys) - 4} more")
        for key in keys:
            del tensors[key]

    missing = _fuse(tensors, ("attention.q_proj", "attention.k_proj", "attention.v_proj"), "attention.qkv")
    # DINOv2's SwiGLU: gate rows first, as ours.
    missing += _fuse(tensors, ("mlp.gate_proj", "mlp.up_proj"), "mlp.fc1")
    if "post_layernorm.weight" in tensors:  # SigLIP and CLIP's final norm; CLIP's normalises the pooled class token
        for parameter in ("weight", "bias"):
            tensors[f"{family.final_norm}.{parameter}"] = tensors.pop(f"post_layernorm.{parameter}")
    if (cls_token := tensors.get("embeddings.cls_token")) is not None and cls_token.ndim == 1:  # CLIP: (hidden,)
        tensors["embeddings.cls_token"] = cls_token.reshape(1, 1, -1)
    if (positions := tensors.get("embeddings.position_embeddings")) is not None and positions.ndim == 2:
        tensors["embeddings.position_embeddings"] = positions.unsqueeze(0)  # SigLIP, CLIP: an nn.Embedding
    if "attention_pool.probe" in tensors:  # SigLIP: nn.MultiheadAttention packs q, k, v; ours packs k and v
        hidden_size = tensors["attention_pool.probe"].shape[-1]
        for parameter in ("weight", "bias"):
            packed = tensors.pop(f"head.attention.in_proj_{parameter}")
            tensors[f"attention_pool.q.{parameter}"] = packed[:hidden_size]
            tensors[f"attention_pool.kv.{parameter}"] = packed[hidden_size:]
    if family.fold_class_position and "embeddings.cls_token" in tensors:
        # DINOv2 with registers gives the class token a position and the registers none: a constant per token, so
        # it is added to the class token once here and the model gives no prefix token a position.
        positions = tensors["embeddings.position_embeddings"]
        tensors["embeddings.cls_token"] = tensors["embeddings.cls_token"] + positions[:, :1]
        tensors["embeddings.position_embeddings"] = positions[:, 1:]

    head_keys = [key for key in tensors if key.startswith(("classifier.", "distillation_classifier."))]
    head = {key: tensors.pop(key) for key in head_keys}
    if model_type == "deit" and head and "distillation_classifier.weight" not in head:
        raise ValueError(
            "DeiTForImageClassification puts its head on the class token alone, beside a distillation token; "
            "ViTCustom averages the heads of both tokens (DeiTForImageClassificationWithTeacher). Convert the "
            "encoder (DeiTModel) and train a new head."
        )
    if model_type in ("siglip_vision_model", "clip_vision_model") and head:
        raise ValueError(
            f"transformers' {model_type.split('_')[0].upper()} image classifier pools the un-normalised tokens, which "
            "ViTCustom does not express; convert the vision model and train a new head."
        )
    pooling = "cls_mean" if model_type.startswith("dinov2") and head else None
    num_labels = head["classifier.weight"].shape[0] if head else None
    config = config_from_transformers(source, num_labels=num_labels, pooling=pooling)
    _check_layer_count(source_name, config, tensors)
    return _finalize(source_name, config, tensors, head, missing)


def _check_layer_count(source: str, config: ViTCustomConfig, tensors: Mapping[str, torch.Tensor]) -> None:
    num_layers = _num_layers(tensors, r"layers\.(\d+)\.")
    if config.num_hidden_layers != num_layers:
        raise ValueError(f"The {source} config says {config.num_hidden_layers} layers, the weights have {num_layers}.")


# The knobs transformers' ViT does not have, with the value that matches it.
TRANSFORMERS_VIT_KNOBS = {
    "pooling": "cls",
    "class_token": True,
    "num_register_tokens": 0,
    "distillation_token": False,
    "no_embed_class": False,
    "fc_norm": False,
    "final_norm": True,
    "layer_scale_init_value": None,
    "qk_norm": False,
    "mlp_type": "mlp",
    "pre_norm": False,
    "patch_embedding_bias": True,
    "interpolate_antialias": False,
}


def config_to_transformers(config: ViTCustomConfig, with_head: bool) -> dict[str, Any]:
    """`ViTCustomConfig` -> keyword arguments of transformers' `ViTConfig`, for the 2020 ViT's knobs only."""
    differing = {
        name: getattr(config, name) for name, value in TRANSFORMERS_VIT_KNOBS.items() if getattr(config, name) != value
    }
    if differing:
        raise ValueError(f"transformers' ViT has no equivalent of {differing}; export to timm instead (`--to timm`).")
    kwargs = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    if with_head:
        kwargs |= {"id2label": dict(config.id2label), "label2id": dict(config.label2id)}
    return kwargs


# Our layer modules -> transformers 5.x ViT's, where the names differ (q/k/v are split from our fused qkv).
TRANSFORMERS_VIT_LAYER_NAMES = {
    "norm1": "layernorm_before",
    "attention.proj": "attention.o_proj",
    "norm2": "layernorm_after",
}


def convert_to_transformers(
    config: ViTCustomConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Ours -> transformers 5.x `ViTForImageClassification` keys (with a head) or `ViTModel` keys without a pooler
    (`add_pooling_layer=False`); returns `ViTConfig` keyword arguments and the state dict."""
    base, head = _split_head(state_dict)
    _finalize("ViTCustom", config, base, head)  # validates keys and shapes
    vit_kwargs = config_to_transformers(config, with_head=bool(head))
    out = {}
    for key, value in base.items():
        if match := re.fullmatch(r"(layers\.\d+)\.attention\.qkv\.(weight|bias)", key):
            # Split: the inverse of the fusion, rows [0, D) are q, [D, 2D) k, [2D, 3D) v.
            for name, part in zip("qkv", value.split(config.hidden_size, dim=0), strict=True):
                out[f"{match[1]}.attention.{name}_proj.{match[2]}"] = part.contiguous()
            continue
        for ours, theirs in TRANSFORMERS_VIT_LAYER_NAMES.items():
            key = key.replace(f".{ours}.", f".{theirs}.")
        out[key] = value
    if head:
        out = {f"vit.{key}": value for key, value in out.items()} | head
    return vit_kwargs, out


# ---------------------------------------------------------------------------------------------------------------------
# timm VisionTransformer
# ---------------------------------------------------------------------------------------------------------------------

# timm's names and ours, one table for both directions (the first pair that fits wins; a name ending in "." is a
# prefix). A rename only: timm's `Attention` reshapes its fused qkv output to (batch, tokens, 3, heads, head_dim), the
# same [q; k; v], heads-major row order as ours; `SwiGLUPacked` packs gate before up as ours; `AttentionPoolLatent` has
# our attention pool's q / kv / proj / norm / mlp; every Linear / LayerNorm / Conv2d is laid out as ours
# (timm/models/vision_transformer.py in huggingface/pytorch-image-models).
TIMM_NAMES = (
    ("cls_token", "embeddings.cls_token"),
    ("dist_token", "embeddings.distillation_token"),
    ("reg_token", "embeddings.register_tokens"),
    ("pos_embed", "embeddings.position_embeddings"),
    ("patch_embed.proj.", "embeddings.patch_embeddings.projection."),
    ("norm_pre.", "pre_layernorm."),
    ("blocks.", "layers."),
    ("norm.", "layernorm."),
    ("attn_pool.latent", "attention_pool.probe"),
    ("attn_pool.", "attention_pool."),
    ("head.", "classifier."),
    ("head_dist.", "distillation_classifier."),  # DeiT's distilled models (VisionTransformerDistilled)
)
TIMM_LAYER_NAMES = (("attn.", "attention."), ("ls1.gamma", "layer_scale1.gamma"), ("ls2.gamma", "layer_scale2.gamma"))


def translate_timm_key(key: str, to_ours: bool) -> str:
    """One state-dict key from timm's names to ours (`to_ours`) or back, through `TIMM_NAMES` and, inside a layer,
    `TIMM_LAYER_NAMES`."""

    def translate(name: str, pairs: tuple[tuple[str, str], ...]) -> str:
        for timm_name, our_name in pairs:
            source, target = (timm_name, our_name) if to_ours else (our_name, timm_name)
            if name == source or (source.endswith(".") and name.startswith(source)):
                return target + name[len(source) :]
        return name

    key = translate(key, TIMM_NAMES)
    layers = "layers." if to_ours else "blocks."
    if key.startswith(layers):
        index, rest = key[len(layers) :].split(".", 1)
        key = f"{layers}{index}.{translate(rest, TIMM_LAYER_NAMES)}"
    return key


# Options of timm's `VisionTransformer` that change the computation and that ViTCustom does not implement.
TIMM_UNSUPPORTED = (
    (r"^patch_embed\.norm\.", "patch embedding norm"),
    (r"\.attn\.norm\.", "attention output norm (scale_attn_norm)"),
    (r"\.mlp\.norm\.", "MLP norm (scale_mlp_norm)"),
    (r"^pre_logits\.", "pre-logits layer (representation_size)"),
    (r"\.attn\.(q|k|v)_bias$", "separate q/v biases"),
    (r"^attn_pool\.[qk]_norm\.", "qk-norm in the attention pool"),
    (r"\.rope\.|^rope\.|freqs", "rotary position embeddings (RoPE, as in EVA-02 and DINOv3)"),
    (r"\.attn\.[qkv]_proj\.", "timm's Eva layout with rotary position embeddings (RoPE: EVA-02, DINOv3)"),
    (r"\.attn\.(lambda_[qk][12]|sub_norm\.)", "differential attention (timm's DiffAttention)"),
)
# SigLIP 2 architectures whose MLP uses tanh-approximated GELU (timm's `gelu_tanh`); every other timm ViT with a
# plain MLP uses exact GELU or says otherwise in its name. Mirrors timm 1.0.31, checked against it by the timm tests.
TIMM_GELU_TANH_ARCHITECTURES = frozenset(
    {
        "vit_base_patch32_siglip_256",
        "vit_base_patch32_siglip_gap_256",
        "vit_giantopt_patch16_siglip_256",
        "vit_giantopt_patch16_siglip_384",
        "vit_giantopt_patch16_siglip_gap_256",
        "vit_giantopt_patch16_siglip_gap_384",
        "vit_large_patch16_siglip_512",
        "vit_large_patch16_siglip_gap_512",
        "vit_so400m_patch16_siglip_256",
        "vit_so400m_patch16_siglip_384",
        "vit_so400m_patch16_siglip_512",
        "vit_so400m_patch16_siglip_gap_256",
        "vit_so400m_patch16_siglip_gap_384",
        "vit_so400m_patch16_siglip_gap_512",
    }
)
# The head count of each width timm's ViTs use (tiny ... gigantic, SigLIP so150m / so400m, DINOv2 giant), and the
# architectures that differ from their width's count; a width not listed needs `num_heads`.
TIMM_HEADS_BY_WIDTH = {
    192: 3,
    256: 4,
    320: 5,
    384: 6,
    512: 8,
    640: 10,
    768: 12,
    832: 13,
    896: 14,
    1024: 16,
    1152: 16,
    1280: 16,
    1408: 16,
    1536: 24,
    1664: 16,
}
TIMM_HEADS_BY_NAME = {"giantopt": 16, "vit_base_patch16_gap_224": 16}
# timm activation modules -> `hidden_act`, for reading an architecture built by timm itself.
TIMM_ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu", "GELUTanh": "gelu_pytorch_tanh", "SiLU": "silu"}
# `hidden_act` -> timm's `act_layer` name, for `convert_to_timm`.
TIMM_ACT_LAYERS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "silu": "silu"}
TIMM_POOLINGS = {"token": "cls", "avg": "mean", "map": "map", "": "none"}


def _timm_name_knobs(architecture: str, hidden_size: int) -> dict[str, Any]:
    """What a timm architecture's name says that its weights do not: heads, LayerNorm epsilon, activation."""
    base = architecture.split(".")[0]  # "vit_base_patch16_224.augreg_in21k" -> "vit_base_patch16_224"
    heads = next((heads for part, heads in TIMM_HEADS_BY_NAME.items() if part == base or part in base.split("_")), None)
    knobs = {
        "num_attention_heads": heads or TIMM_HEADS_BY_WIDTH.get(hidden_size),
        "layer_norm_eps": 1e-5 if "_clip" in base else 1e-6,  # CLIP towers: torch's LayerNorm default
    }
    if "quickgelu" in base:
        knobs["hidden_act"] = "quick_gelu"
    elif base in TIMM_GELU_TANH_ARCHITECTURES:
        knobs["hidden_act"] = "gelu_pytorch_tanh"
    return knobs


def _timm_built_knobs(architecture: str, model_args: Mapping[str, Any]) -> dict[str, Any] | None:
    """The knobs of `architecture` read off timm's own model (built on the meta device), or `None` without timm."""
    try:
        import timm
    except ImportError:  # timm needs torchvision, which not every environment can install
        return None
    base = architecture.split(".")[0]
    if base not in timm.list_models(base):
        return None
    with torch.device("meta"):
        model = timm.create_model(base, pretrained=False, **model_args)
    block = model.blocks[0]
    activation = type(getattr(block.mlp, "act", None)).__name__
    if activation not in TIMM_ACTIVATIONS or (
        activation == "GELU" and getattr(block.mlp.act, "approximate", "none") != "none"
    ):
        raise ValueError(f"timm architecture {architecture!r} uses activation {activation}, which ViTCustom lacks.")
    if getattr(block.mlp, "gate_last", False):
        raise ValueError(
            f"timm architecture {architecture!r} gates the second half of its MLP; ViTCustom gates the first."
        )
    return {
        "num_attention_heads": block.attn.num_heads,
        "layer_norm_eps": block.norm1.eps,
        "hidden_act": TIMM_ACTIVATIONS[activation],
        "global_pool": model.global_pool,
    }


def convert_from_timm(
    state_dict: Mapping[str, torch.Tensor],
    architecture: str | None = None,
    model_args: Mapping[str, Any] | None = None,
    image_size: int | tuple[int, int] | None = None,
    num_heads: int | None = None,
    hidden_act: str | None = None,
    layer_norm_eps: float | None = None,
    global_pool: str | None = None,
    id2label: Mapping | None = None,
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """timm `VisionTransformer` (or DeiT's `VisionTransformerDistilled`) -> ours.

    The weights show most knobs (prefix tokens, layer scale, qk-norm, SwiGLU, pre-norm, final norm placement,
    attention pooling, biases). What they do not show comes, first to last, from the arguments, the snapshot's
    `model_args`, timm itself where it imports (reading `architecture`), and the architecture's name: the head count,
    the LayerNorm epsilon, the activation and the pooling. `image_size` is needed only for a non-square grid.
    """
    model_args = dict(model_args or {})
    keys = list(state_dict)
    if architecture and re.match(r"(eva|vit_\w+_rope|vit_\w+_dinov3)", architecture):
        raise ValueError(
            f"Unsupported timm architecture {architecture!r}: ViTCustom has no rotary position embeddings (RoPE, as in "
            "EVA-02 and DINOv3) yet."
        )
    _check_unsupported("timm", keys, TIMM_UNSUPPORTED)
    for required in ("patch_embed.proj.weight", "pos_embed"):
        if required not in state_dict:
            raise ValueError(
                f"Unsupported timm variant: no `{required}` (ViTCustom needs a patch projection and "
                "learned position embeddings)."
            )
    hidden_size, num_channels, *patch_size = state_dict["patch_embed.proj.weight"].shape
    tensors = {translate_timm_key(key, to_ours=True): value for key, value in state_dict.items()}
    # timm's split SwiGLU: gate first, as ours.
    missing = _fuse(tensors, ("mlp.fc1_g", "mlp.fc1_x"), "mlp.fc1")
    if "attention_pool.probe" in tensors and tensors["attention_pool.probe"].shape[1] != 1:
        raise ValueError("Unsupported timm variant: an attention pool with several latent queries (latent_len > 1).")

    # What the weights show.
    class_token = "embeddings.cls_token" in tensors
    num_registers = tensors["embeddings.register_tokens"].shape[1] if "embeddings.register_tokens" in tensors else 0
    distillation = "embeddings.distillation_token" in tensors
    num_prefix = int(class_token) + int(distillation) + num_registers
    positions = tensors["embeddings.position_embeddings"].shape[1]
    if image_size is None and (size := model_args.get("img_size")):
        image_size = size
    if image_size is None:
        # All prefix tokens with positions, or none (`no_embed_class`, which timm's register models use: tried first).
        for prefix_positions in (0, num_prefix) if num_registers else (num_prefix, 0):
            if math.isqrt(positions - prefix_positions) ** 2 == positions - prefix_positions:
                image_size = _square_grid(positions - prefix_positions, tuple(patch_size), "timm")
                break
        else:
            raise ValueError(
                f"The timm position embeddings ({positions} rows) do not fit a square grid: pass `image_size`."
            )
    image_size = to_pair(image_size)
    grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
    if positions not in (grid[0] * grid[1], num_prefix + grid[0] * grid[1]):
        raise ValueError(
            f"The timm position embeddings hold {positions} rows, which fits neither the {grid[0]}x{grid[1]} grid of "
            f"image_size {image_size} nor that grid plus {num_prefix} prefix token(s); pass the right `image_size`."
        )
    fc_norm = "fc_norm.weight" in tensors
    glu = "layers.0.mlp.fc1.weight" in tensors and (
        tensors["layers.0.mlp.fc1.weight"].shape[0] == 2 * tensors["layers.0.mlp.fc2.weight"].shape[1]
    )
    knobs = {
        "class_token": class_token,
        "num_register_tokens": num_registers,
        "distillation_token": distillation,
        "no_embed_class": num_prefix > 0 and positions == grid[0] * grid[1],
        "fc_norm": fc_norm,
        "final_norm": fc_norm or "layernorm.weight" in tensors,
        "layer_scale_init_value": (
            (model_args.get("init_values") or 1e-5) if "layers.0.layer_scale1.gamma" in tensors else None
        ),
        "qk_norm": "layers.0.attention.q_norm.weight" in tensors,
        "mlp_type": "glu" if glu else "mlp",
        "pre_norm": "pre_layernorm.weight" in tensors,
        "patch_embedding_bias": "embeddings.patch_embeddings.projection.bias" in tensors,
        "qkv_bias": "layers.0.attention.qkv.bias" in tensors,
        "intermediate_size": tensors["layers.0.mlp.fc2.weight"].shape[1] if "layers.0.mlp.fc2.weight" in tensors else 0,
        "interpolate_antialias": True,  # timm's `resample_abs_pos_embed` default
    }
    # What they do not show: the arguments, then the snapshot's model_args, then timm, then the name.
    hidden = {
        "hidden_act": "silu" if glu else "gelu",
        "layer_norm_eps": 1e-6,
        "num_attention_heads": TIMM_HEADS_BY_WIDTH.get(hidden_size),
    }
    hidden["global_pool"] = "map" if "attention_pool.probe" in tensors else "token" if class_token else "avg"
    if architecture:
        hidden |= _timm_name_knobs(architecture, hidden_size)
        hidden |= _timm_built_knobs(architecture, model_args) or {}
    hidden |= {
        name: model_args[arg]
        for name, arg in (("num_attention_heads", "num_heads"), ("global_pool", "global_pool"))
        if arg in model_args
    }
    if isinstance(model_args.get("act_layer"), str):
        timm_activations = {timm_name: ours for ours, timm_name in TIMM_ACT_LAYERS.items()}
        if model_args["act_layer"] not in timm_activations:
            raise ValueError(f"timm's act_layer={model_args['act_layer']!r} has no ViTCustom activation.")
        hidden["hidden_act"] = timm_activations[model_args["act_layer"]]
    explicit = {
        "num_attention_heads": num_heads,
        "hidden_act": hidden_act,
        "layer_norm_eps": layer_norm_eps,
        "global_pool": global_pool,
    }
    hidden |= {name: value for name, value in explicit.items() if value is not None}
    if hidden["num_attention_heads"] is None:
        raise ValueError(
            f"timm weights do not store the number of attention heads, and width {hidden_size} is none of timm's "
            "standard ones: pass `num_heads` (--num_heads)."
        )
    if hidden["global_pool"] not in TIMM_POOLINGS:
        raise ValueError(
            f"timm's global_pool={hidden['global_pool']!r} has no ViTCustom pooling; supported: "
            f"{sorted(TIMM_POOLINGS)}."
        )
    head_keys = [key for key in tensors if key.startswith(("classifier.", "distillation_classifier."))]
    head = {key: tensors.pop(key) for key in head_keys}
    config = ViTCustomConfig(
        image_size=list(image_size) if image_size[0] != image_size[1] else image_size[0],
        patch_size=list(patch_size) if patch_size[0] != patch_size[1] else patch_size[0],
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=_num_layers(tensors, r"layers\.(\d+)\."),
        num_attention_heads=hidden["num_attention_heads"],
        hidden_act=hidden["hidden_act"],
        layer_norm_eps=hidden["layer_norm_eps"],
        pooling=TIMM_POOLINGS[hidden["global_pool"]],
        **knobs,
        **(_label_kwargs(head["classifier.weight"].shape[0], id2label) if head else {}),
    )
    return _finalize("timm", config, tensors, head, missing)


def _timm_base_architecture(config: ViTCustomConfig) -> str:
    """A timm architecture whose builder fixes what `model_args` cannot say (the LayerNorm epsilon, a gated MLP)."""
    if config.mlp_type == "glu":
        if config.hidden_act != "silu" or config.layer_norm_eps != 1e-6:
            raise ValueError("timm's gated MLP (SwiGLUPacked) is SiLU-gated with LayerNorm eps 1e-6.")
        return "vit_giant_patch14_dinov2"
    if config.layer_norm_eps == 1e-5:
        return "vit_base_patch16_clip_224"
    if config.layer_norm_eps == 1e-6:
        return "vit_base_patch16_224"
    raise ValueError(
        f"timm's ViTs use LayerNorm eps 1e-6 (or 1e-5 for CLIP towers); this model uses {config.layer_norm_eps}."
    )


def convert_to_timm(
    config: ViTCustomConfig, state_dict: Mapping[str, torch.Tensor], pretrained_cfg: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Ours -> a timm Hub snapshot: its `config.json` (`architecture`, `model_args`, `pretrained_cfg`, ...) and state
    dict, which `timm.create_model("local-dir:FOLDER", pretrained=True)` (or `hf-hub:` once pushed) builds and loads."""
    base, head = _split_head(state_dict)
    _finalize("ViTCustom", config, base, head)  # validates keys and shapes
    if config.hidden_act not in TIMM_ACT_LAYERS:
        raise ValueError(
            f"timm has no activation for hidden_act={config.hidden_act!r}; supported: {list(TIMM_ACT_LAYERS)}."
        )
    if config.pooling == "cls_mean" or (config.distillation_token and head):
        what = "pooling='cls_mean'" if config.pooling == "cls_mean" else "a distilled head"
        raise ValueError(f"timm's VisionTransformer has no {what}; export the encoder (ViTCustomModel) instead.")
    architecture = _timm_base_architecture(config)
    height, width = to_pair(config.image_size)
    mlp_width = 2 * config.intermediate_size if config.mlp_type == "glu" else config.intermediate_size
    mlp_ratio = mlp_width / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != mlp_width:  # timm builds int(dim * mlp_ratio): keep it off the rounding
        mlp_ratio = (mlp_width + 0.5) / config.hidden_size
    model_args = {
        "img_size": [height, width],
        "patch_size": list(to_pair(config.patch_size)),
        "in_chans": config.num_channels,
        "embed_dim": config.hidden_size,
        "depth": config.num_hidden_layers,
        "num_heads": config.num_attention_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "qk_norm": config.qk_norm,
        "init_values": config.layer_scale_init_value,
        "class_token": config.class_token,
        "no_embed_class": config.no_embed_class,
        "reg_tokens": config.num_register_tokens,
        "pre_norm": config.pre_norm,
        "final_norm": config.final_norm,
        "fc_norm": config.fc_norm,
        "global_pool": {value: key for key, value in TIMM_POOLINGS.items()}[config.pooling],
        "act_layer": TIMM_ACT_LAYERS[config.hidden_act],
    }
    if config.patch_embedding_bias == config.pre_norm:
        raise ValueError("timm's patch projection has a bias exactly when there is no pre-norm (CLIP has neither).")
    timm_state_dict = {
        translate_timm_key(key, to_ours=False): value.contiguous() for key, value in {**base, **head}.items()
    }
    num_classes = head["classifier.weight"].shape[0] if head else 0
    timm_pretrained_cfg = {"input_size": [config.num_channels, height, width], "num_classes": num_classes}
    timm_pretrained_cfg |= dict(pretrained_cfg or {})
    timm_config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "num_features": config.hidden_size,
        "global_pool": model_args["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": timm_pretrained_cfg,
    }
    if head:
        timm_config["label_names"] = [config.id2label[index] for index in range(num_classes)]
    return timm_config, timm_state_dict


# ---------------------------------------------------------------------------------------------------------------------
# JAX (google-research/vision_transformer .npz)
# ---------------------------------------------------------------------------------------------------------------------

# Key names and shapes of the .npz files released by google-research/vision_transformer (flax), as read by timm's
# `_load_weights` in timm/models/vision_transformer.py (huggingface/pytorch-image-models):
#   cls                                                      (1, 1, D)
#   embedding/kernel, embedding/bias                         (ph, pw, C, D) HWIO conv kernel, (D,)
#   Transformer/posembed_input/pos_embedding                 (1, N + 1, D)
#   Transformer/encoderblock_{i}/LayerNorm_0/{scale,bias}    (D,)  pre-attention norm
#   Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel   (D, heads, head_dim)
#   Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/bias     (heads, head_dim)
#   Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/kernel                 (heads, head_dim, D)
#   Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/out/bias                   (D,)
#   Transformer/encoderblock_{i}/LayerNorm_2/{scale,bias}    (D,)  pre-MLP norm
#   Transformer/encoderblock_{i}/MlpBlock_3/Dense_{0,1}/{kernel,bias}   (in, out), (out,)
#   Transformer/encoder_norm/{scale,bias}                    (D,)
#   head/kernel, head/bias                                   (D, classes), (classes,)   optional
#   pre_logits/kernel, pre_logits/bias                       (D, D)                     optional (pre-training)
JAX_BLOCK = "Transformer/encoderblock_{}"
JAX_ATTENTION = JAX_BLOCK + "/MultiHeadDotProductAttention_1"
JAX_LAYER_NORMS = {"LayerNorm_0": "norm1", "LayerNorm_2": "norm2"}
JAX_DENSES = {"MlpBlock_3/Dense_0": "mlp.fc1", "MlpBlock_3/Dense_1": "mlp.fc2"}


def _jax_dense(kernel: np.ndarray) -> torch.Tensor:
    """flax Dense kernels are (in, out): y = x @ K. torch Linear weights are (out, in): y = x @ W.T."""
    return torch.from_numpy(np.ascontiguousarray(kernel.T))


def _jax_heads_in(kernel: np.ndarray) -> torch.Tensor:
    """DenseGeneral (D, heads, head_dim) -> Linear (heads * head_dim, D); flattening heads-major matches our rows."""
    return torch.from_numpy(np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T))


def _jax_heads_out(kernel: np.ndarray) -> torch.Tensor:
    """DenseGeneral (heads, head_dim, D) -> Linear (D, heads * head_dim), inputs ordered heads-major like ours."""
    return torch.from_numpy(np.ascontiguousarray(kernel.reshape(-1, kernel.shape[-1]).T))


def _jax_conv(kernel: np.ndarray) -> torch.Tensor:
    """Conv kernel HWIO (ph, pw, C, D) -> torch OIHW (D, C, ph, pw)."""
    return torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))


def convert_from_jax(
    arrays: Mapping[str, np.ndarray],
    image_size: int | tuple[int, int] | None = None,
    hidden_act: str = "gelu",
    layer_norm_eps: float = JAX_LAYER_NORM_EPS,
    id2label: Mapping | None = None,
    include_head: bool = True,
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """google-research/vision_transformer `.npz` arrays (e.g. `dict(np.load(path))`) -> ours.

    `hidden_act="gelu"` (exact erf GELU) is what timm and transformers use for these weights; flax's `nn.gelu` is the
    tanh approximation, `"gelu_pytorch_tanh"` reproduces it. A `pre_logits` layer (pre-training checkpoints) feeds
    the head, and ViTCustom has none: the conversion refuses unless `include_head=False`, which keeps the encoder.
    """
    arrays = {key: np.asarray(value) for key, value in arrays.items()}
    has_pre_logits = "pre_logits/kernel" in arrays
    if has_pre_logits and include_head:
        raise ValueError(
            "Unsupported JAX variant: the checkpoint has a pre_logits layer (pre_logits/kernel, pre_logits/bias) "
            "between the class token and the head, and ViTCustom has none; pass include_head=False to convert the "
            "encoder alone."
        )
    num_layers = _num_layers(arrays, r"Transformer/encoderblock_(\d+)/")
    has_head = "head/kernel" in arrays
    required = ["cls", "embedding/kernel", "embedding/bias", "Transformer/posembed_input/pos_embedding"]
    required += [f"Transformer/encoder_norm/{p}" for p in ("scale", "bias")]
    qkv_bias = f"{JAX_ATTENTION.format(0)}/query/bias" in arrays
    for i in range(num_layers):
        required += [f"{JAX_BLOCK.format(i)}/{norm}/{p}" for norm in JAX_LAYER_NORMS for p in ("scale", "bias")]
        required += [f"{JAX_BLOCK.format(i)}/{dense}/{p}" for dense in JAX_DENSES for p in ("kernel", "bias")]
        required += [f"{JAX_ATTENTION.format(i)}/{name}/kernel" for name in ("query", "key", "value", "out")]
        required += [f"{JAX_ATTENTION.format(i)}/out/bias"]
        if qkv_bias:
            required += [f"{JAX_ATTENTION.format(i)}/{name}/bias" for name in ("query", "key", "value")]
    optional = ["head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias"]
    if has_head and include_head:
        required += ["head/kernel", "head/bias"]
    _check_keys("JAX", arrays, required, optional)
    if not include_head and (has_head or has_pre_logits):
        logger.warning("include_head=False: dropping the JAX head%s.", " and pre_logits" if has_pre_logits else "")

    patch_height, patch_width, num_channels, hidden_size = arrays["embedding/kernel"].shape
    positions = arrays["Transformer/posembed_input/pos_embedding"].shape[1]
    if image_size is None:
        image_size = _square_grid(positions - 1, (patch_height, patch_width), "JAX")
    _, num_heads, _ = arrays[f"{JAX_ATTENTION.format(0)}/query/kernel"].shape
    with_head = has_head and include_head
    config = ViTCustomConfig(
        image_size=list(to_pair(image_size)),
        patch_size=[patch_height, patch_width] if patch_height != patch_width else patch_height,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=arrays[f"{JAX_BLOCK.format(0)}/MlpBlock_3/Dense_0/kernel"].shape[1],
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
        qkv_bias=qkv_bias,
        pooling="cls",
        **(_label_kwargs(arrays["head/kernel"].shape[1], id2label) if with_head else {}),
    )
    tensor = torch.from_numpy
    base = {
        "embeddings.cls_token": tensor(arrays["cls"]),
        "embeddings.position_embeddings": tensor(arrays["Transformer/posembed_input/pos_embedding"]),
        "embeddings.patch_embeddings.projection.weight": _jax_conv(arrays["embedding/kernel"]),
        "embeddings.patch_embeddings.projection.bias": tensor(arrays["embedding/bias"]),
        # LayerNorm: flax `scale` is torch's `weight`.
        "layernorm.weight": tensor(arrays["Transformer/encoder_norm/scale"]),
        "layernorm.bias": tensor(arrays["Transformer/encoder_norm/bias"]),
    }
    for i in range(num_layers):
        block, attention, layer = JAX_BLOCK.format(i), JAX_ATTENTION.format(i), f"layers.{i}"
        for norm, ours in JAX_LAYER_NORMS.items():
            base[f"{layer}.{ours}.weight"] = tensor(arrays[f"{block}/{norm}/scale"])
            base[f"{layer}.{ours}.bias"] = tensor(arrays[f"{block}/{norm}/bias"])
        for dense, ours in JAX_DENSES.items():
            base[f"{layer}.{ours}.weight"] = _jax_dense(arrays[f"{block}/{dense}/kernel"])
            base[f"{layer}.{ours}.bias"] = tensor(arrays[f"{block}/{dense}/bias"])
        # Fusion of the three per-head projections into our [q; k; v] rows.
        base[f"{layer}.attention.qkv.weight"] = torch.cat(
            [_jax_heads_in(arrays[f"{attention}/{name}/kernel"]) for name in ("query", "key", "value")]
        )
        if qkv_bias:
            base[f"{layer}.attention.qkv.bias"] = torch.cat(
                [tensor(arrays[f"{attention}/{name}/bias"].reshape(-1)) for name in ("query", "key", "value")]
            )
        base[f"{layer}.attention.proj.weight"] = _jax_heads_out(arrays[f"{attention}/out/kernel"])
        base[f"{layer}.attention.proj.bias"] = tensor(arrays[f"{attention}/out/bias"])
    head = {}
    if with_head:
        head = {"classifier.weight": _jax_dense(arrays["head/kernel"]), "classifier.bias": tensor(arrays["head/bias"])}
    return _finalize("JAX", config, base, head)


def convert_to_jax(config: ViTCustomConfig, state_dict: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Ours -> the google-research/vision_transformer `.npz` layout: the exact inverse of `convert_from_jax`."""
    base, head = _split_head(state_dict)
    _finalize("ViTCustom", config, base, head)
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = hidden // heads

    def array(value: torch.Tensor) -> np.ndarray:
        return value.detach().cpu().numpy()

    out = {
        "cls": array(base["embeddings.cls_token"]),
        "Transformer/posembed_input/pos_embedding": array(base["embeddings.position_embeddings"]),
        "embedding/kernel": array(base["embeddings.patch_embeddings.projection.weight"]).transpose(2, 3, 1, 0),
        "embedding/bias": array(base["embeddings.patch_embeddings.projection.bias"]),
        "Transformer/encoder_norm/scale": array(base["layernorm.weight"]),
        "Transformer/encoder_norm/bias": array(base["layernorm.bias"]),
    }
    for i in range(config.num_hidden_layers):
        block, attention, layer = JAX_BLOCK.format(i), JAX_ATTENTION.format(i), f"layers.{i}"
        for norm, ours in JAX_LAYER_NORMS.items():
            out[f"{block}/{norm}/scale"] = array(base[f"{layer}.{ours}.weight"])
            out[f"{block}/{norm}/bias"] = array(base[f"{layer}.{ours}.bias"])
        for dense, ours in JAX_DENSES.items():
            out[f"{block}/{dense}/kernel"] = array(base[f"{layer}.{ours}.weight"]).T
            out[f"{block}/{dense}/bias"] = array(base[f"{layer}.{ours}.bias"])
        qkv = array(base[f"{layer}.attention.qkv.weight"])
        for index, name in enumerate(("query", "key", "value")):
            out[f"{attention}/{name}/kernel"] = qkv[index * hidden : (index + 1) * hidden].T.reshape(
                hidden, heads, head_dim
            )
            if config.qkv_bias:
                bias = array(base[f"{layer}.attention.qkv.bias"])[index * hidden : (index + 1) * hidden]
                out[f"{attention}/{name}/bias"] = bias.reshape(heads, head_dim)
        out[f"{attention}/out/kernel"] = array(base[f"{layer}.attention.proj.weight"]).T.reshape(
            heads, head_dim, hidden
        )
        out[f"{attention}/out/bias"] = array(base[f"{layer}.attention.proj.bias"])
    if head:
        out["head/kernel"] = array(head["classifier.weight"]).T
        out["head/bias"] = array(head["classifier.bias"])
    return {key: np.ascontiguousarray(value) for key, value in out.items()}


__all__ = [
    "build_model",
    "config_from_transformers",
    "config_to_transformers",
    "convert_from_jax",
    "convert_from_timm",
    "convert_from_transformers",
    "convert_to_jax",
    "convert_to_transformers",
    "expected_shapes",
    "resample_position_embeddings",
    "resize_state_dict",
]
