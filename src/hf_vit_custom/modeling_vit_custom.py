"""PyTorch Vision Transformer (Dosovitskiy et al., 2020, arXiv 2010.11929) as a transformers model.

The forward passes follow the paper's equations:

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          (1)  ViTCustomEmbeddings
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                       (2)  ViTCustomEncoderLayer
    z_l = MLP(LN(z'_l)) + z'_l                              (3)  ViTCustomEncoderLayer
    y = LN(z_L)                                             (4)  ViTCustomModel (then pooled)

This file is self-contained apart from `configuration_vit_custom.py`, because `trust_remote_code` ships exactly those
two files.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .configuration_vit_custom import ViTCustomConfig, to_pair

# Written into every saved config, so that a user without this package can load the folder as an encoder or as a
# classifier with `trust_remote_code=True`, whichever class saved it.
AUTO_MAP = {
    "AutoConfig": "configuration_vit_custom.ViTCustomConfig",
    "AutoModel": "modeling_vit_custom.ViTCustomModel",
    "AutoModelForImageClassification": "modeling_vit_custom.ViTCustomForImageClassification",
    "AutoModelForMaskedImageModeling": "modeling_vit_custom.ViTCustomForMaskedImageModeling",
}
# Files a save writes that a later save in the same folder must replace or remove, so that no stale shard outlives it.
WEIGHT_FILE_PATTERN = re.compile(
    r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?"
)
# oneDNN's fused linear (a private op that inductor uses) and a CPU that computes bf16 natively.
ONEDNN_BF16_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)


class ViTCustomPatchEmbeddings(nn.Module):
    """Cuts the image into patches and projects each to `hidden_size` (the paper's E, a strided convolution)."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.patch_size = to_pair(config.patch_size)
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=self.patch_size, stride=self.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(batch, channels, height, width) -> (batch, patches, hidden).

        On the CPU the strided convolution's maths runs as one matmul over the flattened patches (rows in the
        weight's (channel, row, column) order), whose backward costs a third of the convolution's there.
        """
        if pixel_values.device.type != "cpu" or not is_stock_cpu_module(self.projection, nn.Conv2d):
            return self.projection(pixel_values).flatten(2).transpose(1, 2)
        batch_size, num_channels, height, width = pixel_values.shape
        patch_height, patch_width = self.patch_size
        grid_height, grid_width = height // patch_height, width // patch_width
        # (batch, channels, height, width) -> (batch, grid_height, grid_width, channels, patch_height, patch_width)
        patches = pixel_values[:, :, : grid_height * patch_height, : grid_width * patch_width].reshape(
            batch_size, num_channels, grid_height, patch_height, grid_width, patch_width
        )
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, grid_height * grid_width, -1)
        weight = self.projection.weight.reshape(self.projection.out_channels, -1)
        return nn.functional.linear(patches, weight, self.projection.bias)


class ViTCustomEmbeddings(nn.Module):
    """Eq. 1: class token, patch embeddings and learned position embeddings."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.grid_size = config.grid_size
        self.patch_embeddings = ViTCustomPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        num_positions = self.grid_size[0] * self.grid_size[1] + 1
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """Resample the patch position embeddings bicubically to a `grid_height` x `grid_width` grid.

        Works on the configured (height, width) grid, so non-square training and target sizes both resample
        correctly; the class token's position embedding has no place on the grid and is kept as it is.
        """
        if (grid_height, grid_width) == self.grid_size:
            return self.position_embeddings
        class_position, patch_positions = self.position_embeddings[:, :1], self.position_embeddings[:, 1:]
        hidden_size = patch_positions.shape[-1]
        # (1, patches, hidden) -> (1, hidden, trained_height, trained_width)
        patch_positions = patch_positions.reshape(1, *self.grid_size, hidden_size).permute(0, 3, 1, 2)
        patch_positions = nn.functional.interpolate(
            patch_positions.float(), size=(grid_height, grid_width), mode="bicubic", align_corners=False
        ).to(class_position.dtype)
        # (1, hidden, grid_height, grid_width) -> (1, grid_height * grid_width, hidden)
        patch_positions = patch_positions.flatten(2).transpose(1, 2)
        return torch.cat((class_position, patch_positions), dim=1)

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        patch_height, patch_width = self.patch_embeddings.patch_size
        grid_height, grid_width = height // patch_height, width // patch_width
        embeddings = self.patch_embeddings(pixel_values)  # (batch, patches, hidden)
        cls_tokens = self.cls_token.expand(batch_size, -1, -1)
        embeddings = torch.cat((cls_tokens, embeddings), dim=1)  # (batch, patches + 1, hidden)
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(grid_height, grid_width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(embeddings)


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


# `config.hidden_act` -> the oneDNN post-op (name, algorithm) that `linear_forward` fuses into its matmul.
ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def is_stock_cpu_module(module: nn.Module, module_type: type[nn.Module]) -> bool:
    """A plain `module_type` holding a plain CPU weight that nothing wraps (no subclass, as PEFT and quantisers
    install; no hooks or patched `forward`, as accelerate's offloading installs), so its maths may run without
    calling it."""
    return (
        type(module) is module_type
        and type(module.weight.data) is torch.Tensor
        and module.weight.device.type == "cpu"
        and "forward" not in vars(module)
        and not (module._forward_hooks or module._forward_pre_hooks)
    )


def fused_linear_applies(linear: nn.Module, hidden_states: torch.Tensor) -> bool:
    """bf16 inference on the CPU (autocast or bf16 inputs), recording no gradient, outside `torch.compile`."""
    if linear.training or not ONEDNN_BF16_LINEAR or hidden_states.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu")
    if (torch.get_autocast_dtype("cpu") if autocast else hidden_states.dtype) != torch.bfloat16:
        return False
    if torch.compiler.is_compiling() or not torch.backends.mkldnn.enabled or not is_stock_cpu_module(linear, nn.Linear):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in (hidden_states, *linear.parameters())))


def linear_forward(
    linear: nn.Module, hidden_states: torch.Tensor, activation: nn.Module | None = None, hidden_act: str | None = None
) -> torch.Tensor:
    """`activation(linear(hidden_states))`, as one oneDNN matmul with the bias and the activation fused in for bf16
    inference on the CPU (what inductor emits for frozen weights), where they would otherwise be passes of their own.

    The weight is cast on every call, never kept packed between calls: fused optimisers and `.data` edits change
    weights without bumping their version counters, so no cache could tell when a packed copy went stale.
    """
    if not fused_linear_applies(linear, hidden_states):
        output = linear(hidden_states)
        return output if activation is None else activation(output)
    post_op, algorithm = ONEDNN_POST_OPS.get(hidden_act, ("none", ""))
    bias = None if linear.bias is None else linear.bias.to(torch.bfloat16)
    output = torch.ops.mkldnn._linear_pointwise(
        hidden_states.to(torch.bfloat16), linear.weight.to(torch.bfloat16), bias, post_op, [], algorithm
    )
    return output if activation is None or hidden_act in ONEDNN_POST_OPS else activation(output)


class ViTCustomSelfAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection.

    The backend (eager, SDPA, flash, flex) comes from transformers' attention registry through
    `config._attn_implementation`. When attention weights are requested the eager path runs for that call, since the
    fused kernels never materialise them; outputs are the same either way.
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
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def attention_function(self, query: torch.Tensor, output_attentions: bool) -> Callable:
        """The configured backend from transformers' registry, or the eager path where it is needed or faster.

        Only the eager path returns attention weights. On the CPU, PyTorch's flash-attention backward is several
        times slower than the eager path's batched matmuls, so SDPA trains there through the eager path (which keeps
        the tokens x tokens probabilities for the backward, as transformers' eager ViT does) and infers with the
        flash kernel, the faster forward. Routing on the module's mode rather than on gradients keeps both passes of
        reentrant activation checkpointing on one path.
        """
        implementation = self.config._attn_implementation
        cpu_training = implementation == "sdpa" and query.device.type == "cpu" and self.training
        if output_attentions or cpu_training:
            return eager_attention_forward
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)

    def forward(
        self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, hidden_size = hidden_states.shape
        # (batch, tokens, 3 * hidden) -> 3 x (batch, heads, tokens, head_dim)
        qkv = linear_forward(self.qkv, hidden_states).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)

        attention_interface = self.attention_function(
            query, kwargs.get("output_attentions", self.config.output_attentions)
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
        return linear_forward(self.proj, attn_output), attn_weights


class ViTCustomMLP(nn.Module):
    """Linear - GELU - Dropout - Linear - Dropout (no activation after the second linear layer)."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.hidden_act = config.hidden_act
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = linear_forward(self.fc1, hidden_states, self.activation, self.hidden_act)
        hidden_states = self.dropout(hidden_states)  # (batch, tokens, intermediate)
        return self.dropout(linear_forward(self.fc2, hidden_states))


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
    """Eq. 2-3: pre-norm self-attention and pre-norm MLP, each with a residual connection."""

    def __init__(self, config: ViTCustomConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTCustomSelfAttention(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTCustomMLP(config)
        self.drop_path = ViTCustomDropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> torch.Tensor:
        attn_output, _ = self.attention(self.norm1(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(self.dropout(attn_output))
        hidden_states = hidden_states + self.drop_path(self.mlp(self.norm2(hidden_states)))
        return hidden_states


class ViTCustomPreTrainedModel(PreTrainedModel):
    """Weight initialisation, backend support flags and saving shared by every ViTCustom model."""

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
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std, a=-2 * std, b=2 * std)
            init.trunc_normal_(module.cls_token, mean=0.0, std=std, a=-2 * std, b=2 * std)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, but atomically: a save killed half-way leaves the previous files loadable.

        Everything is written to a hidden staging folder next to `save_directory` and then moved in file by file
        with `os.replace`, which is atomic, weights first; stale weight shards of an earlier save are removed last.
        """
        self.config.auto_map = {**AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
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
        initialising them randomly; newly initialised task heads are fine. A corrupt safetensors file or a local
        path that does not exist gets an `OSError` that names it.
        """
        source = str(pretrained_model_name_or_path)
        if source.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(source)):
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
        encoder_prefix = f"{cls.base_model_prefix}."
        missing = sorted(
            key
            for key in info["missing_keys"]
            if key.startswith(encoder_prefix) or not hasattr(model, cls.base_model_prefix)
        )
        if missing:
            raise OSError(
                f"The checkpoint {source!r} lacks {len(missing)} encoder weights (e.g. {missing[:3]}): it is "
                "incomplete or belongs to another architecture, and loading it would leave them random."
            )
        return (model, info) if wants_info else model


class ViTCustomModel(ViTCustomPreTrainedModel):
    """The bare encoder: embeddings, `num_hidden_layers` encoder layers and the final LayerNorm (eq. 1-4)."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        self.embeddings = ViTCustomEmbeddings(config)
        # Stochastic depth grows linearly from 0 to `drop_path_rate` over the layers. Plain Python, not a tensor, so
        # that the model can also be built on the meta device.
        last_layer = max(config.num_hidden_layers - 1, 1)
        drop_path_rates = [config.drop_path_rate * index / last_layer for index in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(ViTCustomEncoderLayer(config, rate) for rate in drop_path_rates)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    def bf16_cpu_inference(self, hidden_states: torch.Tensor) -> bool:
        """Eval mode under CPU bf16 autocast with no gradient recorded."""
        return (
            not self.training
            and not torch.is_grad_enabled()
            and hidden_states.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16
        )

    def check_pixel_values(self, pixel_values: torch.Tensor | None, interpolate_pos_encoding: bool) -> None:
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
        _, num_channels, height, width = pixel_values.shape
        # A NaN pixel would turn every output into NaN without a word. One sum finds any NaN or infinity (at a
        # fifteenth of the cost of an element-wise check); the element-wise check then tells a real one from a sum
        # that merely overflowed. CPU tensors only: on a GPU, reading the answer back waits for the queued kernels and
        # cannot be captured in a CUDA graph, and `torch.compile` cannot trace it.
        if (
            pixel_values.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not torch.isfinite(pixel_values.sum(dtype=torch.float32))
            and not torch.isfinite(pixel_values).all()
        ):
            raise ValueError("`pixel_values` contains NaN or infinite values; check the images and their decoding.")
        if num_channels != self.config.num_channels:
            raise ValueError(
                f"`pixel_values` has {num_channels} channels but the model expects {self.config.num_channels} "
                "(`config.num_channels`)."
            )
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
            interpolate_pos_encoding (`bool`, *optional*): resample the position embeddings to the input size;
                defaults to `config.interpolate_pos_encoding`.

        Returns `last_hidden_state` (batch, patches + 1, hidden) and `pooler_output` (batch, hidden): the class token
        or the mean of the patch tokens, as `config.pooling` says. `hidden_states` and `attentions` on request.
        """
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = self.config.interpolate_pos_encoding
        self.check_pixel_values(pixel_values, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)

        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding)  # (batch, patches + 1, hidden)
        if self.bf16_cpu_inference(hidden_states):
            # Carried in bf16, as a bf16 model would: layer norms, residual sums and linear inputs skip their casts,
            # at the price of bf16 rounding in the sums (the outputs are bf16, like autocast's logits). Training and
            # the MAE model keep fp32 sums.
            hidden_states = hidden_states.to(torch.bfloat16)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        sequence_output = self.layernorm(hidden_states)

        # Mean pooling skips the class token: it is not an image patch, and averaging it in would mix a learned
        # constant into the image representation.
        pooled_output = sequence_output[:, 1:].mean(dim=1) if self.config.pooling == "mean" else sequence_output[:, 0]
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


class ViTCustomForImageClassification(ViTCustomPreTrainedModel):
    """The encoder with a linear head on the pooled representation.

    There is no pre-logits (tanh) layer: the paper uses one only during pre-training, and a module the forward does
    not use would trip DDP's unused-parameter check.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTCustomModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def check_labels(self, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """Name a label the loss cannot use, rather than failing inside `cross_entropy` or training on garbage."""
        if labels.is_floating_point():
            if self.num_labels > 1 and labels.shape != logits.shape:
                raise ValueError(
                    f"Float `labels` are multi-hot targets and need shape {tuple(logits.shape)} (batch, num_labels), "
                    f"got {tuple(labels.shape)}; class indices must be an integer tensor."
                )
            return
        if self.num_labels == 1 or self.config.problem_type not in (None, "single_label_classification"):
            return
        if labels.shape != logits.shape[:1]:
            raise ValueError(
                f"`labels` must hold one class index per image, shape {tuple(logits.shape[:1])}, "
                f"got {tuple(labels.shape)}."
            )
        # -100 is the index that `cross_entropy` ignores.
        invalid = labels[(labels != -100) & ((labels < 0) | (labels >= self.num_labels))]
        if invalid.numel():
            raise ValueError(
                f"`labels` must be class indices in [0, {self.num_labels}) (`config.num_labels`), got "
                f"{sorted(set(invalid.tolist()))[:5]}."
            )

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
        loss = None
        if labels is not None:
            self.check_labels(labels, logits)
            loss = self.loss_function(labels, logits, self.config)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def patchify(pixel_values: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """Cut images into flattened patches, the pixel targets of masked image modeling.

    `(batch, channels, height, width)` -> `(batch, patches, patch_height * patch_width * channels)`: patches in
    row-major grid order (the order of the patch embeddings' tokens), each laid out (row, column, channel) as in MAE.
    """
    batch_size, num_channels, height, width = pixel_values.shape
    patch_height, patch_width = patch_size
    grid_height, grid_width = height // patch_height, width // patch_width
    patches = pixel_values.reshape(batch_size, num_channels, grid_height, patch_height, grid_width, patch_width)
    patches = patches.permute(0, 2, 4, 3, 5, 1)  # (batch, grid_height, grid_width, patch_height, patch_width, channels)
    return patches.reshape(batch_size, grid_height * grid_width, patch_height * patch_width * num_channels)


def unpatchify(patches: torch.Tensor, patch_size: tuple[int, int], grid_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of `patchify`: `(batch, patches, patch_height * patch_width * channels)` -> `(batch, channels, H, W)`.

    Takes the grid, because the patch count alone cannot tell a 2x8 grid from a 4x4 one.
    """
    patch_height, patch_width = patch_size
    grid_height, grid_width = grid_size
    num_channels = patches.shape[-1] // (patch_height * patch_width)
    patches = patches.reshape(patches.shape[0], grid_height, grid_width, patch_height, patch_width, num_channels)
    patches = patches.permute(0, 5, 1, 3, 2, 4)  # (batch, channels, grid_height, patch_height, grid_width, patch_width)
    return patches.reshape(patches.shape[0], num_channels, grid_height * patch_height, grid_width * patch_width)


def sincos_position_embeddings(
    grid_height: int, grid_width: int, dim: int, device: torch.device | None = None
) -> torch.Tensor:
    """MAE's fixed 2-D sine-cosine position embeddings, `(grid_height * grid_width, dim)` in row-major grid order.

    A quarter of the channels each holds the sine and the cosine of the row and of the column, at `dim / 4`
    frequencies as in Vaswani et al. (2017). Computed, not learned, so the decoder serves any grid.
    """
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter)  # (dim / 4,)
    rows, columns = torch.meshgrid(
        torch.arange(grid_height, device=device, dtype=torch.float32),
        torch.arange(grid_width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    rows = rows.reshape(-1, 1) * frequencies  # (patches, dim / 4)
    columns = columns.reshape(-1, 1) * frequencies
    return torch.cat((rows.sin(), rows.cos(), columns.sin(), columns.cos()), dim=1)  # (patches, dim)


@dataclass
class ViTCustomMaskedImageModelingOutput(ModelOutput):
    r"""
    Output of [`ViTCustomForMaskedImageModeling`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): mean squared error on the pixels of the masked patches only.
        logits (`torch.FloatTensor` of shape `(batch, patches, patch_height * patch_width * channels)`): the
            reconstructed pixels of every patch in `patchify` layout (normalised per patch when the model was trained
            with `config.norm_pix_loss`); `unpatchify` turns them back into images.
        mask (`torch.FloatTensor` of shape `(batch, patches)`): 1 where a patch was hidden from the encoder, 0 where
            it was visible.
        ids_restore (`torch.LongTensor` of shape `(batch, patches)`): the permutation that puts the shuffled tokens
            (visible first, then masked) back in grid order.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the encoder's, on the class token and the visible
            patches, `(batch, visible + 1, hidden)` each.
        attentions (`tuple(torch.FloatTensor)`, *optional*): the encoder's, `(batch, heads, visible + 1, visible + 1)`.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    ids_restore: torch.LongTensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class ViTCustomMAEDecoder(ViTCustomPreTrainedModel):
    """MAE's light decoder: the encoded visible patches plus a shared mask token at every hidden position, fixed
    sine-cosine positions, `decoder_num_hidden_layers` pre-norm layers (eq. 2-3) and a linear pixel predictor.

    A model of its own, holding a decoder-sized copy of the config, so that transformers manages that copy as a
    sub-model's config (`set_attn_implementation` visits it). Its layers report nothing: the hidden states and
    attentions of [`ViTCustomForMaskedImageModeling`] are the encoder's.
    """

    _can_record_outputs = {}

    def __init__(self, config: ViTCustomConfig):
        decoder_config = copy.deepcopy(config)
        decoder_config.update(
            {
                "hidden_size": config.decoder_hidden_size,
                "num_hidden_layers": config.decoder_num_hidden_layers,
                "num_attention_heads": config.decoder_num_attention_heads,
                "intermediate_size": config.decoder_intermediate_size,
                "drop_path_rate": 0.0,
            }
        )
        super().__init__(decoder_config)
        patch_height, patch_width = to_pair(config.patch_size)
        self.embed = nn.Linear(config.hidden_size, config.decoder_hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.decoder_hidden_size))
        num_layers = config.decoder_num_hidden_layers
        self.layers = nn.ModuleList(ViTCustomEncoderLayer(decoder_config) for _ in range(num_layers))
        self.norm = nn.LayerNorm(config.decoder_hidden_size, eps=config.layer_norm_eps)
        self.prediction = nn.Linear(config.decoder_hidden_size, patch_height * patch_width * config.num_channels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, ViTCustomMAEDecoder):
            init.normal_(module.mask_token, std=self.config.initializer_range)  # as in the MAE release

    def forward(self, latent: torch.Tensor, ids_restore: torch.LongTensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Predict every patch's pixels from `latent` (batch, visible + 1, hidden), the encoded class token and visible
        patches; `ids_restore` (batch, patches) puts the shuffled patches back in grid order.
        """
        tokens = self.embed(latent)  # (batch, visible + 1, decoder_hidden)
        batch_size, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch_size, num_patches + 1 - tokens.shape[1], -1)
        patch_tokens = torch.cat((tokens[:, 1:], mask_tokens), dim=1)  # (batch, patches, decoder_hidden), shuffled
        index = ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        patch_tokens = torch.gather(patch_tokens, 1, index)  # grid order
        # The class token has no place on the grid, so it gets no position (MAE gives it a zero one).
        positions = sincos_position_embeddings(*grid_size, tokens.shape[-1], tokens.device)  # (patches, decoder_hidden)
        tokens = torch.cat((tokens[:, :1], patch_tokens + positions.to(tokens.dtype)), dim=1)  # (batch, patches + 1, .)
        for layer in self.layers:
            tokens = layer(tokens)
        return self.prediction(self.norm(tokens[:, 1:]))  # (batch, patches, patch_height * patch_width * channels)


class ViTCustomForMaskedImageModeling(ViTCustomPreTrainedModel):
    """Masked-autoencoder pre-training (MAE, He et al., 2021, arXiv 2111.06377).

    Hides a random `config.mask_ratio` of each image's patches, runs the encoder on the visible ones and the class
    token only, and lets a light decoder reconstruct the pixels of the hidden ones. The encoder is `self.vit`, as in
    [`ViTCustomForImageClassification`], so a saved folder fine-tunes as a classifier without renaming a weight: only
    the head is new, and the decoder's weights are reported as unused.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        self.vit = ViTCustomModel(config)
        self.decoder = ViTCustomMAEDecoder(config)
        self.post_init()

    def random_masking(
        self, tokens: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.LongTensor]:
        """Keep `1 - mask_ratio` of each image's patch tokens: sort the patches by `noise`, keep the lowest.

        Argsort of per-sample noise draws a uniformly random subset of the same size for every image, so the visible
        tokens still form a rectangular batch. Returns the visible tokens (batch, visible, hidden), the mask
        (batch, patches) with 1 for a hidden patch, and `ids_restore`, which undoes the sort.
        """
        batch_size, num_patches, hidden_size = tokens.shape
        num_visible = int(num_patches * (1 - self.config.mask_ratio))
        # Checked here, not in the config: the patch count depends on the input size, and a classifier's config may
        # have a grid too small to mask.
        if num_visible == 0:
            raise ValueError(
                f"`mask_ratio` {self.config.mask_ratio} leaves none of the {num_patches} patches visible to the "
                "encoder; lower it or use more patches."
            )
        if noise is None:
            noise = torch.rand(batch_size, num_patches, device=tokens.device)
        ids_shuffle = torch.argsort(noise.to(tokens.device), dim=1)  # (batch, patches), visible first
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :num_visible]
        index = ids_keep.unsqueeze(-1).expand(-1, -1, hidden_size)
        visible = torch.gather(tokens, 1, index)  # (batch, visible, hidden)
        mask = torch.ones(batch_size, num_patches, device=tokens.device).scatter_(1, ids_keep, 0.0)
        return visible, mask, ids_restore

    def reconstruction_loss(self, pixel_values: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error between predicted and true patch pixels, averaged over the masked patches only.

        The visible patches are not scored: the encoder sees them, so copying them would teach it nothing (the paper's
        Sec. 3). With `config.norm_pix_loss` each target patch is normalised by its own mean and variance.
        """
        patch_size = self.vit.embeddings.patch_embeddings.patch_size
        target = patchify(pixel_values.float(), patch_size)  # (batch, patches, patch_height * patch_width * channels)
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            variance = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (variance + 1.0e-6) ** 0.5
        per_patch = (logits.float() - target).pow(2).mean(dim=-1)  # (batch, patches)
        return (per_patch * mask).sum() / mask.sum()

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ViTCustomMaskedImageModelingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, channels, height, width)`): images from the processor.
            noise (`torch.FloatTensor` of shape `(batch, patches)`, *optional*): one score per patch; the patches with
                the lowest scores stay visible. Drawn uniformly when not given; pass it for reproducible masks.
            interpolate_pos_encoding (`bool`, *optional*): see [`ViTCustomModel.forward`].
        """
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = self.config.interpolate_pos_encoding
        self.vit.check_pixel_values(pixel_values, interpolate_pos_encoding)
        embeddings = self.vit.embeddings
        pixel_values = pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
        patch_height, patch_width = embeddings.patch_embeddings.patch_size
        grid_size = (pixel_values.shape[2] // patch_height, pixel_values.shape[3] // patch_width)

        # Eq. 1 on the visible patches only; positions are added before masking, so each kept token keeps its place.
        position_embeddings = embeddings.interpolate_pos_encoding(*grid_size)  # the learned ones at the trained size
        patch_tokens = embeddings.patch_embeddings(pixel_values)  # (batch, patches, hidden)
        patch_tokens = patch_tokens + position_embeddings[:, 1:]
        visible_tokens, mask, ids_restore = self.random_masking(patch_tokens, noise)  # (batch, visible, hidden)
        cls_tokens = (embeddings.cls_token + position_embeddings[:, :1]).expand(pixel_values.shape[0], -1, -1)
        hidden_states = torch.cat((cls_tokens, visible_tokens), dim=1)  # (batch, visible + 1, hidden)
        hidden_states = embeddings.dropout(hidden_states)
        for layer in self.vit.layers:  # eq. 2-3
            hidden_states = layer(hidden_states, **kwargs)
        latent = self.vit.layernorm(hidden_states)  # eq. 4

        logits = self.decoder(latent, ids_restore, grid_size)  # (batch, patches, patch_height * patch_width * channels)
        loss = self.reconstruction_loss(pixel_values, logits, mask)
        return ViTCustomMaskedImageModelingOutput(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore)


__all__ = [
    "ViTCustomForImageClassification",
    "ViTCustomForMaskedImageModeling",
    "ViTCustomMaskedImageModelingOutput",
    "ViTCustomModel",
    "ViTCustomPreTrainedModel",
    "patchify",
    "unpatchify",
]
