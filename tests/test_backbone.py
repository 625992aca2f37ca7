"""ViTCustomBackbone: transformers' backbone API (`out_features` / `out_indices`, `AutoBackbone`) and a dense head."""

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers import AutoBackbone, UperNetConfig, UperNetForSemanticSegmentation

from hf_vit_custom import ViTCustomBackbone, ViTCustomConfig, ViTCustomForImageClassification


def backbone_config(**overrides) -> ViTCustomConfig:
    return ViTCustomConfig(**tiny_config_kwargs(num_hidden_layers=3, **overrides))


def test_auto_backbone_builds_the_backbone_from_the_config():
    assert isinstance(AutoBackbone.from_config(backbone_config()), ViTCustomBackbone)


def test_the_default_stage_follows_a_depth_changed_after_construction():
    config = backbone_config()
    config.update({"num_hidden_layers": 5})
    config.validate()
    assert config.out_features == ["stage5"] and config.stage_names[-1] == "stage5"


def test_stages_are_the_embeddings_then_each_layer_and_the_last_is_the_default():
    config = backbone_config()
    assert config.stage_names == ["stem", "stage1", "stage2", "stage3"]
    assert config.out_features == ["stage3"] and config.out_indices == [3]
    chosen = backbone_config(out_indices=[1, 3])
    assert chosen.out_features == ["stage1", "stage3"]
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        backbone_config(out_features=["stage9"])


def test_feature_maps_drop_the_prefix_tokens_and_keep_the_grid(tmp_path):
    """Non-square input, registers: each map is (batch, hidden, grid_height, grid_width), the final LayerNorm applied,
    equal to the encoder's normalised patch tokens laid out on the grid."""
    torch.manual_seed(0)
    config = backbone_config(num_register_tokens=2, out_features=["stem", "stage2", "stage3"])
    classifier = ViTCustomForImageClassification(config).eval()
    classifier.save_pretrained(tmp_path)
    # `AutoBackbone.from_pretrained` of a local folder fails in transformers 5.24 for every model (it asks the Hub
    # whether the path is a repository); the class loads it, and `AutoBackbone.from_config` builds it (below).
    backbone = ViTCustomBackbone.from_pretrained(tmp_path).eval()
    assert isinstance(backbone, ViTCustomBackbone) and backbone.channels == [32, 32, 32]
    pixels = torch.randn(2, 3, 24, 16)
    with torch.no_grad():
        maps = backbone(pixels, interpolate_pos_encoding=True).feature_maps
        tokens = classifier.vit(pixels, interpolate_pos_encoding=True).last_hidden_state
    assert [tuple(feature_map.shape) for feature_map in maps] == [(2, 32, 6, 4)] * 3
    patches = tokens[:, config.num_prefix_tokens :]  # (batch, 24, hidden), rows of the 6x4 grid
    torch.testing.assert_close(maps[-1], patches.transpose(1, 2).reshape(2, 32, 6, 4), rtol=0, atol=0)


def test_a_model_with_its_final_norm_after_pooling_loads_as_a_backbone(tmp_path):
    """CLIP-style `fc_norm`: the final LayerNorm is saved as `fc_norm`, and the backbone applies it to each stage."""
    torch.manual_seed(0)
    classifier = ViTCustomForImageClassification(backbone_config(fc_norm=True)).eval()
    classifier.save_pretrained(tmp_path)
    backbone = ViTCustomBackbone.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = classifier.vit(pixels).last_hidden_state  # not normalised: fc_norm waits for pooling
        expected = classifier.vit.fc_norm(tokens[:, 1:]).transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(backbone(pixels).feature_maps[-1], expected, rtol=0, atol=0)


def test_hidden_states_on_request_hold_every_stage_with_the_prefix_tokens():
    backbone = ViTCustomBackbone(backbone_config(num_register_tokens=1)).eval()
    with torch.no_grad():
        outputs = backbone(torch.randn(1, 3, 16, 16), output_hidden_states=True)
        plain = backbone(torch.randn(1, 3, 16, 16))
    assert len(outputs.hidden_states) == 4 and outputs.hidden_states[0].shape == (1, 2 + 16, 32)
    assert plain.hidden_states is None


def test_backbone_of_a_dense_prediction_model_trains():
    """UperNet (semantic segmentation) on the backbone: forward, loss and backward reach the encoder."""
    torch.manual_seed(0)
    config = UperNetConfig(
        backbone_config=backbone_config(out_indices=[1, 2, 3]),
        hidden_size=32,
        auxiliary_in_channels=32,
        num_labels=3,
        pool_scales=[1, 2],
    )
    model = UperNetForSemanticSegmentation(config)
    assert isinstance(model.backbone, ViTCustomBackbone)
    outputs = model(pixel_values=torch.randn(2, 3, 16, 16), labels=torch.randint(0, 3, (2, 16, 16)))
    assert outputs.logits.shape == (2, 3, 16, 16) and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert model.backbone.embeddings.patch_embeddings.projection.weight.grad.abs().sum() > 0
