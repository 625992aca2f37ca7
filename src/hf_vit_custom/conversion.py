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
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from .configuration_vit_custom import MODEL_SIZES, ViTCustomConfig, to_pair
from .modeling_vit_custom import ViTCustomForImageClassification, ViTCustomModel, resample_patch_positions

logger = logging.getLogger(__name__)

# The LayerNorm epsilon of the JAX release and of timm (flax and timm both default to 1e-6).
JAX_TIMM_LAYER_NORM_EPS = 1e-6

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


def _check_keys(source: str, keys: Iterable[str], required: Iterable[str], optional: Iterable[str] = ()) -> None:
    """Raise one `ValueError` listing every missing and every unknown key."""
    keys, required = set(keys), list(required)
    missing = [key for key in required if key not in keys]
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


def _finalize(source: str, config: ViTCustomConfig, base: dict[str, torch.Tensor], head: dict[str, torch.Tensor]):
    """Add the `vit.` prefix when there is a head, then compare every shape with the model's."""
    state_dict = {f"vit.{key}": value for key, value in base.items()} | head if head else dict(base)
    expected = expected_shapes(config, with_head=bool(head))
    _check_keys(source, state_dict, expected)
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
# transformers ViT
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

# transformers 5.x layer -> ours; a pure rename (same `nn.Linear` / `nn.LayerNorm` layout), except q/k/v (below).
TRANSFORMERS_LAYER_RENAMES = {
    "layernorm_before": "norm1",  # pre-attention LayerNorm
    "attention.o_proj": "attention.proj",
    "layernorm_after": "norm2",  # pre-MLP LayerNorm
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Keys outside the layers that keep their name.
TRANSFORMERS_SHARED_KEYS = (
    "embeddings.cls_token",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias",
    "layernorm.weight",
    "layernorm.bias",
)
TRANSFORMERS_UNSUPPORTED = (
    (r"(^|\.)embeddings\.mask_token$", "mask token (ViTForMaskedImageModeling)"),
    (r"^decoder\.", "masked-image-modeling decoder"),
)


def _transformers_config_dict(vit_config: Any) -> dict[str, Any]:
    return vit_config.to_dict() if hasattr(vit_config, "to_dict") else dict(vit_config)


def config_from_transformers(vit_config: Any, num_labels: int | None = None) -> ViTCustomConfig:
    """`ViTConfig` (or its dict) -> `ViTCustomConfig`; every architectural field is copied as it is.

    `layer_norm_eps` in particular keeps transformers' default of 1e-12 (ours is 1e-6): the outputs would differ
    otherwise. `num_labels` is the head's width; labels come from `id2label` when it has that many entries.
    """
    source = _transformers_config_dict(vit_config)
    kwargs = {name: source[name] for name in SHARED_CONFIG_FIELDS if name in source}
    id2label = source.get("id2label")
    if num_labels is not None:
        kwargs |= _label_kwargs(num_labels, id2label if id2label and len(id2label) == num_labels else None)
    return ViTCustomConfig(**kwargs, pooling="cls")


def convert_from_transformers(
    state_dict: Mapping[str, torch.Tensor], vit_config: Any, pooler: str = "drop"
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """transformers ViT state dict (new or old layout, with or without the `vit.` prefix) + its `ViTConfig` -> ours.

    `ViTModel`'s pooler (dense + tanh on the class token) has no counterpart in `ViTCustom`, whose `pooler_output`
    is the class token itself: with `pooler="drop"` (the default) its weights are dropped and a warning logged, with
    `pooler="error"` the conversion refuses.
    """
    if pooler not in ("drop", "error"):
        raise ValueError(f"`pooler` must be 'drop' or 'error', got {pooler!r}.")
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in TRANSFORMERS_OLD_TO_NEW:
            key = re.sub(pattern, replacement, key)
        renamed[key] = value
    _check_unsupported("transformers ViT", renamed, TRANSFORMERS_UNSUPPORTED)
    # ViTForImageClassification nests the encoder under `vit.`; a bare ViTModel has no prefix.
    prefix = "vit." if any(key.startswith("vit.") for key in renamed) else ""
    tensors = {key.removeprefix(prefix): value for key, value in renamed.items()}

    pooler_keys = [key for key in ("pooler.dense.weight", "pooler.dense.bias") if key in tensors]
    if pooler_keys:
        if pooler == "error":
            raise ValueError(
                f"The checkpoint has a pooler ({pooler_keys}: dense + tanh on the class token) and ViTCustom has "
                "none; convert with pooler='drop' to keep only the encoder."
            )
        logger.warning(
            "Dropping transformers' ViT pooler %s: ViTCustom has no pooler, its `pooler_output` is the class token "
            "after the final LayerNorm (`last_hidden_state` is unaffected).",
            pooler_keys,
        )
    has_head = "classifier.weight" in tensors
    num_layers = _num_layers(tensors, r"layers\.(\d+)\.")
    qkv_bias = "layers.0.attention.q_proj.bias" in tensors
    layer_keys = [
        f"{old}.{p}"
        for old in (*TRANSFORMERS_LAYER_RENAMES, "attention.q_proj", "attention.k_proj", "attention.v_proj")
        for p in ("weight", "bias")
    ]
    if not qkv_bias:
        layer_keys = [key for key in layer_keys if not re.fullmatch(r"attention\.[qkv]_proj\.bias", key)]
    required = [*TRANSFORMERS_SHARED_KEYS, *(f"layers.{i}.{key}" for i in range(num_layers) for key in layer_keys)]
    if has_head:
        required += ["classifier.weight", "classifier.bias"]
    _check_keys("transformers ViT", tensors, required, optional=pooler_keys)

    config = config_from_transformers(
        vit_config, num_labels=tensors["classifier.weight"].shape[0] if has_head else None
    )
    if config.num_hidden_layers != num_layers or config.qkv_bias != qkv_bias:
        raise ValueError(
            f"The config says {config.num_hidden_layers} layers and qkv_bias={config.qkv_bias}, the weights have "
            f"{num_layers} layers and qkv_bias={qkv_bias}."
        )
    base = {key: tensors[key] for key in TRANSFORMERS_SHARED_KEYS}
    for i in range(num_layers):
        for old, new in TRANSFORMERS_LAYER_RENAMES.items():
            for p in ("weight", "bias"):
                base[f"layers.{i}.{new}.{p}"] = tensors[f"layers.{i}.{old}.{p}"]
        # Fusion: our qkv is one Linear whose output rows are [q; k; v], each block heads-major (head h owns rows
        # h * head_dim ... (h + 1) * head_dim), which is exactly how q_proj/k_proj/v_proj order their rows.
        for p in ("weight", "bias") if qkv_bias else ("weight",):
            base[f"layers.{i}.attention.qkv.{p}"] = torch.cat(
                [tensors[f"layers.{i}.attention.{name}_proj.{p}"] for name in "qkv"], dim=0
            )
    head = {key: tensors[key] for key in ("classifier.weight", "classifier.bias")} if has_head else {}
    return _finalize("transformers ViT", config, base, head)


def config_to_transformers(config: ViTCustomConfig, with_head: bool) -> dict[str, Any]:
    """`ViTCustomConfig` -> keyword arguments of transformers' `ViTConfig`."""
    if config.pooling != "cls":
        raise ValueError(f"transformers' ViT pools the class token; pooling={config.pooling!r} has no equivalent.")
    kwargs = {name: getattr(config, name) for name in SHARED_CONFIG_FIELDS}
    if with_head:
        kwargs |= {"id2label": dict(config.id2label), "label2id": dict(config.label2id)}
    return kwargs


def convert_to_transformers(
    config: ViTCustomConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Ours -> transformers 5.x `ViTForImageClassification` keys (with a head) or `ViTModel` keys without a pooler
    (`add_pooling_layer=False`); returns `ViTConfig` keyword arguments and the state dict."""
    base, head = _split_head(state_dict)
    _finalize("ViTCustom", config, base, head)  # validates keys and shapes
    hidden = config.hidden_size
    out = {key: base[key] for key in TRANSFORMERS_SHARED_KEYS}
    for i in range(config.num_hidden_layers):
        for old, new in TRANSFORMERS_LAYER_RENAMES.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{old}.{p}"] = base[f"layers.{i}.{new}.{p}"]
        # Split: the inverse of the fusion above, rows [0, D) are q, [D, 2D) k, [2D, 3D) v.
        for p in ("weight", "bias") if config.qkv_bias else ("weight",):
            for name, part in zip("qkv", base[f"layers.{i}.attention.qkv.{p}"].split(hidden, dim=0), strict=True):
                out[f"layers.{i}.attention.{name}_proj.{p}"] = part.contiguous()
    if head:
        out = {f"vit.{key}": value for key, value in out.items()} | head
    return config_to_transformers(config, with_head=bool(head)), out


# ---------------------------------------------------------------------------------------------------------------------
# timm VisionTransformer
# ---------------------------------------------------------------------------------------------------------------------

# timm -> ours, a pure rename: timm's `Attention` reshapes its fused qkv output to (batch, tokens, 3, heads,
# head_dim), the same [q; k; v], heads-major row order as ours, and every Linear / LayerNorm / Conv2d is laid out as
# ours (see timm/models/vision_transformer.py in huggingface/pytorch-image-models).
TIMM_RENAMES = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.": "embeddings.patch_embeddings.projection.",
    "norm.": "layernorm.",
    "head.": "classifier.",
}
TIMM_LAYER_RENAMES = {  # blocks.{i}.X -> layers.{i}.Y
    "norm1": "norm1",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Parameters of timm options that change the computation and that ViTCustom does not implement.
TIMM_UNSUPPORTED = (
    (r"^reg_token$", "register tokens (reg_token)"),
    (r"^dist_token$", "distillation token (DeiT dist_token)"),
    (r"\.ls[12]\.gamma$", "layer scale (ls1/ls2.gamma)"),
    (r"^fc_norm\.", "fc_norm (average pooling head norm)"),
    (r"\.attn\.[qk]_norm\.", "qk_norm"),
    (r"^norm_pre\.", "pre-norm (norm_pre)"),
    (r"^attn_pool\.", "attention pooling (attn_pool)"),
    (r"^patch_embed\.norm\.", "patch embedding norm"),
    (r"\.attn\.norm\.", "attention output norm (scale_attn_norm)"),
    (r"\.mlp\.norm\.", "MLP norm (scale_mlp_norm)"),
    (r"\.mlp\.fc1_[gx]\.|\.mlp\.w12\.", "gated MLP (SwiGLU)"),
    (r"^pre_logits\.", "pre-logits layer (representation_size)"),
    (r"\.attn\.(q|k|v)_bias$", "separate q/v biases"),
)


def heads_for_width(hidden_size: int) -> int:
    """Heads of the standard ViT / DeiT size of this width (timm state dicts do not store the head count)."""
    for size in MODEL_SIZES.values():
        if size["hidden_size"] == hidden_size:
            return size["num_attention_heads"]
    raise ValueError(f"No standard ViT size has width {hidden_size}: pass `num_heads`.")


def convert_from_timm(
    state_dict: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    image_size: int | tuple[int, int] | None = None,
    hidden_act: str = "gelu",
    layer_norm_eps: float = JAX_TIMM_LAYER_NORM_EPS,
    id2label: Mapping | None = None,
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """timm `VisionTransformer` (class token, learned position embeddings, `global_pool='token'`) -> ours.

    The state dict does not store the head count (default: that of the standard size of this width) nor, for
    non-square grids, the image size; pass them when they differ. Variants ViTCustom cannot express raise a
    `ValueError` naming the feature.
    """
    keys = list(state_dict)
    _check_unsupported("timm", keys, TIMM_UNSUPPORTED)
    if "cls_token" not in state_dict:
        raise ValueError("Unsupported timm variant: no class token (class_token=False); ViTCustom needs one.")
    if "pos_embed" not in state_dict:
        raise ValueError("Unsupported timm variant: no learned position embeddings (pos_embed).")
    if "patch_embed.proj.weight" not in state_dict:
        _check_keys("timm", keys, ["patch_embed.proj.weight"], keys)
    hidden_size, num_channels, *patch_size = state_dict["patch_embed.proj.weight"].shape
    positions = state_dict["pos_embed"].shape[1]
    if image_size is None and math.isqrt(positions) ** 2 == positions:
        raise ValueError(
            "Unsupported timm variant: no_embed_class (pos_embed has no row for the class token); pass `image_size` "
            "if this is a non-square grid with a class token."
        )
    if image_size is None:
        image_size = _square_grid(positions - 1, tuple(patch_size), "timm")
    image_size = to_pair(image_size)
    grid = (image_size[0] // patch_size[0], image_size[1] // patch_size[1])
    if positions == grid[0] * grid[1]:
        raise ValueError("Unsupported timm variant: no_embed_class (pos_embed has no row for the class token).")

    num_layers = _num_layers(keys, r"blocks\.(\d+)\.")
    qkv_bias = "blocks.0.attn.qkv.bias" in state_dict
    has_head = "head.weight" in state_dict
    layer_keys = [f"{old}.{p}" for old in TIMM_LAYER_RENAMES for p in ("weight", "bias")]
    if not qkv_bias:
        layer_keys.remove("attn.qkv.bias")
    required = [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
        "norm.weight",
        "norm.bias",
    ]
    required += [f"blocks.{i}.{key}" for i in range(num_layers) for key in layer_keys]
    if has_head:
        required += ["head.weight", "head.bias"]
    _check_keys("timm", keys, required)

    num_labels = state_dict["head.weight"].shape[0] if has_head else None
    config = ViTCustomConfig(
        image_size=list(image_size),
        patch_size=list(patch_size) if patch_size[0] != patch_size[1] else patch_size[0],
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads or heads_for_width(hidden_size),
        intermediate_size=state_dict["blocks.0.mlp.fc1.weight"].shape[0],
        hidden_act=hidden_act,
        layer_norm_eps=layer_norm_eps,
        qkv_bias=qkv_bias,
        pooling="cls",
        **(_label_kwargs(num_labels, id2label) if has_head else {}),
    )
    converted = {}
    for key, value in state_dict.items():
        if match := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias)$", key):
            converted[f"layers.{match[1]}.{TIMM_LAYER_RENAMES[match[2]]}.{match[3]}"] = value
        else:
            old = next(old for old in TIMM_RENAMES if key == old or (old.endswith(".") and key.startswith(old)))
            converted[TIMM_RENAMES[old] + key.removeprefix(old)] = value
    base, head = _split_head(converted)
    return _finalize("timm", config, base, head)


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
    layer_norm_eps: float = JAX_TIMM_LAYER_NORM_EPS,
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
