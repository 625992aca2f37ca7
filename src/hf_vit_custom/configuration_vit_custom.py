"""Configuration of the Vision Transformer (Dosovitskiy et al., 2020, arXiv 2010.11929)."""

import re

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneConfigMixin

# Width, depth, heads and MLP size of the paper's Table 1 plus DeiT's Tiny and Small.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 192, "num_hidden_layers": 12, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
    "huge": {"hidden_size": 1280, "num_hidden_layers": 32, "num_attention_heads": 16, "intermediate_size": 5120},
}
# The knobs that make each family of the public ViT zoo, on top of a size of `MODEL_SIZES` (or of the family's own
# sizes). The values are those of the families' reference implementations (timm's `vision_transformer.py`,
# transformers' `dinov2`, `siglip` and `clip` models).
FAMILY_KNOBS: dict[str, dict] = {
    "vit": {},
    "deit": {},
    "deit3": {"layer_scale_init_value": 1e-6, "no_embed_class": True},
    "dinov2": {"layer_scale_init_value": 1e-5},
    "siglip": {"class_token": False, "pooling": "map", "hidden_act": "gelu_pytorch_tanh"},
    "clip-vit": {
        "pre_norm": True,
        "patch_embedding_bias": False,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "fc_norm": True,
    },
}
FAMILY_SIZES: dict[str, dict[str, dict]] = {
    "dinov2": {
        "giant": {
            "hidden_size": 1536,
            "num_hidden_layers": 40,
            "num_attention_heads": 24,
            "intermediate_size": 4096,
            "mlp_type": "glu",
            "hidden_act": "silu",
        }
    },
    "siglip": {
        "so400m": {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "intermediate_size": 4304}
    },
}
PRESET_PATTERN = re.compile(
    r"(?P<family>vit|deit3|deit|dinov2|siglip|clip-vit)-(?P<size>[a-z0-9]+)(?P<distilled>-distilled)?"
    r"(?:-reg(?P<registers>\d+))?-patch(?P<patch>\d+)(?:-(?P<image>\d+))?"
)
# Image representations: the class token, the mean of the patch tokens, both concatenated (DINOv2's linear head),
# a learned query attending over the tokens (multi-head attention pooling, SigLIP's head and timm's "map"), or none.
POOLINGS = ("cls", "mean", "cls_mean", "map", "none")
MLP_TYPES = ("mlp", "glu")


def to_pair(value: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    """Return `(height, width)` for a size given as one int or as a pair."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


@strict(accept_kwargs=True)
class ViTCustomConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`ViTCustomModel`]. The defaults give ViT-B/16 at 224x224.

    Args:
        image_size (`int` or `(height, width)`, defaults to 224): resolution the position embeddings are learned for.
        patch_size (`int` or `(height, width)`, defaults to 16): side of the square (or rectangular) patches.
        num_channels (`int`, defaults to 3): channels of the input images.
        hidden_size (`int`, defaults to 768): width D of the token embeddings.
        num_hidden_layers (`int`, defaults to 12): number of encoder layers.
        num_attention_heads (`int`, defaults to 12): attention heads per layer; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 3072): hidden width of the MLP.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation, any key of `transformers.activations.ACT2FN`.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout after the embeddings, the attention output and the MLP.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on the attention probabilities.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth rate of the last layer, linearly increasing from 0.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm (1e-6 as in the JAX release and timm).
        qkv_bias (`bool`, defaults to `True`): add a bias to the fused query/key/value projection.
        initializer_range (`float`, defaults to 0.02): standard deviation of the truncated-normal initialisation.
        class_token (`bool`, defaults to `True`): prepend a learned class token (off in SigLIP and timm's `gap`
            models, which pool otherwise).
        num_register_tokens (`int`, defaults to 0): learned register tokens after the class token (Darcet et al.,
            2023, arXiv 2309.16588; timm's `reg_tokens`).
        distillation_token (`bool`, defaults to `False`): DeiT's distillation token after the class token; the
            classifier then averages a head on each, as DeiT does at inference.
        no_embed_class (`bool`, defaults to `False`): give the prefix tokens (class, distillation, register) no
            position embeddings, only the patches (timm's name; DeiT-III and timm's register models).
        pooling (`str`, defaults to `"cls"`): image representation, the class token (`"cls"`), the mean of the
            patch tokens (`"mean"`), both concatenated (`"cls_mean"`, DINOv2's linear head), multi-head attention
            pooling with a learned query, then a LayerNorm and an MLP (`"map"`, SigLIP's head, timm's `map`), or
            none (`"none"`: `pooler_output` is `None`, the encoder only).
        fc_norm (`bool`, defaults to `False`): apply the final LayerNorm to the pooled representation instead of to
            every token (timm's `fc_norm`; transformers' CLIP, whose `last_hidden_state` is not normalised).
        final_norm (`bool`, defaults to `True`): have the final LayerNorm at all (timm's `final_norm`; off in RADIO and
            InternViT).
        layer_scale_init_value (`float`, *optional*): initial value of a learned per-channel scale on each residual
            branch (CaiT's LayerScale, used by DeiT-III and DINOv2; timm's `init_values`); `None` for none.
        qk_norm (`bool`, defaults to `False`): LayerNorm the queries and keys of each head before attention.
        mlp_type (`str`, defaults to `"mlp"`): `"mlp"` (Linear, `hidden_act`, Linear) or `"glu"`, a gated MLP
            `hidden_act(x W_gate) * (x W_up)` of `intermediate_size` channels, SwiGLU with `hidden_act="silu"`
            (DINOv2 giant; timm's `SwiGLUPacked`).
        pre_norm (`bool`, defaults to `False`): a LayerNorm on the embeddings before the first layer (CLIP's
            `pre_layrnorm`, timm's `norm_pre`).
        patch_embedding_bias (`bool`, defaults to `True`): add a bias to the patch projection (CLIP has none).
        interpolate_pos_encoding (`bool`, defaults to `False`): resample position embeddings to the input size by
            default, so that models trained with `Trainer` accept other resolutions without a forward argument.
        interpolate_antialias (`bool`, defaults to `False`): resample them with an antialiasing bicubic filter, as
            timm and DINOv2 with registers do (transformers' ViT does not); the same when upsampling.
        mask_ratio (`float`, defaults to 0.75): share of the patches that masked-image-modeling pre-training (MAE,
            He et al., 2021, arXiv 2111.06377) hides from the encoder; must lie in (0, 1).
        decoder_hidden_size (`int`, defaults to 512): width of the MAE decoder; must be divisible by 4 for its
            2-D sine-cosine position embeddings.
        decoder_num_hidden_layers (`int`, defaults to 8): layers of the MAE decoder.
        decoder_num_attention_heads (`int`, defaults to 16): attention heads of the MAE decoder; must divide
            `decoder_hidden_size`.
        decoder_intermediate_size (`int`, defaults to 2048): hidden width of the MAE decoder's MLP.
        norm_pix_loss (`bool`, defaults to `True`): reconstruct each patch's pixels normalised by the patch's own
            mean and variance, which the paper finds gives better representations.
        out_features (`list[str]`, *optional*) / out_indices (`list[int]`, *optional*): the stages a
            [`ViTCustomBackbone`] returns as feature maps, as transformers' backbone API names them: `"stem"` (the
            embeddings) and `"stage1"` ... `"stageN"` (the layers); the last stage by default.

    Example:

    ```python
    >>> from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
    >>> config = ViTCustomConfig.from_preset("vit-small-patch16-224", num_labels=10)
    >>> model = ViTCustomForImageClassification(config)
    ```
    """

    model_type = "vit_custom"

    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    initializer_range: float = 0.02
    class_token: bool = True
    num_register_tokens: int = 0
    distillation_token: bool = False
    no_embed_class: bool = False
    pooling: str = "cls"
    fc_norm: bool = False
    final_norm: bool = True
    layer_scale_init_value: float | None = None
    qk_norm: bool = False
    mlp_type: str = "mlp"
    pre_norm: bool = False
    patch_embedding_bias: bool = True
    interpolate_pos_encoding: bool = False
    interpolate_antialias: bool = False
    # Masked image modeling (MAE); the classifier and the bare encoder ignore these. Defaults are the paper's.
    mask_ratio: float = 0.75
    decoder_hidden_size: int = 512
    decoder_num_hidden_layers: int = 8
    decoder_num_attention_heads: int = 16
    decoder_intermediate_size: int = 2048
    norm_pix_loss: bool = True
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        # JSON turns tuples into lists; keep one spelling so that configs compare equal after a round trip.
        if not isinstance(self.image_size, int):
            self.image_size = list(self.image_size)
        if not isinstance(self.patch_size, int):
            self.patch_size = list(self.patch_size)
        self.stage_names = self.backbone_stage_names()
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)
        # Check here too so that a bad value raises a plain `ValueError` at construction time; `validate()` runs
        # the same check again when the config is saved.
        self.validate_vit_values()

    def backbone_stage_names(self) -> list[str]:
        """The backbone API's stages: the embeddings (`"stem"`), then each layer."""
        return ["stem"] + [f"stage{index}" for index in range(1, self.num_hidden_layers + 1)]

    def validate_vit_values(self):
        """Reject values the architecture cannot be built with, naming the field and the rule."""
        if self.stage_names != self.backbone_stage_names():
            # The depth changed after construction (`--config_overrides`, `update`): the default last stage follows
            # it; stages the user chose are checked against the new depth.
            chosen = None if self._out_features == [self.stage_names[-1]] else self._out_features
            self.stage_names = self.backbone_stage_names()
            self.set_output_features_output_indices(out_features=chosen, out_indices=None)
        for name in ("image_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) and len(value) != 2:
                raise ValueError(f"`{name}` must be an int or a (height, width) pair, got {value!r}.")
            if any(isinstance(side, bool) or side <= 0 for side in to_pair(value)):
                raise ValueError(f"`{name}` must be positive, got {value!r}.")
        for name in ("num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` is a probability and must lie in [0, 1), got {value!r}.")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}.")
        if self.initializer_range < 0:
            raise ValueError(f"`initializer_range` must be non-negative, got {self.initializer_range!r}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        image_height, image_width = to_pair(self.image_size)
        patch_height, patch_width = to_pair(self.patch_size)
        # A remainder is allowed: the strided patch projection drops the pixels past the last full patch, as in timm
        # and transformers (SigLIP's so400m/14 runs at 384 px, a 27x27 grid).
        if image_height < patch_height or image_width < patch_width:
            raise ValueError(
                f"`image_size` {self.image_size!r} must hold at least one patch of `patch_size` {self.patch_size!r} "
                "along both height and width."
            )
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` {self.hidden_act!r} is unknown; choose one of {sorted(ACT2FN)}.")
        if self.pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.mlp_type not in MLP_TYPES:
            raise ValueError(f"`mlp_type` must be one of {MLP_TYPES}, got {self.mlp_type!r}.")
        if isinstance(self.num_register_tokens, bool) or self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be a non-negative integer, got {self.num_register_tokens!r}.")
        if not self.class_token and (self.pooling in ("cls", "cls_mean") or self.distillation_token):
            needs = f"`pooling={self.pooling!r}`" if self.pooling in ("cls", "cls_mean") else "`distillation_token`"
            raise ValueError(f"{needs} needs the class token: set `class_token=True` or choose another pooling.")
        if self.distillation_token and self.pooling != "cls":
            raise ValueError(f"`distillation_token` pairs with `pooling='cls'` (DeiT), got {self.pooling!r}.")
        if self.fc_norm and self.pooling == "none":
            raise ValueError("`fc_norm=True` normalises the pooled representation, and `pooling='none'` has none.")
        if self.fc_norm and not self.final_norm:
            raise ValueError("`fc_norm=True` moves the final LayerNorm after pooling and needs `final_norm=True`.")
        if self.layer_scale_init_value is not None and not self.layer_scale_init_value > 0:
            raise ValueError(
                f"`layer_scale_init_value` must be positive, or None for no layer scale, got "
                f"{self.layer_scale_init_value!r}."
            )
        # Masked image modeling: a buildable decoder, and a mask ratio that hides some patches and shows others.
        decoder_fields = (
            "decoder_hidden_size",
            "decoder_num_hidden_layers",
            "decoder_num_attention_heads",
            "decoder_intermediate_size",
        )
        for name in decoder_fields:
            value = getattr(self, name)
            if isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.decoder_hidden_size % self.decoder_num_attention_heads != 0:
            raise ValueError(
                f"`decoder_hidden_size` ({self.decoder_hidden_size}) must be divisible by "
                f"`decoder_num_attention_heads` ({self.decoder_num_attention_heads})."
            )
        if self.decoder_hidden_size % 4 != 0:
            raise ValueError(
                f"`decoder_hidden_size` ({self.decoder_hidden_size}) must be divisible by 4: the decoder's 2-D "
                "sine-cosine position embeddings give a quarter of the channels each to sin and cos of row and column."
            )
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"`mask_ratio` must lie strictly between 0 and 1, got {self.mask_ratio!r}.")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "ViTCustomConfig":
        """Refuse another model's config: its fields would be ignored and a default ViT built in its place."""
        model_type = config_dict.get("model_type")
        if model_type not in (None, cls.model_type):
            raise ValueError(
                f"The config is of `model_type` {model_type!r}, not {cls.model_type!r}; convert the checkpoint with "
                "`scripts/convert_checkpoint.py` or load it with its own class."
            )
        return super().from_dict(config_dict, **kwargs)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches (timm's name): class, distillation and register tokens, in that order."""
        return int(self.class_token) + int(self.distillation_token) + self.num_register_tokens

    @property
    def num_prefix_positions(self) -> int:
        """Prefix tokens that have a position embedding: all of them, or none with `no_embed_class`."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def pooled_size(self) -> int:
        """Width of `pooler_output`, the classifier's input."""
        return 2 * self.hidden_size if self.pooling == "cls_mean" else self.hidden_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along height and width at the configured `image_size` (pixels past the last full patch drop)."""
        image_height, image_width = to_pair(self.image_size)
        patch_height, patch_width = to_pair(self.patch_size)
        return image_height // patch_height, image_width // patch_width

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "ViTCustomConfig":
        """Build a named model: `FAMILY-SIZE[-distilled][-regN]-patchP[-RESOLUTION]`, e.g. `vit-small-patch16-224`,
        `deit-base-distilled-patch16-224`, `deit3-base-patch16-224`, `dinov2-base-reg4-patch14-518`,
        `siglip-base-patch16-224` or `clip-vit-base-patch16` (224 unless given).

        FAMILY is one of `FAMILY_KNOBS`, SIZE one of `MODEL_SIZES` or the family's own (`dinov2-giant`,
        `siglip-so400m`). `-regN` adds N register tokens without position embeddings (as DINOv2 and timm do).
        Keyword arguments override the preset (`num_labels=10`, `drop_path_rate=0.1`, ...).
        """
        match = PRESET_PATTERN.fullmatch(name)
        sizes = {**MODEL_SIZES, **FAMILY_SIZES.get(match["family"], {})} if match else MODEL_SIZES
        if match is None or match["size"] not in sizes or (match["distilled"] and match["family"] != "deit"):
            raise ValueError(
                f"Unknown preset {name!r}: expected 'FAMILY-SIZE-patchP-RESOLUTION' with FAMILY one of "
                f"{list(FAMILY_KNOBS)} and SIZE one of {list(MODEL_SIZES)} (e.g. 'vit-base-patch16-224', "
                "'dinov2-small-reg4-patch14-518'); '-distilled' belongs to 'deit' only."
            )
        preset = {
            **FAMILY_KNOBS[match["family"]],
            **sizes[match["size"]],
            "patch_size": int(match["patch"]),
            "image_size": int(match["image"] or 224),
        }
        if match["distilled"]:
            preset["distillation_token"] = True
        if match["registers"]:
            preset |= {"num_register_tokens": int(match["registers"]), "no_embed_class": True}
        return cls(**{**preset, **kwargs})


__all__ = ["FAMILY_KNOBS", "MODEL_SIZES", "ViTCustomConfig"]
