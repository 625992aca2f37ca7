"""The ViT family in one `ViTCustomConfig`: transformers parity per family, presets, and a model with every knob.

Every source model is built from a tiny random config with every parameter perturbed away from its initial value
(layer-scale gammas, norms and biases included), so that a weight converted to the wrong place cannot hide. Tolerances
are stated where they are used: `FP32_TOLERANCE` for the same fp32 maths summed in another order, `torch.equal` where
the computation is the same one.
"""

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import transformers
from conftest import out_of_the_memory_map, tiny_config_kwargs
from torch import nn

from hf_vit_custom import (
    ViTCustomConfig,
    ViTCustomForImageClassification,
    ViTCustomForMaskedImageModeling,
    ViTCustomModel,
)
from hf_vit_custom.conversion import build_model, convert_from_transformers
from hf_vit_custom.visualize import attention_rollout, compute_attention_maps, patch_map_to_image, pooled_rows

FP32_TOLERANCE = 1e-5  # the same fp32 maths in another summation order
BACKENDS = ["eager", "sdpa", "flex_attention"]


def perturb(model: nn.Module, scale: float = 0.1) -> nn.Module:
    """Move every parameter off its initial value (gammas off 1e-5, LayerNorms off 1 and 0, biases off 0)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return model


def images(batch: int = 2, height: int = 16, width: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def assert_max_diff(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = FP32_TOLERANCE) -> None:
    assert actual.shape == expected.shape
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max |diff| {difference:.2e} > {tolerance:.0e}"


def encoder_of(model: nn.Module) -> ViTCustomModel:
    return model.vit if isinstance(model, ViTCustomForImageClassification) else model


# ---------------------------------------------------------------------------------------------------------------------
# 1. transformers parity, every family
# ---------------------------------------------------------------------------------------------------------------------

SOURCE_SIZE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "image_size": 30,
    "patch_size": 5,
}
SOURCE_PATCHES = (30 // 5) ** 2
SOURCE_TEXT = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "vocab_size": 99,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}


def vision_config(config_class: str, **extra) -> Callable[[], transformers.PreTrainedConfig]:
    return lambda: getattr(transformers, config_class)(**SOURCE_SIZE, **extra)


def full_config(config_class: str) -> Callable[[], transformers.PreTrainedConfig]:
    return lambda: getattr(transformers, config_class)(vision_config=SOURCE_SIZE, text_config=SOURCE_TEXT)


@dataclass(frozen=True)
class ParityCase:
    """A transformers model, what of its output ours must reproduce, and the knobs its conversion must set.

    `compare` names fields of the source's output (`logits`, `last_hidden_state`, `pooler_output`), plus
    `cls_mean_pooled`: our pooled output against `cat(class token, mean of the patch tokens)` of the source encoder's
    `last_hidden_state` (DINOv2's linear head). `tower`: a full SigLIP / CLIP model, compared with its `vision_model`.
    """

    model_class: str
    config: Callable[[], transformers.PreTrainedConfig]
    compare: tuple[str, ...]
    knobs: dict = field(default_factory=dict)
    tower: bool = False


LABELS = {"num_labels": 3}
VIT_KNOBS = {"class_token": True, "num_prefix_tokens": 1, "pooling": "cls", "layer_scale_init_value": None}
DEIT_KNOBS = {"distillation_token": True, "num_prefix_tokens": 2, "num_prefix_positions": 2, "pooling": "cls"}
DINOV2_KNOBS = {"layer_scale_init_value": 1.0, "mlp_type": "mlp", "num_prefix_tokens": 1}
REGISTER_KNOBS = {
    "num_register_tokens": 4,
    "no_embed_class": True,
    "num_prefix_tokens": 5,
    "num_prefix_positions": 0,
    "interpolate_antialias": True,
}
SIGLIP_KNOBS = {"class_token": False, "num_prefix_tokens": 0, "pooling": "map", "hidden_act": "gelu_pytorch_tanh"}
CLIP_KNOBS = {
    "pre_norm": True,
    "fc_norm": True,
    "patch_embedding_bias": False,
    "hidden_act": "quick_gelu",
    "pooling": "cls",
}
TOKENS_AND_POOLED = ("last_hidden_state", "pooler_output")

PARITY_CASES = {
    "vit-classifier": ParityCase(
        "ViTForImageClassification", vision_config("ViTConfig", **LABELS), ("logits",), VIT_KNOBS
    ),
    "vit-msn-classifier": ParityCase(
        "ViTMSNForImageClassification", vision_config("ViTMSNConfig", **LABELS), ("logits",), VIT_KNOBS
    ),
    "vit-mae-encoder": ParityCase(
        "ViTMAEModel", vision_config("ViTMAEConfig", mask_ratio=0.0), ("last_hidden_state",), VIT_KNOBS
    ),
    # DeiTModel's pooler is a dense + tanh that the conversion drops: tokens only.
    "deit-encoder": ParityCase("DeiTModel", vision_config("DeiTConfig"), ("last_hidden_state",), DEIT_KNOBS),
    "deit-with-teacher": ParityCase(
        "DeiTForImageClassificationWithTeacher", vision_config("DeiTConfig", **LABELS), ("logits",), DEIT_KNOBS
    ),
    "dinov2-encoder": ParityCase("Dinov2Model", vision_config("Dinov2Config"), TOKENS_AND_POOLED, DINOV2_KNOBS),
    "dinov2-swiglu-encoder": ParityCase(
        "Dinov2Model",
        vision_config("Dinov2Config", use_swiglu_ffn=True),
        TOKENS_AND_POOLED,
        {**DINOV2_KNOBS, "mlp_type": "glu", "hidden_act": "silu"},
    ),
    "dinov2-classifier": ParityCase(
        "Dinov2ForImageClassification",
        vision_config("Dinov2Config", **LABELS),
        ("logits", "cls_mean_pooled"),
        {**DINOV2_KNOBS, "pooling": "cls_mean", "pooled_size": 64},
    ),
    "dinov2-registers-encoder": ParityCase(
        "Dinov2WithRegistersModel",
        vision_config("Dinov2WithRegistersConfig", num_register_tokens=4),
        TOKENS_AND_POOLED,
        {**DINOV2_KNOBS, **REGISTER_KNOBS},
    ),
    "dinov2-registers-classifier": ParityCase(
        "Dinov2WithRegistersForImageClassification",
        vision_config("Dinov2WithRegistersConfig", num_register_tokens=4, **LABELS),
        ("logits", "cls_mean_pooled"),
        {**DINOV2_KNOBS, **REGISTER_KNOBS, "pooling": "cls_mean"},
    ),
    "siglip-vision": ParityCase(
        "SiglipVisionModel", vision_config("SiglipVisionConfig"), TOKENS_AND_POOLED, SIGLIP_KNOBS
    ),
    "siglip-vision-no-head": ParityCase(
        "SiglipVisionModel",
        vision_config("SiglipVisionConfig", vision_use_head=False),
        ("last_hidden_state",),
        {**SIGLIP_KNOBS, "pooling": "none"},
    ),
    "siglip-full": ParityCase("SiglipModel", full_config("SiglipConfig"), TOKENS_AND_POOLED, SIGLIP_KNOBS, tower=True),
    # CLIP's last_hidden_state is not normalised, its pooler_output (the class token) is.
    "clip-vision": ParityCase("CLIPVisionModel", vision_config("CLIPVisionConfig"), TOKENS_AND_POOLED, CLIP_KNOBS),
    "clip-full": ParityCase("CLIPModel", full_config("CLIPConfig"), TOKENS_AND_POOLED, CLIP_KNOBS, tower=True),
}


def source_model(case: ParityCase) -> nn.Module:
    torch.manual_seed(0)
    return perturb(getattr(transformers, case.model_class)(case.config())).eval()


def source_outputs(case: ParityCase, source: nn.Module, pixels: torch.Tensor):
    if case.tower:
        return source.vision_model(pixels)
    if case.model_class == "ViTMAEModel":  # keep every patch, in grid order
        return source(pixels, noise=torch.arange(SOURCE_PATCHES).expand(pixels.shape[0], -1).float())
    return source(pixels)


@pytest.mark.parametrize("case", PARITY_CASES.values(), ids=PARITY_CASES.keys())
def test_transformers_family_converts_with_parity(case):
    source = source_model(case)
    config, state_dict = convert_from_transformers(source.state_dict(), source.config)
    ours = build_model(config, state_dict)
    for knob, value in case.knobs.items():
        assert getattr(config, knob) == value, knob

    pixels = images(height=30, width=30)
    with torch.no_grad():
        expected = source_outputs(case, source, pixels)
        encoded = encoder_of(ours)(pixels)
        logits = ours(pixels).logits if isinstance(ours, ViTCustomForImageClassification) else None
        source_tokens = source.base_model(pixels).last_hidden_state if case.model_class.startswith("Dinov2") else None
    for name in case.compare:
        if name == "logits":
            assert_max_diff(logits, expected.logits)
        elif name == "cls_mean_pooled":  # the class token, then the mean of the patches (registers left out)
            patch_mean = source_tokens[:, config.num_prefix_tokens :].mean(1)
            assert_max_diff(encoded.pooler_output, torch.cat([source_tokens[:, 0], patch_mean], dim=1))
        else:
            assert_max_diff(getattr(encoded, name), getattr(expected, name))
    if config.pooling == "none":
        assert encoded.pooler_output is None and expected.pooler_output is None


# ---------------------------------------------------------------------------------------------------------------------
# 2. Refusals
# ---------------------------------------------------------------------------------------------------------------------


def test_deit_classifier_without_teacher_head_is_refused():
    source = source_model(ParityCase("DeiTForImageClassification", vision_config("DeiTConfig", **LABELS), ()))
    with pytest.raises(ValueError, match="DeiTForImageClassificationWithTeacher"):
        convert_from_transformers(source.state_dict(), source.config)


def test_unsupported_model_type_is_refused_by_name():
    beit = transformers.BeitModel(transformers.BeitConfig(**SOURCE_SIZE))
    with pytest.raises(ValueError, match="'beit'"):
        convert_from_transformers(beit.state_dict(), beit.config.to_dict())


# ---------------------------------------------------------------------------------------------------------------------
# 3. Presets
# ---------------------------------------------------------------------------------------------------------------------

PRESETS = {
    "vit-small-patch16-224": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, **VIT_KNOBS},
    "deit-tiny-distilled-patch16-224": {"hidden_size": 192, "num_attention_heads": 3, **DEIT_KNOBS},
    "deit3-base-patch16-224": {"hidden_size": 768, "layer_scale_init_value": 1e-6, "no_embed_class": True},
    "dinov2-small-patch14-518": {"patch_size": 14, "image_size": 518, "layer_scale_init_value": 1e-5},
    "dinov2-base-reg4-patch14-518": {
        "hidden_size": 768,
        "layer_scale_init_value": 1e-5,
        "num_register_tokens": 4,
        "no_embed_class": True,
        "num_prefix_tokens": 5,
        "num_prefix_positions": 0,
    },
    "dinov2-giant-patch14-518": {
        "hidden_size": 1536,
        "num_hidden_layers": 40,
        "num_attention_heads": 24,
        "intermediate_size": 4096,
        "mlp_type": "glu",
        "hidden_act": "silu",
    },
    "siglip-base-patch16-224": {**SIGLIP_KNOBS, "hidden_size": 768},
    "siglip-so400m-patch14-224": {**SIGLIP_KNOBS, "hidden_size": 1152, "num_hidden_layers": 27, "patch_size": 14},
    "clip-vit-base-patch16": {**CLIP_KNOBS, "layer_norm_eps": 1e-5, "image_size": 224, "patch_size": 16},
}


@pytest.mark.parametrize(("name", "knobs"), PRESETS.items(), ids=PRESETS.keys())
def test_preset_sets_its_family_knobs(name, knobs):
    config = ViTCustomConfig.from_preset(name)
    assert {knob: getattr(config, knob) for knob in knobs} == knobs


def test_preset_overrides_win():
    config = ViTCustomConfig.from_preset("siglip-base-patch16-224", num_labels=3, pooling="mean", hidden_size=96)
    assert (config.num_labels, config.pooling, config.hidden_size) == (3, "mean", 96)
    assert config.class_token is False  # the rest of the preset stays


@pytest.mark.parametrize("name", ["dinov2-colossal-patch14-518", "vit-base-distilled-patch16-224", "resnet-50"])
def test_unknown_preset_is_refused(name):
    with pytest.raises(ValueError, match="Unknown preset"):
        ViTCustomConfig.from_preset(name)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_and_runs_at_a_small_size(name):
    patch_size = ViTCustomConfig.from_preset(name).patch_size
    config = ViTCustomConfig.from_preset(name, num_hidden_layers=1, image_size=2 * patch_size)
    # Built on the meta device and filled with random values: `_init_weights` of the wide presets takes seconds.
    with torch.device("meta"):
        model = ViTCustomModel(config)
    model.to_empty(device="cpu").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.02)
        outputs = model(images(batch=1, height=2 * patch_size, width=2 * patch_size))
    assert outputs.last_hidden_state.shape == (1, config.num_prefix_tokens + 4, config.hidden_size)
    assert outputs.pooler_output.shape == (1, config.pooled_size)
    assert torch.isfinite(outputs.pooler_output).all()


# ---------------------------------------------------------------------------------------------------------------------
# 4. Registers, attention pooling, layer scale, qk-norm and SwiGLU together
# ---------------------------------------------------------------------------------------------------------------------

REGISTER_MAP_VARIANTS = {"cls-reg2-map": {"class_token": True}, "reg2-map": {"class_token": False}}
TINY_DECODER = {
    "decoder_hidden_size": 16,
    "decoder_num_hidden_layers": 1,
    "decoder_num_attention_heads": 2,
    "decoder_intermediate_size": 32,
}


def register_map_config(variant: str, **overrides) -> ViTCustomConfig:
    kwargs = tiny_config_kwargs(
        num_register_tokens=2,
        pooling="map",
        layer_scale_init_value=1e-5,
        qk_norm=True,
        mlp_type="glu",
        hidden_act="silu",
        **REGISTER_MAP_VARIANTS[variant],
    )
    return ViTCustomConfig(**{**kwargs, **overrides})


def register_map_model(variant: str, model_class=ViTCustomForImageClassification, backend="sdpa", **overrides):
    torch.manual_seed(0)
    config = register_map_config(variant, **overrides)
    return perturb(model_class._from_config(config, attn_implementation=backend)).eval()


def rebuilt(model: nn.Module, backend: str, **overrides) -> nn.Module:
    """A copy of `model`'s weights in a model built for `backend` (and `overrides` of its config)."""
    config = ViTCustomConfig(**{**model.config.to_dict(), **overrides})
    other = type(model)._from_config(config, attn_implementation=backend)
    other.load_state_dict(model.state_dict())
    assert other.config._attn_implementation == backend
    return other.eval()


variants = pytest.mark.parametrize("variant", REGISTER_MAP_VARIANTS)


@variants
def test_register_map_model_gives_the_same_logits_on_every_backend(variant):
    eager = register_map_model(variant, backend="eager")
    pixels = images()
    with torch.no_grad():  # FlexAttention has no CPU backward
        expected = eager(pixels).logits
        for backend in BACKENDS[1:]:
            assert_max_diff(rebuilt(eager, backend)(pixels).logits, expected)


@variants
@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_register_map_model_attention_maps_cover_prefix_and_patches_and_match_eager(variant, backend):
    eager = register_map_model(variant, backend="eager")
    num_tokens = eager.config.num_prefix_tokens + 16
    pixels = images()
    with torch.no_grad():
        expected = eager(pixels, output_attentions=True).attentions
        actual = rebuilt(eager, backend)(pixels, output_attentions=True).attentions
    assert len(actual) == 2
    for expected_weights, actual_weights in zip(expected, actual, strict=True):
        assert actual_weights.shape == (2, 4, num_tokens, num_tokens)
        assert_max_diff(actual_weights, expected_weights)


@variants
def test_register_map_model_interpolates_position_embeddings(variant):
    model = register_map_model(variant)
    prefix = model.config.num_prefix_tokens
    with torch.no_grad():
        resized = model.vit(images(height=24, width=16), interpolate_pos_encoding=True)
        plain = model(images()).logits
        interpolated = model(images(), interpolate_pos_encoding=True).logits
    assert resized.last_hidden_state.shape == (2, prefix + 6 * 4, 32)
    assert resized.pooler_output.shape == (2, 32)
    assert torch.equal(interpolated, plain)  # the trained grid is not resampled at all


@variants
def test_antialiased_interpolation_leaves_the_trained_size_unchanged(variant):
    model = register_map_model(variant)
    antialiased = rebuilt(model, "sdpa", interpolate_antialias=True)
    small = images(height=8, width=12)  # a 2x3 grid: the 4x4 positions are downsampled
    with torch.no_grad():
        assert torch.equal(antialiased(images()).logits, model(images()).logits)
        assert torch.equal(antialiased(images(), interpolate_pos_encoding=True).logits, model(images()).logits)
        downsampled = antialiased(small, interpolate_pos_encoding=True).logits
        assert not torch.allclose(downsampled, model(small, interpolate_pos_encoding=True).logits)


@variants
def test_register_map_model_trains_and_every_parameter_gets_a_gradient(variant):
    model = register_map_model(variant).train()
    pixels, labels = images(batch=8), torch.arange(8) % 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(pixels, labels=labels).loss
        loss.backward()
        if not losses:  # DDP's unused-parameter check fails on any parameter the forward does not use
            assert [name for name, parameter in model.named_parameters() if parameter.grad is None] == []
            assert all(torch.isfinite(parameter.grad).all() for parameter in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.8, losses


@variants
def test_masked_image_modeling_with_registers_and_attention_pooling(variant):
    model = register_map_model(variant, ViTCustomForMaskedImageModeling, **TINY_DECODER).train()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    outputs = model(images(), noise=noise)
    assert outputs.logits.shape == (2, 16, 4 * 4 * 3)
    assert outputs.mask.sum(dim=1).tolist() == [12, 12]
    assert outputs.loss.shape == () and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.vit.embeddings.register_tokens.grad.abs().sum() > 0
    assert model.vit.layers[-1].layer_scale2.gamma.grad.abs().sum() > 0


@pytest.mark.parametrize("overrides", [{"pooling": "map"}, {"pooling": "cls", "fc_norm": True}], ids=["map", "fc_norm"])
def test_masked_image_modeling_leaves_no_parameter_unused(overrides):
    model = register_map_model("cls-reg2-map", ViTCustomForMaskedImageModeling, **TINY_DECODER, **overrides)
    model.train()(images()).loss.backward()
    assert [name for name, parameter in model.named_parameters() if parameter.grad is None] == []


@variants
def test_attention_rollout_of_the_register_map_model(variant):
    model = register_map_model(variant, backend="eager")
    config = model.config
    pixels = images()
    maps = compute_attention_maps(model, pixels)
    assert maps.rollout.shape == (2, 16, 16) and maps.heads.shape == (2, 4, 16, 16)
    with torch.no_grad():
        attentions = model(pixels, output_attentions=True).attentions
    patch_map = pooled_rows(attention_rollout(attentions), config.pooling, config.num_prefix_tokens)
    assert patch_map.reshape(2, *config.grid_size).shape == (2, 4, 4)  # one weight per patch
    for image_map in (patch_map, maps.rollout, maps.heads):
        assert torch.isfinite(image_map).all() and (image_map >= 0).all()


def test_attention_rollout_without_a_class_token_does_not_draw_a_register_row():
    model = register_map_model("reg2-map", backend="eager")
    pixels = images()
    maps = compute_attention_maps(model, pixels)
    with torch.no_grad():
        rollout = attention_rollout(model(pixels, output_attentions=True).attentions)
    first_register_row = patch_map_to_image(rollout[:, 0, model.config.num_prefix_tokens :], (16, 16), 4)
    assert not torch.allclose(maps.rollout, first_register_row)
    patch_rows_mean = patch_map_to_image(pooled_rows(rollout, "mean", model.config.num_prefix_tokens), (16, 16), 4)
    torch.testing.assert_close(maps.rollout, patch_rows_mean)


def test_register_map_models_load_with_trust_remote_code_without_the_package(tmp_path):
    """Both variants, saved here, load in a process that has transformers only and give the same logits."""
    pixels = images()
    torch.save(pixels, tmp_path / "pixels.pt")
    expected = {}
    for variant in REGISTER_MAP_VARIANTS:
        model = register_map_model(variant)
        model.save_pretrained(tmp_path / variant)
        with torch.no_grad():
            expected[variant] = model(pixels).logits
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_vit_custom"] = None  # only the saved code files can serve
        import torch
        from transformers import AutoModelForImageClassification
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        for variant in {list(REGISTER_MAP_VARIANTS)!r}:
            folder = {str(tmp_path)!r} + "/" + variant
            model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                torch.save(model(pixels).logits, folder + "/logits.pt")
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for variant, logits in expected.items():
        assert_max_diff(torch.load(tmp_path / variant / "logits.pt", weights_only=True), logits)


@variants
def test_register_map_model_round_trips_through_from_pretrained_exactly(variant, tmp_path):
    model = register_map_model(variant)
    model.save_pretrained(tmp_path)
    reloaded = ViTCustomForImageClassification.from_pretrained(tmp_path).eval()
    for knob in ("class_token", "num_register_tokens", "pooling", "layer_scale_init_value", "qk_norm", "mlp_type"):
        assert getattr(reloaded.config, knob) == getattr(model.config, knob), knob
    reloaded_state = reloaded.state_dict()
    assert reloaded_state.keys() == model.state_dict().keys()
    assert all(torch.equal(reloaded_state[key], value) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(out_of_the_memory_map(reloaded)(images()).logits, model(images()).logits)


# ---------------------------------------------------------------------------------------------------------------------
# 5-8. Single knobs
# ---------------------------------------------------------------------------------------------------------------------


def tiny_model(model_class=ViTCustomForImageClassification, **overrides):
    torch.manual_seed(0)
    return perturb(model_class(ViTCustomConfig(**tiny_config_kwargs(**overrides)))).eval()


def test_distillation_token_logits_average_the_two_heads():
    model = tiny_model(distillation_token=True)
    pixels = images()
    with torch.no_grad():
        tokens = model.vit(pixels).last_hidden_state
        expected = (model.classifier(tokens[:, 0]) + model.distillation_classifier(tokens[:, 1])) / 2
        logits = model(pixels).logits
    assert tokens.shape == (2, 2 + 16, 32)
    assert_max_diff(logits, expected, tolerance=1e-6)


def test_cls_mean_pooling_concatenates_class_token_and_patch_mean():
    model = tiny_model(pooling="cls_mean", num_register_tokens=2)
    with torch.no_grad():
        outputs = model.vit(images())
    tokens, prefix = outputs.last_hidden_state, model.config.num_prefix_tokens
    assert prefix == 3  # the registers are not averaged with the patches
    assert_max_diff(outputs.pooler_output, torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=1), 1e-6)
    assert model.config.pooled_size == model.classifier.in_features == 2 * 32


@pytest.mark.parametrize("pooling", ["cls", "mean", "map"])
def test_fc_norm_normalises_the_pooled_representation_not_the_tokens(pooling):
    model = tiny_model(ViTCustomModel, fc_norm=True, pooling=pooling)
    assert isinstance(model.layernorm, nn.Identity) and isinstance(model.fc_norm, nn.LayerNorm)
    with torch.no_grad():
        outputs = model(images(), output_hidden_states=True)
        tokens = outputs.last_hidden_state
        if pooling == "map":
            raw_pooled = model.attention_pool(tokens[:, model.config.num_prefix_tokens :])  # the patches, as timm
        else:
            raw_pooled = tokens[:, 0] if pooling == "cls" else tokens[:, 1:].mean(1)
        expected = nn.functional.layer_norm(
            raw_pooled, (32,), model.fc_norm.weight, model.fc_norm.bias, model.config.layer_norm_eps
        )
    assert torch.equal(tokens, outputs.hidden_states[-1])  # the last layer's output, un-normalised
    assert_max_diff(outputs.pooler_output, expected, tolerance=1e-6)


def test_without_fc_norm_the_final_layernorm_is_on_every_token():
    model = tiny_model(ViTCustomModel)
    assert isinstance(model.layernorm, nn.LayerNorm) and isinstance(model.fc_norm, nn.Identity)
    with torch.no_grad():
        outputs = model(images(), output_hidden_states=True)
        assert_max_diff(outputs.last_hidden_state, model.layernorm(outputs.hidden_states[-1]), tolerance=1e-6)


NO_EMBED_CLASS_CASES = {
    "registers-no-embed-class": ({"num_register_tokens": 2, "no_embed_class": True}, 16),
    "registers": ({"num_register_tokens": 2, "no_embed_class": False}, 1 + 2 + 16),
    "distilled-no-embed-class": ({"distillation_token": True, "no_embed_class": True}, 16),
    "distilled": ({"distillation_token": True}, 2 + 16),
    "no-class-token": ({"class_token": False, "pooling": "mean"}, 16),
}


@pytest.mark.parametrize(("overrides", "rows"), NO_EMBED_CLASS_CASES.values(), ids=NO_EMBED_CLASS_CASES.keys())
def test_no_embed_class_gives_position_embeddings_to_the_patches_only(overrides, rows):
    model = tiny_model(ViTCustomModel, **overrides)
    embeddings = model.embeddings
    assert embeddings.position_embeddings.shape == (1, rows, 32)
    assert rows == model.config.num_prefix_positions + 16
    config = model.config
    pixels = images()
    with torch.no_grad():
        tokens = embeddings(pixels)
        learned = torch.cat([torch.zeros(1, 0, 32), *embeddings.prefix_parameters()], dim=1)  # (1, prefix, hidden)
        positions = embeddings.position_embeddings  # (1, prefix positions + patches, hidden)
        expected_prefix = learned if config.no_embed_class else learned + positions[:, : config.num_prefix_positions]
        expected_patches = embeddings.patch_embeddings(pixels) + positions[:, config.num_prefix_positions :]
    assert torch.equal(tokens[:, : config.num_prefix_tokens], expected_prefix.expand(2, -1, -1))
    assert torch.equal(tokens[:, config.num_prefix_tokens :], expected_patches)
