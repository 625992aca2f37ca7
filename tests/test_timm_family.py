"""timm's ViT zoo against timm itself: every standard architecture's knobs, parity per knob combination, `--to timm`.

timm needs torchvision, which does not import beside the CPU build of torch this project pins, so these tests run in
a separate environment (`pip install torch==2.14.1 torchvision==0.29.1 timm`, then this package) and are skipped
wherever timm does not import. The main suite checks the same conversions on timm-format state dicts built from the
published key names (tests/test_family.py, tests/test_conversion.py).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, conversion
from hf_vit_custom.conversion import TIMM_POOLINGS, build_model, convert_from_timm, convert_to_timm

timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")
from timm.layers import PatchEmbed  # noqa: E402
from timm.models.vision_transformer import Block, VisionTransformer  # noqa: E402

TOLERANCE = 1e-5
ACTIVATIONS = {"GELU": "gelu", "QuickGELU": "quick_gelu", "GELUTanh": "gelu_pytorch_tanh", "SiLU": "silu"}


def standard_architectures() -> list[str]:
    """timm's ViTs built from `VisionTransformer` (and DeiT's distilled subclass) with plain blocks and patch embed."""
    names = []
    for name in sorted(set(timm.list_models("vit_*") + timm.list_models("deit*"))):
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
        except Exception:  # architectures that need extra arguments are not standard ones
            continue
        if (
            isinstance(model, VisionTransformer)
            and all(type(block) is Block for block in model.blocks)
            and type(model.patch_embed) is PatchEmbed
        ):
            names.append(name)
    return names


ARCHITECTURES = standard_architectures()


def meta_model(name, **kwargs):
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs)


def timm_truth(model) -> dict:
    block = model.blocks[0]
    return {
        "num_attention_heads": block.attn.num_heads,
        "layer_norm_eps": block.norm1.eps,
        "hidden_act": ACTIVATIONS[type(block.mlp.act).__name__],
        "pooling": TIMM_POOLINGS[model.global_pool],
        "num_prefix_tokens": model.num_prefix_tokens,
        "no_embed_class": model.no_embed_class,
        "hidden_size": model.embed_dim,
        "num_hidden_layers": len(model.blocks),
    }


def our_knobs(config: ViTCustomConfig) -> dict:
    return {
        "num_attention_heads": config.num_attention_heads,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act,
        "pooling": config.pooling,
        "num_prefix_tokens": config.num_prefix_tokens,
        "no_embed_class": config.no_embed_class,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
    }


def test_the_standard_architectures_are_those_of_the_issue():
    """timm 1.0.31: 142 `VisionTransformer` architectures with plain blocks and patch embedding, and DeiT's 4
    distilled ones (a subclass with a second token and head)."""
    distilled = [name for name in ARCHITECTURES if "distilled" in name]
    assert len(ARCHITECTURES) - len(distilled) == 142 and len(distilled) == 4


@pytest.mark.parametrize("with_timm", [True, False], ids=["timm-imported", "name-only"])
def test_every_standard_architecture_converts_with_timm_knobs(with_timm, monkeypatch):
    """Built on the meta device (no weights): the config read from the state dict and the name equals timm's model."""
    if not with_timm:
        monkeypatch.setattr(conversion, "_timm_built_knobs", lambda architecture, model_args: None)
    wrong = {}
    for name in ARCHITECTURES:
        model = meta_model(name)
        if type(model.blocks[0].attn).__name__ == "DiffAttention":
            with pytest.raises(ValueError, match="differential attention"):
                convert_from_timm(model.state_dict(), architecture=name)
            continue
        size = model.patch_embed.img_size
        config, _ = convert_from_timm(model.state_dict(), architecture=name, image_size=tuple(size))
        if our_knobs(config) != timm_truth(model):
            wrong[name] = {
                key: (ours, timm_truth(model)[key])
                for key, ours in our_knobs(config).items()
                if ours != timm_truth(model)[key]
            }
    assert wrong == {}


def one_per_combination() -> list[str]:
    """The first architecture of each distinct combination of knobs."""
    seen, chosen = set(), []
    for name in ARCHITECTURES:
        model = meta_model(name)
        block = model.blocks[0]
        if type(block.attn).__name__ == "DiffAttention":  # refused, tested above
            continue
        combination = (
            type(model).__name__,
            type(block.mlp).__name__,
            type(block.mlp.act).__name__,
            model.global_pool,
            model.no_embed_class,
            model.num_reg_tokens,
            model.cls_token is not None,
            type(block.ls1).__name__,
            type(block.attn.q_norm).__name__,
            type(model.norm_pre).__name__,
            type(model.fc_norm).__name__,
            type(model.norm).__name__,
            model.patch_embed.proj.bias is not None,
            block.attn.qkv.bias is not None,
            block.norm1.eps,
        )
        if combination not in seen:
            seen.add(combination)
            chosen.append(name)
    return chosen


COMBINATIONS = one_per_combination()


def small_random_timm(name):
    """`name` at depth 2 on a 4x4 grid with 5 classes, every parameter perturbed away from its initial value (by
    0.02 per weight, which keeps the logits of the widest models in the tens, where fp32 resolves 1e-5)."""
    torch.manual_seed(0)
    patch = meta_model(name).patch_embed.patch_size[0]
    model = timm.create_model(name, pretrained=False, depth=2, img_size=4 * patch, num_classes=5).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model, 4 * patch


@pytest.mark.parametrize("name", COMBINATIONS)
def test_parity_with_timm_per_knob_combination(name):
    source, size = small_random_timm(name)
    config, converted = convert_from_timm(source.state_dict(), architecture=name, image_size=size)
    model = build_model(config, converted)
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tokens = source.forward_features(pixels)
        logits = source.forward_head(tokens)
        ours = model(pixels, output_hidden_states=False)
        encoder = model.vit(pixels)
    assert (logits - ours.logits).abs().max().item() <= TOLERANCE
    assert (tokens - encoder.last_hidden_state).abs().max().item() <= TOLERANCE
    if not config.distillation_token:  # distilled models pre-pool two tokens
        with torch.no_grad():
            pooled = source.forward_head(tokens, pre_logits=True)
        assert (pooled - encoder.pooler_output).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize(
    "preset",
    [
        "vit-tiny-patch16-224",
        "deit3-small-patch16-224",
        "dinov2-small-reg4-patch14-518",
        "siglip-base-patch16-224",
        "clip-vit-base-patch16",
        "dinov2-giant-patch14-518",
    ],
)
def test_to_timm_snapshot_loads_in_timm(preset, tmp_path):
    """A model of ours, written as a timm Hub snapshot, builds in timm and computes the same logits."""
    torch.manual_seed(0)
    patch = int(preset.split("patch")[1].split("-")[0])
    config = ViTCustomConfig.from_preset(preset, num_hidden_layers=2, image_size=4 * patch, num_labels=3)
    model = ViTCustomForImageClassification(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)  # as `small_random_timm`
    timm_config, state_dict = convert_to_timm(config, model.state_dict())
    save_file(state_dict, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(timm_config))
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    overlay = timm.create_model(
        timm_config["architecture"],
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "model.safetensors"), "num_classes": 3},
        num_classes=3,
        **timm_config["model_args"],
    ).eval()
    pixels = torch.randn(2, 3, 4 * patch, 4 * patch)
    with torch.no_grad():
        ours = model(pixels).logits
        for timm_model in (loaded, overlay):
            assert (timm_model(pixels) - ours).abs().max().item() <= TOLERANCE
