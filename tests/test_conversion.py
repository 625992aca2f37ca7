"""Checkpoint conversion (transformers ViT, timm, JAX .npz) with exact numerical parity, and the conversion script."""

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageClassification, ViTConfig, ViTModel
from transformers import ViTForImageClassification as HFViTForImageClassification

from hf_vit_custom import ViTCustomConfig, ViTCustomModel
from hf_vit_custom.conversion import (
    TRANSFORMERS_OLD_TO_NEW,
    build_model,
    convert_from_jax,
    convert_from_timm,
    convert_from_transformers,
    convert_to_jax,
    convert_to_transformers,
    expected_shapes,
    resample_position_embeddings,
    resize_state_dict,
)

TOLERANCE = 1e-5
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_checkpoint.py"

CONFIGS = {
    "p4-bias-head": {"patch_size": 4, "qkv_bias": True, "num_labels": 5},
    "p8-nobias-head": {"patch_size": 8, "qkv_bias": False, "num_labels": 3},
    "p4-nonsquare-head": {"patch_size": 4, "image_size": (16, 24), "num_labels": 4},
    "p4-encoder": {"patch_size": 4, "num_labels": 0},
}


def vit_config(**overrides):
    kwargs = {
        "image_size": 16,
        "patch_size": 4,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "initializer_range": 0.5,  # large weights so that a wrong layout cannot hide below the tolerance
    }
    kwargs.update(overrides)
    num_labels = kwargs.pop("num_labels", 0)
    config = ViTConfig(**kwargs)
    if num_labels:
        config.id2label = {i: f"class_{i}" for i in range(num_labels)}
        config.label2id = {f"class_{i}": i for i in range(num_labels)}
    return config, num_labels


def hf_model(seed=0, **overrides):
    """A random transformers ViT: `ViTForImageClassification` with labels, else `ViTModel` with its pooler."""
    torch.manual_seed(seed)
    config, num_labels = vit_config(**overrides)
    model = HFViTForImageClassification(config) if num_labels else ViTModel(config)
    with torch.no_grad():  # LayerNorms start at (1, 0): randomise them too so that a swapped norm shows
        for name, param in model.named_parameters():
            if "layernorm" in name or "bias" in name:
                param.normal_(0, 0.5)
    return model.eval()


def images(height, width, batch=2, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def hidden_and_logits(model, pixels, **kwargs):
    with torch.no_grad():
        if hasattr(model, "classifier"):
            out = model(pixels, **kwargs)
            encoder = model.vit(pixels, **kwargs)
            return encoder.last_hidden_state, out.logits
        return model(pixels, **kwargs).last_hidden_state, None


def assert_parity(reference, converted, pixels, **kwargs):
    ref_hidden, ref_logits = hidden_and_logits(reference, pixels, **kwargs)
    hidden, logits = hidden_and_logits(converted, pixels)
    diff = (ref_hidden - hidden).abs().max().item()
    assert diff <= TOLERANCE, diff
    if ref_logits is not None:
        logit_diff = (ref_logits - logits).abs().max().item()
        assert logit_diff <= TOLERANCE, logit_diff
    return diff


def old_layout(state_dict):
    """transformers 4.x key names: the inverse of `TRANSFORMERS_OLD_TO_NEW`."""
    inverse = (
        (r"(^|\.)layers\.(\d+)\.", r"\1encoder.layer.\2."),
        (r"\.attention\.q_proj\.", ".attention.attention.query."),
        (r"\.attention\.k_proj\.", ".attention.attention.key."),
        (r"\.attention\.v_proj\.", ".attention.attention.value."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc1\.", ".intermediate.dense."),
        (r"\.mlp\.fc2\.", ".output.dense."),
    )
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in inverse:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def test_old_layout_renames_match_transformers_mapping():
    """Our table reproduces transformers' own load-time renaming of 4.x ViT checkpoints."""
    model = hf_model(num_labels=3)
    old = old_layout(model.state_dict())
    assert "vit.encoder.layer.0.attention.attention.query.weight" in old
    assert "vit.encoder.layer.1.output.dense.bias" in old and "vit.encoder.layer.1.intermediate.dense.weight" in old
    renamed = set()
    for key in old:
        for pattern, replacement in TRANSFORMERS_OLD_TO_NEW:
            key = re.sub(pattern, replacement, key)
        renamed.add(key)
    assert renamed == set(model.state_dict())


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_parity_and_round_trip(name, layout):
    source = hf_model(**CONFIGS[name])
    state_dict = source.state_dict() if layout == "new" else old_layout(source.state_dict())
    config, converted = convert_from_transformers(state_dict, source.config)
    assert config.layer_norm_eps == 1e-12  # transformers' default, carried over exactly
    model = build_model(config, converted)
    if CONFIGS[name]["num_labels"]:
        assert config.id2label == source.config.id2label
    height, width = config.image_size if isinstance(config.image_size, list) else (config.image_size,) * 2
    assert_parity(source, model, images(height, width))

    # ... and back: the transformers layout again, equal to the source tensor for tensor.
    hf_kwargs, back = convert_to_transformers(config, model.state_dict())
    expected = {key: value for key, value in source.state_dict().items() if not key.startswith("pooler.")}
    assert set(back) == set(expected)
    for key, value in expected.items():
        assert torch.equal(back[key], value), key
    hf_back = (HFViTForImageClassification if "classifier.weight" in back else ViTModel)(
        ViTConfig(**hf_kwargs), **({} if "classifier.weight" in back else {"add_pooling_layer": False})
    )
    hf_back.load_state_dict(back, strict=True)
    assert_parity(hf_back.eval(), model, images(height, width))


def test_pooler_is_dropped_with_a_warning_or_refused(caplog):
    source = hf_model(num_labels=0)
    assert "pooler.dense.weight" in source.state_dict()
    with caplog.at_level(logging.WARNING, logger="hf_vit_custom.conversion"):
        _config, converted = convert_from_transformers(source.state_dict(), source.config)
    assert "pooler" in caplog.text and not any("pooler" in key for key in converted)
    with pytest.raises(ValueError, match="pooler"):
        convert_from_transformers(source.state_dict(), source.config, pooler="error")


def test_bad_transformers_checkpoints_list_the_offending_keys():
    source = hf_model(num_labels=3)
    state_dict = dict(source.state_dict())
    del state_dict["vit.layers.1.attention.k_proj.weight"]
    state_dict["vit.layers.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        convert_from_transformers(state_dict, source.config)
    message = str(error.value)
    assert "layers.1.attention.k_proj.weight" in message and "layers.0.extra.weight" in message
    assert "missing keys" in message and "unknown keys" in message

    state_dict = dict(source.state_dict())
    state_dict["vit.layers.0.mlp.fc1.weight"] = torch.zeros(47, 32)
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.fc1\.weight: \(47, 32\) != expected \(48, 32\)"):
        convert_from_transformers(state_dict, source.config)


def test_unused_source_weights_are_dropped_with_a_note(caplog):
    """A masked-image-modeling mask token (ViT's SimMIM head, DINOv2's unused one) is not part of the encoder."""
    source = hf_model(num_labels=3)
    state_dict = dict(source.state_dict(), **{"vit.embeddings.mask_token": torch.zeros(1, 1, 32)})
    with caplog.at_level(logging.WARNING, logger="hf_vit_custom.conversion"):
        _config, converted = convert_from_transformers(state_dict, source.config)
    assert "mask token" in caplog.text and not any("mask_token" in key for key in converted)


def test_expected_shapes_match_the_model():
    config = ViTCustomConfig(
        image_size=(16, 24), patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_labels=3
    )
    model = build_model(config, {k: v for k, v in ViTCustomModel(config).state_dict().items()})
    assert expected_shapes(config, with_head=False) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


# --- position embeddings ---


@pytest.mark.parametrize("target", [(32, 32), (32, 24)])
def test_resampled_model_matches_transformers_interpolation(target):
    """transformers' ViT interpolates bicubically to `size=(new_h, new_w)`, align_corners=False, as we do, but only
    from a square trained grid; so the source here is square and the targets square and not."""
    source = hf_model(num_labels=3)
    config, converted = convert_from_transformers(source.state_dict(), source.config)
    config, converted = resize_state_dict(config, converted, target)
    assert config.grid_size == (target[0] // 4, target[1] // 4)
    model = build_model(config, converted)
    assert_parity(source, model, images(*target), interpolate_pos_encoding=True)


def test_resample_position_embeddings_non_square_and_identity():
    pos = torch.randn(1, 1 + 4 * 6, 8)
    assert torch.equal(resample_position_embeddings(pos, (4, 6), (4, 6)), pos)
    out = resample_position_embeddings(pos, (4, 6), (8, 3))
    assert out.shape == (1, 1 + 8 * 3, 8) and torch.equal(out[:, :1], pos[:, :1])
    grid = pos[:, 1:].reshape(1, 4, 6, 8).permute(0, 3, 1, 2)
    reference = torch.nn.functional.interpolate(grid, size=(8, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], reference.flatten(2).transpose(1, 2), rtol=0, atol=0)
    with pytest.raises(ValueError, match="do not fit"):
        resample_position_embeddings(pos, (5, 5), (8, 8))


# --- JAX ---


@pytest.mark.parametrize("name", ["p4-bias-head", "p8-nobias-head", "p4-nonsquare-head", "p4-encoder"])
def test_jax_npz_parity(name, tmp_path):
    source = hf_model(**CONFIGS[name])
    config, converted = convert_from_transformers(source.state_dict(), source.config)
    arrays = convert_to_jax(config, converted)
    hidden, heads = config.hidden_size, config.num_attention_heads
    # The published names and shapes.
    assert arrays["embedding/kernel"].shape == (config.patch_size, config.patch_size, 3, hidden)  # HWIO
    attention = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1"
    assert arrays[f"{attention}/query/kernel"].shape == (hidden, heads, hidden // heads)
    assert arrays[f"{attention}/out/kernel"].shape == (heads, hidden // heads, hidden)
    assert arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"].shape == (hidden, 48)
    path = tmp_path / "vit.npz"
    np.savez(path, **arrays)
    image_size = config.image_size if isinstance(config.image_size, list) else None
    jax_config, from_jax = convert_from_jax(dict(np.load(path)), image_size=image_size, layer_norm_eps=1e-12)
    for key, value in converted.items():
        assert torch.equal(from_jax[key], value), key
    model = build_model(jax_config, from_jax)
    height, width = to_hw(jax_config.image_size)
    assert_parity(source, model, images(height, width))


def to_hw(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def test_jax_pre_logits_and_bad_keys():
    source = hf_model(num_labels=3)
    config, converted = convert_from_transformers(source.state_dict(), source.config)
    arrays = convert_to_jax(config, converted)
    with_pre_logits = dict(arrays, **{"pre_logits/kernel": np.zeros((32, 32)), "pre_logits/bias": np.zeros(32)})
    with pytest.raises(ValueError, match="pre_logits"):
        convert_from_jax(with_pre_logits)
    _encoder_config, encoder = convert_from_jax(with_pre_logits, include_head=False)
    assert "classifier.weight" not in encoder and "layernorm.weight" in encoder
    broken = dict(arrays)
    del broken["Transformer/encoderblock_1/LayerNorm_2/scale"]
    broken["Transformer/encoderblock_0/Surprise/kernel"] = np.zeros(2)
    with pytest.raises(ValueError, match=r"(?s)encoderblock_1/LayerNorm_2/scale.*encoderblock_0/Surprise/kernel"):
        convert_from_jax(broken)


# --- timm ---


def timm_state_dict(source):
    """A timm VisionTransformer state dict with the weights of a transformers ViT (names per timm's layout)."""
    _config, converted = convert_from_transformers(source.state_dict(), source.config)
    renames = {
        "vit.embeddings.cls_token": "cls_token",
        "vit.embeddings.position_embeddings": "pos_embed",
        "vit.embeddings.patch_embeddings.projection.": "patch_embed.proj.",
        "vit.layernorm.": "norm.",
        "classifier.": "head.",
        "vit.layers.": "blocks.",
    }
    out = {}
    for key, value in converted.items():
        old = next(old for old in renames if key.startswith(old))
        out[renames[old] + key.removeprefix(old)] = value
    return {key.replace(".attention.", ".attn."): value for key, value in out.items()}


def test_timm_layout_parity_without_timm():
    """timm's key layout (hand-built, since timm is not installed everywhere) converts with exact parity."""
    source = hf_model(num_labels=3)
    state_dict = timm_state_dict(source)
    assert "blocks.0.attn.qkv.weight" in state_dict and "head.weight" in state_dict
    config, converted = convert_from_timm(state_dict, num_heads=4, layer_norm_eps=1e-12)
    assert_parity(source, build_model(config, converted), images(16, 16))


@pytest.mark.parametrize(
    ("extra", "feature"),
    [
        ({"patch_embed.norm.weight": torch.ones(32)}, "patch embedding norm"),
        ({"blocks.0.attn.norm.weight": torch.ones(32)}, "scale_attn_norm"),
        ({"blocks.0.mlp.norm.weight": torch.ones(48)}, "scale_mlp_norm"),
        ({"blocks.0.attn.q_bias": torch.zeros(32)}, "separate q/v biases"),
        ({"blocks.0.attn.rope.freqs": torch.zeros(4)}, "RoPE"),
        ({"blocks.0.attn.q_proj.weight": torch.zeros(32, 32)}, "Eva layout with rotary position embeddings"),
    ],
)
def test_timm_unsupported_variants_are_named(extra, feature):
    state_dict = timm_state_dict(hf_model(num_labels=3)) | extra
    with pytest.raises(ValueError, match=feature):
        convert_from_timm(state_dict, num_heads=4)
    no_positions = {key: value for key, value in timm_state_dict(hf_model(num_labels=3)).items() if key != "pos_embed"}
    with pytest.raises(ValueError, match="no `pos_embed`"):
        convert_from_timm(no_positions, num_heads=4)
    for architecture in ("eva02_base_patch14_224.mim_in22k", "vit_base_patch16_rope_224", "vit_small_patch16_dinov3"):
        with pytest.raises(ValueError, match="no rotary position embeddings"):
            convert_from_timm(timm_state_dict(hf_model(num_labels=3)), architecture=architecture)


def test_timm_model_parity():
    timm = pytest.importorskip("timm", reason="timm is not installed (it needs torchvision)")
    source = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=3
    ).eval()
    config, converted = convert_from_timm(source.state_dict(), num_heads=source.blocks[0].attn.num_heads)
    model = build_model(config, converted)
    pixels = images(32, 32)
    with torch.no_grad():
        ref_logits, ref_hidden = source(pixels), source.forward_features(pixels)
        out = model(pixels)
        hidden = model.vit(pixels).last_hidden_state
    assert (ref_logits - out.logits).abs().max().item() <= TOLERANCE
    assert (ref_hidden - hidden).abs().max().item() <= TOLERANCE


# --- the script ---


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_checkpoint"] = module
    spec.loader.exec_module(module)
    return module


def test_script_transformers_folder(script, tmp_path):
    source = hf_model(num_labels=3)
    source.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    script.main(["--from", "transformers", str(tmp_path / "source"), "--out", str(out), "--image_size", "32"])
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert model.config.model_type == "vit_custom" and to_hw(model.config.image_size) == (32, 32)
    assert_parity(source, model, images(32, 32), interpolate_pos_encoding=True)
    encoder = AutoModel.from_pretrained(out)
    assert isinstance(encoder, ViTCustomModel)
    processor = AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"height": 32, "width": 32}
    # An existing non-empty --out is refused without --overwrite.
    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        script.main(["--from", "transformers", str(tmp_path / "source"), "--out", str(out)])
    script.main(["--from", "transformers", str(tmp_path / "source"), "--out", str(out), "--overwrite"])
    assert to_hw(AutoModel.from_pretrained(out).config.image_size) == (16, 16)


def test_script_jax_and_timm_files(script, tmp_path):
    source = hf_model(num_labels=3)
    config, converted = convert_from_transformers(source.state_dict(), source.config)
    np.savez(tmp_path / "vit.npz", **convert_to_jax(config, converted))
    script.main(["--from", "jax", str(tmp_path / "vit.npz"), "--out", str(tmp_path / "jax")])
    processor = json.loads((tmp_path / "jax" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["image_std"] == [0.5, 0.5, 0.5]
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "jax")
    assert model.config.layer_norm_eps == 1e-6  # the JAX release's epsilon
    save_file(timm_state_dict(source), tmp_path / "timm.safetensors")
    with pytest.raises(ValueError, match="num_heads"):  # width 32 is no standard size: the head count is needed
        script.main(["--from", "timm", str(tmp_path / "timm.safetensors"), "--out", str(tmp_path / "timm")])
    assert not (tmp_path / "timm").exists()
    script.main(
        ["--from", "timm", str(tmp_path / "timm.safetensors"), "--out", str(tmp_path / "timm"), "--num_heads", "4"]
    )
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "timm")
    assert model.config.num_attention_heads == 4
    processor = json.loads((tmp_path / "timm" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5]  # no pretrained cfg: timm's ImageNet-inception default


def test_script_failure_leaves_no_output(script, tmp_path):
    source = hf_model(num_labels=3)
    state_dict = {k: v for k, v in source.state_dict().items() if k != "vit.layers.1.mlp.fc2.bias"}
    (tmp_path / "source").mkdir()
    save_file(state_dict, tmp_path / "source" / "model.safetensors")
    source.config.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.fc2\.bias"):
        script.main(["--from", "transformers", str(tmp_path / "source"), "--out", str(out)])
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no temporary folder left behind either
