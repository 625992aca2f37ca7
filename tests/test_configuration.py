"""ViTCustomConfig: defaults, presets, validation and serialisation."""

import pytest
from conftest import tiny_config_kwargs
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from hf_vit_custom import MODEL_SIZES, ViTCustomConfig


def test_defaults_are_vit_base_patch16_224():
    config = ViTCustomConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (768, 12, 12)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (3072, 224, 16)
    assert config.model_type == "vit_custom"
    assert config.pooling == "cls"
    assert config.grid_size == (14, 14)


@pytest.mark.parametrize("size", list(MODEL_SIZES))
@pytest.mark.parametrize("patch", [14, 16, 32])
def test_presets_cover_paper_and_deit_sizes(size, patch):
    config = ViTCustomConfig.from_preset(f"vit-{size}-patch{patch}-224")
    assert config.hidden_size == MODEL_SIZES[size]["hidden_size"]
    assert config.num_hidden_layers == MODEL_SIZES[size]["num_hidden_layers"]
    assert config.patch_size == patch
    assert config.image_size == 224


def test_preset_values_match_the_paper():
    large = ViTCustomConfig.from_preset("vit-large-patch16-384")
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )
    assert large.image_size == 384
    small = ViTCustomConfig.from_preset("vit-small-patch16-224", num_labels=10, drop_path_rate=0.1)
    assert (small.hidden_size, small.num_attention_heads, small.num_labels, small.drop_path_rate) == (384, 6, 10, 0.1)


@pytest.mark.parametrize("name", ["vit-gigantic-patch16-224", "vit-base-16-224", "resnet50"])
def test_unknown_preset_is_rejected(name):
    with pytest.raises(ValueError, match="Unknown preset"):
        ViTCustomConfig.from_preset(name)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, r"`hidden_size` \(30\) must be divisible by `num_attention_"),
        ({"image_size": 3}, "`image_size` 3 must hold at least one patch of `patch_size` 4"),
        ({"image_size": [16, 3]}, r"`image_size` \[16, 3\] must hold at least one patch"),
        ({"patch_size": [4, 32]}, "must hold at least one patch of `patch_size`"),
        ({"hidden_size": 0}, "`hidden_size` must be a positive integer"),
        ({"num_hidden_layers": -1}, "`num_hidden_layers` must be a positive integer"),
        ({"num_attention_heads": 0}, "`num_attention_heads` must be a positive integer"),
        ({"intermediate_size": 0}, "`intermediate_size` must be a positive integer"),
        ({"num_channels": 0}, "`num_channels` must be a positive integer"),
        ({"image_size": 0}, "`image_size` must be positive"),
        ({"patch_size": [4, 0]}, "`patch_size` must be positive"),
        ({"image_size": [16, 16, 16]}, r"`image_size` must be an int or a \(height, width\) pair"),
        ({"hidden_dropout_prob": 1.0}, r"`hidden_dropout_prob` is a probability and must lie in \[0, 1\)"),
        ({"attention_probs_dropout_prob": -0.1}, "`attention_probs_dropout_prob` is a probability"),
        ({"drop_path_rate": 1.5}, "`drop_path_rate` is a probability"),
        ({"layer_norm_eps": 0.0}, "`layer_norm_eps` must be positive"),
        ({"initializer_range": -0.02}, "`initializer_range` must be non-negative"),
        ({"hidden_act": "swishy"}, "`hidden_act` 'swishy' is unknown"),
        ({"pooling": "max"}, r"`pooling` must be one of \('cls', 'mean', 'cls_mean', 'map', 'none'\)"),
        ({"mlp_type": "swiglu"}, r"`mlp_type` must be one of \('mlp', 'glu'\)"),
        ({"num_register_tokens": -1}, r"`num_register_tokens` must be a non-negative integer"),
        ({"class_token": False}, r"`pooling='cls'` needs the class token"),
        (
            {"class_token": False, "pooling": "mean", "distillation_token": True},
            r"`distillation_token` needs the class",
        ),
        ({"distillation_token": True, "pooling": "mean"}, r"`distillation_token` pairs with `pooling='cls'`"),
        ({"fc_norm": True, "pooling": "none"}, r"`fc_norm=True` normalises the pooled"),
        ({"layer_scale_init_value": 0.0}, r"`layer_scale_init_value` must be positive"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        ViTCustomConfig(**tiny_config_kwargs(**overrides))


@pytest.mark.parametrize(
    ("field", "value"),
    [("hidden_size", "big"), ("qkv_bias", "yes"), ("pooling", 3), ("image_size", "224"), ("layer_norm_eps", "1e-6")],
)
def test_wrong_types_are_rejected(field, value):
    with pytest.raises(StrictDataclassError, match=field):
        ViTCustomConfig(**tiny_config_kwargs(**{field: value}))


def test_validation_runs_again_when_saving(tmp_path):
    config = ViTCustomConfig(**tiny_config_kwargs())
    config.num_attention_heads = 5
    with pytest.raises(StrictDataclassError, match="must be divisible by `num_attention_heads`"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_round_trip_through_dict_and_auto_config(tmp_path):
    config = ViTCustomConfig(
        **tiny_config_kwargs(image_size=(16, 24), patch_size=(4, 8), pooling="mean", qkv_bias=False, num_labels=3),
        id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
        problem_type="single_label_classification",
    )
    assert ViTCustomConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ViTCustomConfig)
    assert {**loaded.to_dict(), "_name_or_path": ""} == config.to_dict()
    assert loaded.image_size == [16, 24]
    assert loaded.grid_size == (4, 3)
    assert loaded.id2label == {0: "cat", 1: "dog", 2: "bird"}
    assert loaded.problem_type == "single_label_classification"


def test_pixels_past_the_last_full_patch_are_dropped_as_in_timm():
    """SigLIP so400m/14 at 384 px: a 27x27 grid, the last 6 pixel rows and columns unused, as timm and transformers."""
    config = ViTCustomConfig(image_size=384, patch_size=14, hidden_size=32, num_attention_heads=4)
    assert config.grid_size == (27, 27)
    assert ViTCustomConfig(image_size=[18, 16], patch_size=4).grid_size == (4, 4)
