"""PyTorch Vision Transformer (Dosovitskiy et al., 2020, arXiv 2010.11929) as a transformers model.

The forward passes follow the paper's equations:

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          (1)  ViTCustomEmbeddings.forward
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                       (2)  ViTCustomEncoderLayer.forward
    z_l = MLP(LN(z'_l)) + z'_l                              (3)  ViTCustomEncoderLayer.forward
    y = LN(z_L)                                             (4)  ViTCustomModel.encode (then the pooler)

The tokens in front of the patches (`x_class` here) are the prefix tokens, `config.num_prefix_tokens` of them, as
timm names them: the class token, DeiT's distillation token and register tokens, each optional. The later members of
the family are knobs of the same equations, the optional modules built as `nn.Identity` when off so that the layers'
forwards never branch on them: layer scale on the residual branches (DeiT-III, DINOv2), qk-norm, a gated MLP
(SwiGLU), a LayerNorm before the first layer (CLIP), the final LayerNorm after pooling instead of on every token
(`fc_norm`), and attention pooling (SigLIP, timm's `map`). This file holds the paper and its knobs only: speed-ups
for particular hardware live in `cpu_speed.py`, applied to a built model, never needed here. It is
self-contained apart from `configuration_vit_custom.py`, because `trust_remote_code` ships exactly those files (and
`modeling_vit_custom_mae.py` with a masked-autoencoder folder).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_vit_custom import ViTCustomConfig, to_pair

# Written into every saved config, so that a user without this package can load the folder as an encoder or as a
# classifier with `trust_remote_code=True`, whichever class saved it (a masked-autoencoder save adds its own entry).
AUTO_MAP = {
    "AutoConfig": "configuration_vit_custom.ViTCustomConfig",
    "AutoModel": "modeling_vit_custom.ViTCustomModel",
    "AutoModelForImageClassification": "modeling_vit_custom.ViTCustomForImageClassification",
}
# Files a save writes that a later save in the same folder must replace or remove, so that no stale shard outlives it.
WEIGHT_FILE_PATTERN = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
)


def resample_patch_positions(
    position_embeddings: torch.Tensor,
    num_prefix_tokens: int,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    antialias: bool = False,
) -> torch.Tensor:
    """Resample the patch part of `(1, prefix + old_h * old_w, hidden)` position embeddings bicubically to `new_grid`.

    The prefix tokens' positions have no place on the grid and are kept as they are. Works on the (height, width)
    grid, so non-square trained and target sizes both resample without transposing. `antialias` as timm does.
    """
    if tuple(new_grid) == tuple(old_grid):
        return position_embeddings
    prefix_positions = position_embeddings[:, :num_prefix_tokens]
    patch_positions = position_embeddings[:, num_prefix_tokens:]
    hidden_size = patch_positions.shape[-1]
    # (1, patches, hidden) -> (1, hidden, old_height, old_width)
    patch_positions = patch_positions.reshape(1, *old_grid, hidden_size).permute(0, 3, 1, 2)
    patch_positions = nn.functional.interpolate(
        patch_positions.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=antialias
    ).to(position_embeddings.dtype)
    # (1, hidden, new_height, new_width) -> (1, new_height * new_width, hidden)
    patch_positions = patch_positions.flatten(2).transpose(1, 2)
    return torch.cat((prefix_positions, patch_positions), dim=1)


def pool(tokens: torch.Tensor, pooling: str, num_prefix_tokens: int) -> torch.Tensor:
    """The image representation from `(..., tokens, features)`: the class token (`"cls"`), the mean of the patch
    tokens (`"mean"`), or both concatenated (`"cls_mean"`, DINOv2's linear head).

    Mean pooling skips the prefix tokens: they are not image patches, and averaging them in would mix learned
    constants into the image representation. Serves the encoder's output and, row-wise, attention matrices.
    """
    if pooling == "mean":
        return tokens[..., num_prefix_tokens:, :].mean(dim=-2)
    if pooling == "cls_mean":
        return torch.cat((tokens[..., 0, :], tokens[..., num_prefix_tokens:, :].mean(dim=-2)), dim=-1)
    return tokens[..., 0, :]


class ViTCustomPatchEmbeddings(nn.Module):
    """Cuts the image into patches and projects each to `hidden_size` (the paper's E, a strided convolution)."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.patch_size = to_pair(config.patch_size)
        self.projection = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=config.patch_embedding_bias,
        )

    def grid(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        """Patches along height and width of `pixel_values` (pixels past the last full patch drop)."""
        return pixel_values.shape[2] // self.patch_size[0], pixel_values.shape[3] // self.patch_size[1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, channels, height, width) -> (batch, patches, hidden); rows and columns past the last patch drop."""
        pixel_values = pixel_values.to(self.projection.weight.dtype)  # float32 images into a bf16 model
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTCustomEmbeddings(nn.Module):
    """Eq. 1: prefix tokens (class, distillation, registers), patch embeddings and learned position embeddings.

    The prefix tokens get position embeddings unless `config.no_embed_class`; only the patches' are resampled.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.grid_size = config.grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.num_prefix_positions = config.num_prefix_positions
        self.interpolate_antialias = config.interpolate_antialias
        self.patch_embeddings = ViTCustomPatchEmbeddings(config)
        hidden_size = config.hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if config.class_token else None
        self.distillation_token = nn.Parameter(torch.zeros(1, 1, hidden_size)) if config.distillation_token else None
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, config.num_register_tokens, hidden_size))
            if config.num_register_tokens
            else None
        )
        num_positions = self.num_prefix_positions + self.grid_size[0] * self.grid_size[1]
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """The position embeddings for a `grid_height` x `grid_width` grid: the learned ones at the trained size."""
        return resample_patch_positions(
            self.position_embeddings,
            self.num_prefix_positions,
            self.grid_size,
            (grid_height, grid_width),
            self.interpolate_antialias,
        )

    def prefix_parameters(self) -> list[nn.Parameter]:
        """The prefix tokens' parameters in sequence order: class, distillation, registers."""
        tokens = (self.cls_token, self.distillation_token, self.register_tokens)
        return [token for token in tokens if token is not None]

    def prefix_and_patch_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 1 before the concatenation: `(batch, prefix, hidden)` and `(batch, patches, hidden)`, positions added.

        Kept apart so that masked image modeling can drop patch tokens after their positions are added.
        """
        grid = self.patch_embeddings.grid(pixel_values)
        positions = self.interpolate_pos_encoding(*grid)  # (1, prefix positions + patches, hidden)
        patch_tokens = self.patch_embeddings(pixel_values) + positions[:, self.num_prefix_positions :]
        prefix = self.prefix_parameters()
        if not prefix:  # SigLIP, timm's `class_token=False`: nothing in front of the patches
            return patch_tokens[:, :0], patch_tokens
        prefix_tokens = torch.cat(prefix, dim=1)  # (1, prefix, hidden)
        if self.num_prefix_positions:  # decided by `config.no_embed_class`
            prefix_tokens = prefix_tokens + positions[:, : self.num_prefix_positions]
        return prefix_tokens.expand(pixel_values.shape[0], -1, -1), patch_tokens

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        prefix_tokens, patch_tokens = self.prefix_and_patch_tokens(pixel_values)
        return self.dropout(torch.cat((prefix_tokens, patch_tokens), dim=1))  # (batch, prefix + patches, hidden)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(d)) v, returning the attention probabilities too (the only backend that can).

    The scale is applied to the queries (tokens x head_dim) rather than to the scores (tokens x tokens), and the
    softmax runs in the input's dtype (PyTorch accumulates half-precision softmax in fp32 anyway): two passes over the
    score matrix fewer.
    """
    attn_weights = torch.matmul(query * scaling, key.transpose(-2, -1))  # (batch, heads, tokens, tokens)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=query.dtype)  # also under CUDA autocast
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)  # (batch, tokens, heads, head_dim)
    return attn_output, attn_weights


class ViTCustomSelfAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection.

    The backend (eager, SDPA, flash, flex, or one registered with transformers' `AttentionInterface`) comes from the
    registry through `config._attn_implementation`. When attention weights are requested the eager path runs for that
    call, since the fused kernels never materialise them; outputs are the same either way.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_probs_dropout_prob
        self.is_causal = False  # read by transformers' SDPA and flash backends
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        head_norm = (lambda: nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)) if config.qk_norm else nn.Identity
        self.q_norm, self.k_norm = head_norm(), head_norm()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, hidden_size = hidden_states.shape
        # (batch, tokens, 3 * hidden) -> 3 x (batch, heads, tokens, head_dim)
        qkv = self.qkv(hidden_states).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query, key = self.q_norm(query), self.k_norm(key)  # qk-norm, per head

        attention_interface = eager_attention_forward
        if not kwargs.get("output_attentions", self.config.output_attentions):
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        attn_output = attn_output.reshape(batch_size, num_tokens, hidden_size)  # (batch, tokens, hidden)
        return self.proj(attn_output), attn_weights


class ViTCustomMLP(nn.Module):
    """Linear - activation - Dropout - Linear - Dropout (no activation after the second linear layer)."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.activation(self.fc1(hidden_states)))  # (batch, tokens, intermediate)
        return self.dropout(self.fc2(hidden_states))


class ViTCustomGatedMLP(nn.Module):
    """Gated linear unit MLP: `activation(x W_gate) * (x W_up)`, then Linear; SwiGLU with `hidden_act="silu"`.

    The gate and up projections are one packed Linear (gate rows first, as timm's `SwiGLUPacked`), one matmul.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, 2 * config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(hidden_states).chunk(2, dim=-1)  # 2 x (batch, tokens, intermediate)
        return self.dropout(self.fc2(self.dropout(self.activation(gate) * up)))


MLP_CLASSES = {"mlp": ViTCustomMLP, "glu": ViTCustomGatedMLP}


class ViTCustomLayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (Touvron et al., 2021, CaiT), started at a small value so
    that deep models begin close to the identity."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((config.hidden_size,), float(config.layer_scale_init_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.gamma


class ViTCustomDropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drops a residual branch per sample while training."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        keep = hidden_states.new_empty(hidden_states.shape[0], 1, 1).bernoulli_(keep_prob)
        # Rescale the kept samples so that the expected branch output is unchanged.
        return hidden_states * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ViTCustomEncoderLayer(GradientCheckpointingLayer):
    """Eq. 2-3: pre-norm self-attention and pre-norm MLP, each with a residual connection (and layer scale)."""

    def __init__(self, config: ViTCustomConfig, drop_path_rate: float = 0.0):
        super().__init__()
        layer_scale = ViTCustomLayerScale if config.layer_scale_init_value is not None else lambda config: nn.Identity()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTCustomSelfAttention(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layer_scale1 = layer_scale(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP_CLASSES[config.mlp_type](config)
        self.layer_scale2 = layer_scale(config)
        self.drop_path = ViTCustomDropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_output, _ = self.attention(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(self.layer_scale1(self.dropout(attn_output)))  # eq. 2
        return hidden_states + self.drop_path(self.layer_scale2(self.mlp(self.norm2(hidden_states))))  # eq. 3


class ViTCustomAttentionPool(nn.Module):
    """Multi-head attention pooling: a learned query (`probe`) attends over the tokens, then a residual LayerNorm +
    MLP (SigLIP's head; timm's `AttentionPoolLatent`, `global_pool="map"`).

    The attention runs through `scaled_dot_product_attention`, whose maths every backend shares: one query row is
    too small for a fused kernel to matter, and its weights are not part of the encoder's attention maps.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.probe = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.q = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.kv = nn.Linear(config.hidden_size, 2 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTCustomMLP(config)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch_size, num_tokens, hidden_size = tokens.shape
        query = self.q(self.probe).view(1, 1, self.num_heads, self.head_dim).transpose(1, 2)  # (1, heads, 1, dim)
        # (batch, tokens, 2 * hidden) -> 2 x (batch, heads, tokens, head_dim)
        kv = self.kv(tokens).view(batch_size, num_tokens, 2, self.num_heads, self.head_dim)
        key, value = kv.permute(2, 0, 3, 1, 4).unbind(0)
        query = query.expand(batch_size, -1, -1, -1).to(key.dtype)
        pooled = nn.functional.scaled_dot_product_attention(query, key, value)  # (batch, heads, 1, head_dim)
        pooled = self.proj(pooled.transpose(1, 2).reshape(batch_size, 1, hidden_size))
        pooled = pooled + self.mlp(self.norm(pooled))
        return pooled[:, 0]  # (batch, hidden)


def encoder_layers(config: ViTCustomConfig) -> nn.ModuleList:
    """The `num_hidden_layers` encoder layers, with stochastic depth growing linearly from 0 to `drop_path_rate`.

    The rates are plain Python, not a tensor, so that the model can also be built on the meta device.
    """
    last_layer = max(config.num_hidden_layers - 1, 1)
    rates = [config.drop_path_rate * index / last_layer for index in range(config.num_hidden_layers)]
    return nn.ModuleList(ViTCustomEncoderLayer(config, rate) for rate in rates)


class ViTCustomPreTrainedModel(PreTrainedModel):
    """Weight initialisation, backend support flags, saving and loading shared by every ViTCustom model."""

    config_class = ViTCustomConfig
    config: ViTCustomConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTCustomEmbeddings", "ViTCustomEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    # The loss is a per-batch mean that ignores `num_items_in_batch`; telling Trainer so makes it divide by the
    # accumulation steps and leave the DDP scale alone (otherwise it multiplies the loss by the world size).
    accepts_loss_kwargs = False
    _can_record_outputs = {
        "hidden_states": ViTCustomEncoderLayer,
        "attentions": ViTCustomSelfAttention,
    }
    # The `auto_map` a save writes; each entry names a code file that the save copies beside the weights.
    remote_code_auto_map = AUTO_MAP

    def _init_weights(self, module: nn.Module) -> None:
        """Truncated-normal weights and zero biases, as in the JAX release and timm.

        Uses `transformers.initialization`, which leaves weights loaded from a checkpoint untouched.
        """
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ViTCustomEmbeddings):
            for parameter in (module.position_embeddings, *module.prefix_parameters()):
                init.trunc_normal_(parameter, mean=0.0, std=std, a=-2 * std, b=2 * std)
        elif isinstance(module, ViTCustomLayerScale):
            init.constant_(module.gamma, self.config.layer_scale_init_value)
        elif isinstance(module, ViTCustomAttentionPool):
            init.trunc_normal_(module.probe, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, but atomically: a save killed half-way leaves the previous files loadable.

        Everything is written to a hidden staging folder next to `save_directory` and then moved in file by file
        with `os.replace`, which is atomic, weights first; stale weight shards of an earlier save are removed last.
        (The package's other atomic writes live in `persistence.py`; this one stays here because remote-code users
        receive this file alone.)
        """
        self.config.auto_map = dict(self.remote_code_auto_map)
        if kwargs.get("push_to_hub") or not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        target = Path(save_directory)
        if target.is_file():
            raise OSError(f"Provided path ({save_directory}) should be a directory, not a file")
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            result = super().save_pretrained(staging, *args, **kwargs)
            written = sorted(staging.iterdir(), key=lambda path: not WEIGHT_FILE_PATTERN.fullmatch(path.name))
            for path in written:
                os.replace(path, target / path.name)
            names = {path.name for path in written}
            for stale in target.iterdir():
                if WEIGHT_FILE_PATTERN.fullmatch(stale.name) and stale.name not in names:
                    stale.unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load as transformers does, but refuse what would silently give a wrong model.

        A checkpoint without some encoder weights (truncated, or of another architecture) raises instead of
        initialising them randomly; newly initialised task heads are fine. A caller who asks for
        `output_loading_info=True` gets the model and its missing keys to judge for themselves, and
        `from_pretrained(None, config=config, state_dict={})` initialises every weight through `_init_weights`, as
        transformers' contract says. A corrupt safetensors file or a local path that does not exist gets an `OSError`
        that names it.
        """
        source = None if pretrained_model_name_or_path is None else str(pretrained_model_name_or_path)
        if source is not None and source.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(source)):
            raise OSError(f"No model folder at {source!r}: the path does not exist.")
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"The weights of {source!r} are not a readable safetensors file ({error}): the file is truncated or "
                "corrupt; save or download it again."
            ) from error
        if wants_info:
            return model, info
        if source is not None:
            model.check_encoder_loaded(source, info)
        return model

    def check_pixel_values(self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool | None) -> None:
        """Turn a user mistake into a message that names it, rather than a shape error deep inside torch."""
        if pixel_values is None:
            raise ValueError("`pixel_values` is required: a (batch, channels, height, width) float tensor.")
        if pixel_values.ndim != 4:
            raise ValueError(
                f"`pixel_values` must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"`pixel_values` must be a floating-point tensor, got {pixel_values.dtype}; "
                "use the image processor to rescale and normalise images."
            )
        batch_size, num_channels, height, width = pixel_values.shape
        # A meta model on meta inputs infers shapes; meta inputs to a model with weights are a mistake.
        if pixel_values.device.type == "meta" and self.embeddings.position_embeddings.device.type != "meta":
            raise ValueError("`pixel_values` is on the meta device and holds no data; pass real tensors.")
        if batch_size == 0:
            raise ValueError(f"`pixel_values` is an empty batch, shape {tuple(pixel_values.shape)}.")
        # A NaN pixel, or one so large that the LayerNorms' squares overflow, would turn every output into NaN without
        # a word. The 2-norm's sum of squares is non-finite exactly then, and is the cheapest full pass torch has
        # (a quarter of a plain sum's time on a 2-core Xeon); the element-wise check then tells which it is. CPU
        # tensors only: on a GPU, reading the answer back waits for the queued kernels and cannot be captured in a
        # CUDA graph, and `torch.compile` cannot trace it.
        if (
            pixel_values.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not torch.isfinite(torch.linalg.vector_norm(pixel_values))
        ):
            if not torch.isfinite(pixel_values).all():
                raise ValueError("`pixel_values` contains NaN or infinite values; check the images and their decoding.")
            raise ValueError(
                f"`pixel_values` holds values up to {pixel_values.abs().max().item():.3g}, so large that the model's "
                "float arithmetic overflows to NaN; images from the processor lie within a few units of 0."
            )
        if num_channels != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` has {num_channels} channels but the model expects {self.config.num_channels} "
                "(`config.num_channels`)."
            )
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = self.config.interpolate_pos_encoding
        patch_height, patch_width = to_pair(self.config.patch_size)
        if interpolate_pos_encoding:
            if height % patch_height or width % patch_width:
                raise ValueError(
                    f"Input size {height}x{width} must be divisible by the patch size {patch_height}x{patch_width}."
                )
        elif (height, width) != to_pair(self.config.image_size):
            image_height, image_width = to_pair(self.config.image_size)
            raise ValueError(
                f"Input size {height}x{width} does not match the model's {image_height}x{image_width} "
                "(`config.image_size`); resize the images or pass `interpolate_pos_encoding=True`."
            )

    def init_encoder(self, config: ViTCustomConfig) -> None:
        """The encoder's modules, under the names its weights are saved with, for the bare encoder and the backbone
        alike: embeddings, the optional pre-norm, the layers, and the final LayerNorm as `layernorm` on every token
        or, with `config.fc_norm`, as `fc_norm` after pooling (the other is `nn.Identity`; both without
        `final_norm`)."""

        def layer_norm() -> nn.LayerNorm:
            return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

        self.embeddings = ViTCustomEmbeddings(config)
        self.pre_layernorm = layer_norm() if config.pre_norm else nn.Identity()
        self.layers = encoder_layers(config)
        self.layernorm = layer_norm() if config.final_norm and not config.fc_norm else nn.Identity()
        self.fc_norm = layer_norm() if config.fc_norm else nn.Identity()

    def check_encoder_loaded(self, source: str, loading_info: dict) -> None:
        """Raise an `OSError` when `from_pretrained`'s `loading_info` shows encoder weights missing from `source`."""
        encoder_prefix = f"{self.base_model_prefix}."
        # The attention pool is a head (SigLIP's name for it): a masked-autoencoder folder has none, and a classifier
        # fine-tuned from it starts a new one.
        missing = sorted(
            key
            for key in loading_info["missing_keys"]
            if (key.startswith(encoder_prefix) or not hasattr(self, self.base_model_prefix))
            and not key.removeprefix(encoder_prefix).startswith("attention_pool.")
        )
        if missing:
            raise OSError(
                f"The checkpoint {source!r} lacks {len(missing)} encoder weights (e.g. {missing[:3]}): it is "
                "incomplete or belongs to another architecture, and loading it would leave them random."
            )


class ViTCustomModel(ViTCustomPreTrainedModel):
    """The bare encoder: embeddings, `num_hidden_layers` encoder layers, the final LayerNorm (eq. 1-4) and the
    pooler.

    The final LayerNorm is `layernorm` on every token, or `fc_norm` on the pooled representation with
    `config.fc_norm` (the other is `nn.Identity`), as timm names them.
    """

    def __init__(self, config: ViTCustomConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.init_encoder(config)
        # Only attention pooling has parameters; a module for the others would hold none (and a module the forward
        # does not use would trip DDP's unused-parameter check).
        if config.pooling == "map" and add_pooling_layer:
            self.attention_pool = ViTCustomAttentionPool(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def encode(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        """Eq. 2-4 over `(batch, tokens, hidden)` embeddings, whichever tokens they are (masked image modeling passes
        the visible ones only)."""
        hidden_states = self.pre_layernorm(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)  # eq. 2-3
        return self.layernorm(hidden_states)  # eq. 4

    def pool(self, sequence_output: torch.Tensor) -> torch.Tensor | None:
        """The image representation, `(batch, config.pooled_size)`, from the final tokens; `None` without pooling."""
        if self.config.pooling == "none":
            return None
        if self.config.pooling == "map":  # over the patches only, as timm (`pool_include_prefix=False`)
            return self.fc_norm(self.attention_pool(sequence_output[:, self.config.num_prefix_tokens :]))
        return self.fc_norm(pool(sequence_output, self.config.pooling, self.config.num_prefix_tokens))

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): images from the processor.
            interpolate_pos_encoding (`bool`, *optional*): accept other input sizes by resampling the position
                embeddings to the input's grid; defaults to `config.interpolate_pos_encoding`.

        Returns `last_hidden_state` (batch, prefix + patches, hidden), the final token features, and `pooler_output`
        (batch, `config.pooled_size`), the image representation that `config.pooling` says (`None` for `"none"`).
        `hidden_states` and `attentions` on request.
        """
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        embeddings = self.embeddings(pixel_values)  # eq. 1: (batch, prefix + patches, hidden)
        sequence_output = self.encode(embeddings, **kwargs)  # eq. 2-4
        pooled_output = self.pool(sequence_output)  # (batch, pooled)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


class ViTCustomForImageClassification(ViTCustomPreTrainedModel):
    """The encoder with a linear head on the pooled representation.

    There is no pre-logits (tanh) layer: the paper uses one only during pre-training, and a module the forward does
    not use would trip DDP's unused-parameter check. With a distillation token the logits are the mean of the class
    token's head and the distillation token's own head, as DeiT predicts at inference.
    """

    def __init__(self, config: ViTCustomConfig):
        if config.pooling == "none":
            raise ValueError("`pooling='none'` gives no image representation to classify; choose another pooling.")
        super().__init__(config)
        self.num_labels = config.num_labels

        def head() -> nn.Module:
            return nn.Linear(config.pooled_size, config.num_labels) if config.num_labels > 0 else nn.Identity()

        self.vit = ViTCustomModel(config)
        self.classifier = head()
        self.distillation_classifier = head() if config.distillation_token else None
        self.post_init()

    def check_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Name a label the loss cannot use, rather than failing inside `cross_entropy` or training on garbage; return
        the labels, integer class indices as int64 (int32 and the other integer dtypes are accepted).

        Shapes are checked always (they cost nothing and trace into a graph). Class indices are checked on the CPU
        outside `torch.compile` only: elsewhere reading them back would wait for the device and break the graph, and
        `cross_entropy`'s own device-side assertion catches them there.
        """
        if labels.dtype == torch.bool:
            raise ValueError(
                "`labels` of dtype torch.bool: class indices need an integer dtype (int64, single-label "
                "classification), multi-hot targets a float dtype of shape (batch, num_labels) (multi-label)."
            )
        if not labels.is_floating_point():
            labels = labels.long()
        if labels.is_floating_point():
            if self.num_labels > 1 and labels.shape != logits.shape:
                raise ValueError(
                    f"Float `labels` are multi-hot targets and need shape {tuple(logits.shape)} (batch, num_labels), "
                    f"got {tuple(labels.shape)}; class indices must be an integer tensor."
                )
            return labels
        if self.num_labels == 1 or self.config.problem_type not in (None, "single_label_classification"):
            return labels
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"`labels` must hold one class index per image, shape {tuple(logits.shape[:1])}, "
                f"got {tuple(labels.shape)}."
            )
        if labels.device.type != "cpu" or torch.compiler.is_compiling():
            return labels
        # -100 is the index that `cross_entropy` ignores.
        invalid = labels[(labels != -100) & ((labels < 0) | (labels >= self.num_labels))]
        if invalid.numel():
            raise ValueError(
                f"`labels` must be class indices in [0, {self.num_labels}) (`config.num_labels`), got "
                f"{sorted(set(invalid.tolist()))[:5]}."
            )
        return labels

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): images from the processor.
            labels (`torch.Tensor`, *optional*): class indices `(batch,)` for single-label classification, multi-hot
                floats `(batch, num_labels)` for multi-label, or targets for regression (`num_labels == 1`); the
                loss follows `config.problem_type`, inferred as in transformers when unset.
            interpolate_pos_encoding (`bool`, *optional*): see [`ViTCustomModel.forward`].
        """
        outputs: BaseModelOutputWithPooling = self.vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)  # (batch, num_labels)
        if self.distillation_classifier is not None:  # DeiT: the distillation token follows the class token
            logits = (logits + self.distillation_classifier(outputs.last_hidden_state[:, 1])) / 2
        loss = None
        if labels is not None:
            labels = self.check_labels(labels, logits)
            problem_type = self.config.problem_type  # the loss infers and stores it when unset
            try:
                loss = self.loss_function(labels, logits, self.config)
            except Exception:
                self.config.problem_type = problem_type  # a failed call leaves the model as it was
                raise
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class ViTCustomBackbone(BackboneMixin, ViTCustomPreTrainedModel):
    """The encoder as a backbone for dense prediction (transformers' backbone API, `AutoBackbone`): the token
    features of the stages `config.out_features` (`"stem"`, `"stage1"` ... `"stageN"`), each through the final
    LayerNorm, with the prefix tokens dropped and the patches laid out as `(batch, hidden, grid_height, grid_width)`.

    The weights are the encoder's, so the folder of a classifier or encoder loads as a backbone. For the raw tokens
    of every layer, prefix tokens included, call [`ViTCustomModel`] with `output_hidden_states=True`.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)
        self.init_encoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BackboneOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): images from the processor.
            interpolate_pos_encoding (`bool`, *optional*): see [`ViTCustomModel.forward`].

        Returns `feature_maps`, one `(batch, hidden, grid_height, grid_width)` tensor per stage of `out_features`.
        """
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        hidden_states = self.pre_layernorm(self.embeddings(pixel_values))  # eq. 1: (batch, prefix + patches, hidden)
        stages = [hidden_states]
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)  # eq. 2-3
            stages.append(hidden_states)
        grid = self.embeddings.patch_embeddings.grid(pixel_values)
        feature_maps = []
        for stage, tokens in zip(self.stage_names, stages, strict=True):
            if stage in self.out_features:
                final_norm = self.fc_norm(self.layernorm(tokens))  # the one final LayerNorm, wherever the model has it
                patches = final_norm[:, self.config.num_prefix_tokens :]  # (batch, patches, hidden)
                # (batch, patches, hidden) -> (batch, hidden, grid_height, grid_width)
                feature_maps.append(patches.transpose(1, 2).reshape(patches.shape[0], -1, *grid))
        return BackboneOutput(feature_maps=tuple(feature_maps), hidden_states=tuple(stages))


__all__ = [
    "ViTCustomBackbone",
    "ViTCustomForImageClassification",
    "ViTCustomModel",
    "ViTCustomPreTrainedModel",
    "pool",
    "resample_patch_positions",
]
