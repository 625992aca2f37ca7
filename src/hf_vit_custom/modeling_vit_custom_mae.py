"""Masked-autoencoder pre-training (MAE, He et al., 2021, arXiv 2111.06377) on the ViT of `modeling_vit_custom.py`.

A variant in a file of its own that reuses the base: eq. 1 comes from `ViTCustomEmbeddings.prefix_and_patch_tokens`
(the patch tokens are masked after their positions are added), eq. 2-4 from `ViTCustomModel.encode`, and the decoder is
built from the base's `ViTCustomEncoderLayer`. Shipped with every masked-autoencoder save for `trust_remote_code`,
together with the two files it imports.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs
from transformers.utils.output_capturing import capture_outputs

from .configuration_vit_custom import ViTCustomConfig, to_pair
from .modeling_vit_custom import AUTO_MAP, ViTCustomEncoderLayer, ViTCustomModel, ViTCustomPreTrainedModel

MAE_AUTO_MAP = {
    **AUTO_MAP,
    "AutoModelForMaskedImageModeling": "modeling_vit_custom_mae.ViTCustomForMaskedImageModeling",
}


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
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the encoder's, on the prefix tokens and the
            visible patches, `(batch, prefix + visible, hidden)` each.
        attentions (`tuple(torch.FloatTensor)`, *optional*): the encoder's,
            `(batch, heads, prefix + visible, prefix + visible)`.
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
        self.num_prefix_tokens = config.num_prefix_tokens
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
        """Predict every patch's pixels from `latent` (batch, prefix + visible, hidden), the encoded prefix tokens and
        visible patches; `ids_restore` (batch, patches) puts the shuffled patches back in grid order.
        """
        tokens = self.embed(latent)  # (batch, prefix + visible, decoder_hidden)
        prefix_tokens, visible_tokens = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        batch_size, num_patches = ids_restore.shape
        mask_tokens = self.mask_token.expand(batch_size, num_patches - visible_tokens.shape[1], -1)
        patch_tokens = torch.cat((visible_tokens, mask_tokens), dim=1)  # (batch, patches, decoder_hidden), shuffled
        index = ids_restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        patch_tokens = torch.gather(patch_tokens, 1, index)  # grid order
        # The prefix tokens have no place on the grid, so they get no position (MAE gives the class token a zero one).
        positions = sincos_position_embeddings(*grid_size, tokens.shape[-1], tokens.device)  # (patches, decoder_hidden)
        tokens = torch.cat(
            (prefix_tokens, patch_tokens + positions.to(tokens.dtype)), dim=1
        )  # (batch, prefix + patches, .)
        for layer in self.layers:
            tokens = layer(tokens)
        # (batch, patches, patch_height * patch_width * channels)
        return self.prediction(self.norm(tokens[:, self.num_prefix_tokens :]))


class ViTCustomForMaskedImageModeling(ViTCustomPreTrainedModel):
    """Masked-autoencoder pre-training (MAE, He et al., 2021, arXiv 2111.06377).

    Hides a random `config.mask_ratio` of each image's patches, runs the encoder on the visible ones and the prefix
    tokens only, and lets a light decoder reconstruct the pixels of the hidden ones. The encoder is `self.vit`, as in
    [`ViTCustomForImageClassification`], so a saved folder fine-tunes as a classifier without renaming a weight: only
    the head is new, and the decoder's weights are reported as unused.
    """

    remote_code_auto_map = MAE_AUTO_MAP

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        # No attention pool: pre-training never pools, and an unused module would trip DDP's unused-parameter check;
        # a classifier fine-tuned from this folder initialises it as a new head.
        self.vit = ViTCustomModel(config, add_pooling_layer=False)
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
        self.vit.check_pixel_values(pixel_values, interpolate_pos_encoding)
        embeddings = self.vit.embeddings
        grid_size = embeddings.patch_embeddings.grid(pixel_values)

        # Eq. 1 on the visible patches only; positions are added before masking, so each kept token keeps its place.
        prefix_tokens, patch_tokens = embeddings.prefix_and_patch_tokens(pixel_values)
        visible_tokens, mask, ids_restore = self.random_masking(patch_tokens, noise)  # (batch, visible, hidden)
        hidden_states = embeddings.dropout(
            torch.cat((prefix_tokens, visible_tokens), dim=1)
        )  # (batch, prefix + visible, .)
        # eq. 2-4; with `fc_norm` the final LayerNorm waits for pooling, which pre-training lacks, so it normalises
        # every token.
        latent = self.vit.fc_norm(self.vit.encode(hidden_states, **kwargs))

        logits = self.decoder(latent, ids_restore, grid_size)  # (batch, patches, patch_height * patch_width * channels)
        loss = self.reconstruction_loss(pixel_values, logits, mask)
        return ViTCustomMaskedImageModelingOutput(loss=loss, logits=logits, mask=mask, ids_restore=ids_restore)


__all__ = [
    "ViTCustomForMaskedImageModeling",
    "ViTCustomMaskedImageModelingOutput",
    "patchify",
    "unpatchify",
]
