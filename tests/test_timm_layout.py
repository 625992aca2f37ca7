"""timm's `VisionTransformer` layout, without timm: state dicts written from timm's published key names.

timm needs torchvision, which this environment cannot install, so each timm-format state dict here is built by hand
from a transformers reference model, with a mapping written below from timm's key names (timm 1.0.31,
timm/models/vision_transformer.py in huggingface/pytorch-image-models) and transformers 5.x's. Neither
`convert_to_timm` nor `convert_from_transformers` builds a source: that would test the library against itself. Every
parameter of the reference is perturbed, so that a weight in the wrong place cannot hide below the tolerance.
"""

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, ViTCustomModel
from hf_vit_custom.conversion import _timm_name_knobs, build_model, convert_from_timm, convert_to_timm

TOLERANCE = 1e-5  # the same fp32 maths summed in another order
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "convert_checkpoint.py"
SIZE = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "image_size": 30,
    "patch_size": 5,
}
GRID = (30 // 5) ** 2  # 36 patches
LABELS = ["cat", "dog", "fox"]
# timm's `_timm_built_knobs` reads the activation off timm's own model; without timm only the name and the arguments
# say it (see `test_timm_snapshot_keeps_its_activation_without_timm`).
HAS_TIMM = importlib.util.find_spec("timm") is not None


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def reference(model_class: str, config_class: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SIZE, **extra})
    return perturb(getattr(transformers, model_class)(config)).eval()


def images(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 30, 30, generator=torch.Generator().manual_seed(seed))


def to_pair(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def assert_max_diff(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    difference = (actual - expected).abs().max().item()
    assert difference <= tolerance, f"max |diff| {difference:.2e} > {tolerance:.0e}"


# ---------------------------------------------------------------------------------------------------------------------
# transformers 5.x -> timm, from the published names
# ---------------------------------------------------------------------------------------------------------------------


class TimmLayout:
    """Builds a timm state dict from a transformers one and checks that every source weight was used."""

    def __init__(self, source: dict[str, torch.Tensor], unused: tuple[str, ...] = ()):
        self.source, self.out, self.used = source, {}, set(unused)

    def get(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.source[name]

    def put(self, timm_name: str, value: torch.Tensor) -> None:
        assert timm_name not in self.out, timm_name
        self.out[timm_name] = value.detach().clone()

    def copy(self, timm_module: str, source_module: str, bias: bool = True) -> None:
        """A Linear / LayerNorm / Conv2d: `.weight` (and `.bias`) under timm's module name."""
        for parameter in ("weight", "bias") if bias else ("weight",):
            self.put(f"{timm_module}.{parameter}", self.get(f"{source_module}.{parameter}"))

    def cat(self, timm_module: str, source_modules: list[str]) -> None:
        """Fused rows, in the order given (timm's qkv is [q; k; v], SwiGLUPacked's fc1 [gate; up])."""
        for parameter in ("weight", "bias"):
            self.put(f"{timm_module}.{parameter}", torch.cat([self.get(f"{m}.{parameter}") for m in source_modules]))

    def done(self) -> dict[str, torch.Tensor]:
        assert set(self.source) == self.used, f"source weights not mapped: {sorted(set(self.source) - self.used)}"
        return self.out


def dinov2_to_timm(model, split_swiglu: bool = False) -> dict[str, torch.Tensor]:
    """Dinov2Model / Dinov2WithRegistersModel -> timm (`vit_*_patch14_dinov2`, `vit_*_patch14_reg4_dinov2`)."""
    layout = TimmLayout(model.state_dict(), unused=("embeddings.mask_token",))  # masked training only
    positions = layout.get("embeddings.position_embeddings")
    cls_token = layout.get("embeddings.cls_token")
    if "embeddings.register_tokens" in layout.source:
        # timm's reg models use no_embed_class=True: the class token's position is folded into the token.
        layout.put("cls_token", cls_token + positions[:, :1])
        layout.put("reg_token", layout.get("embeddings.register_tokens"))
        layout.put("pos_embed", positions[:, 1:])
    else:
        layout.put("cls_token", cls_token)
        layout.put("pos_embed", positions)
    layout.copy("patch_embed.proj", "embeddings.patch_embeddings.projection")
    for i in range(model.config.num_hidden_layers):
        block, layer = f"blocks.{i}", f"encoder.layer.{i}"
        layout.copy(f"{block}.norm1", f"{layer}.norm1")
        layout.cat(f"{block}.attn.qkv", [f"{layer}.attention.{p}_proj" for p in "qkv"])
        layout.copy(f"{block}.attn.proj", f"{layer}.attention.o_proj")
        layout.put(f"{block}.ls1.gamma", layout.get(f"{layer}.layer_scale1.lambda1"))
        layout.copy(f"{block}.norm2", f"{layer}.norm2")
        if model.config.use_swiglu_ffn and split_swiglu:  # timm's SwiGLU
            layout.copy(f"{block}.mlp.fc1_g", f"{layer}.mlp.gate_proj")
            layout.copy(f"{block}.mlp.fc1_x", f"{layer}.mlp.up_proj")
            layout.copy(f"{block}.mlp.fc2", f"{layer}.mlp.down_proj")
        elif model.config.use_swiglu_ffn:  # timm's SwiGLUPacked: silu(first half) * second half
            layout.cat(f"{block}.mlp.fc1", [f"{layer}.mlp.gate_proj", f"{layer}.mlp.up_proj"])
            layout.copy(f"{block}.mlp.fc2", f"{layer}.mlp.down_proj")
        else:
            layout.copy(f"{block}.mlp.fc1", f"{layer}.mlp.fc1")
            layout.copy(f"{block}.mlp.fc2", f"{layer}.mlp.fc2")
        layout.put(f"{block}.ls2.gamma", layout.get(f"{layer}.layer_scale2.lambda1"))
    layout.copy("norm", "layernorm")
    return layout.done()


def clip_style_blocks(layout: TimmLayout, num_layers: int) -> None:
    """SigLIP's and CLIP's encoder layers (`encoder.layers.{i}.layer_norm1`, `self_attn.{q,k,v,out}_proj`, ...)."""
    for i in range(num_layers):
        block, layer = f"blocks.{i}", f"encoder.layers.{i}"
        layout.copy(f"{block}.norm1", f"{layer}.layer_norm1")
        layout.cat(f"{block}.attn.qkv", [f"{layer}.self_attn.{p}_proj" for p in "qkv"])
        layout.copy(f"{block}.attn.proj", f"{layer}.self_attn.out_proj")
        layout.copy(f"{block}.norm2", f"{layer}.layer_norm2")
        layout.copy(f"{block}.mlp.fc1", f"{layer}.mlp.fc1")
        layout.copy(f"{block}.mlp.fc2", f"{layer}.mlp.fc2")


def siglip_to_timm(model) -> dict[str, torch.Tensor]:
    """SiglipVisionModel -> timm's SigLIP tower (no class token, `norm` on every token, global_pool='map')."""
    layout = TimmLayout(model.state_dict())
    hidden = model.config.hidden_size
    layout.copy("patch_embed.proj", "embeddings.patch_embedding")
    layout.put("pos_embed", layout.get("embeddings.position_embedding.weight").unsqueeze(0))  # (N, D) -> (1, N, D)
    clip_style_blocks(layout, model.config.num_hidden_layers)
    layout.copy("norm", "post_layernorm")
    layout.put("attn_pool.latent", layout.get("head.probe"))
    for parameter in ("weight", "bias"):  # nn.MultiheadAttention's [q; k; v] -> timm's q and [k; v]
        packed = layout.get(f"head.attention.in_proj_{parameter}")
        layout.put(f"attn_pool.q.{parameter}", packed[:hidden])
        layout.put(f"attn_pool.kv.{parameter}", packed[hidden:])
    layout.copy("attn_pool.proj", "head.attention.out_proj")
    layout.copy("attn_pool.norm", "head.layernorm")
    layout.copy("attn_pool.mlp.fc1", "head.mlp.fc1")
    layout.copy("attn_pool.mlp.fc2", "head.mlp.fc2")
    return layout.done()


def clip_to_timm(model) -> dict[str, torch.Tensor]:
    """CLIPVisionModel -> timm's CLIP tower (pre-norm, no patch bias, `norm` on every token, class-token pooling)."""
    layout = TimmLayout(model.state_dict())
    layout.put("cls_token", layout.get("embeddings.class_embedding").reshape(1, 1, -1))  # (D,) -> (1, 1, D)
    layout.put("pos_embed", layout.get("embeddings.position_embedding.weight").unsqueeze(0))
    layout.copy("patch_embed.proj", "embeddings.patch_embedding", bias=False)
    layout.copy("norm_pre", "pre_layrnorm")
    clip_style_blocks(layout, model.config.num_hidden_layers)
    layout.copy("norm", "post_layernorm")
    return layout.done()


def deit_to_timm(model) -> dict[str, torch.Tensor]:
    """DeiTForImageClassificationWithTeacher -> timm's VisionTransformerDistilled (`dist_token`, `head_dist`)."""
    layout = TimmLayout(model.state_dict())
    layout.put("cls_token", layout.get("deit.embeddings.cls_token"))
    layout.put("dist_token", layout.get("deit.embeddings.distillation_token"))
    layout.put("pos_embed", layout.get("deit.embeddings.position_embeddings"))
    layout.copy("patch_embed.proj", "deit.embeddings.patch_embeddings.projection")
    for i in range(model.config.num_hidden_layers):
        block, layer = f"blocks.{i}", f"deit.layers.{i}"
        layout.copy(f"{block}.norm1", f"{layer}.layernorm_before")
        layout.cat(f"{block}.attn.qkv", [f"{layer}.attention.{p}_proj" for p in "qkv"])
        layout.copy(f"{block}.attn.proj", f"{layer}.attention.o_proj")
        layout.copy(f"{block}.norm2", f"{layer}.layernorm_after")
        layout.copy(f"{block}.mlp.fc1", f"{layer}.mlp.fc1")
        layout.copy(f"{block}.mlp.fc2", f"{layer}.mlp.fc2")
    layout.copy("norm", "deit.layernorm")
    layout.copy("head", "cls_classifier")
    layout.copy("head_dist", "distillation_classifier")
    return layout.done()


# ---------------------------------------------------------------------------------------------------------------------
# 1-5. Parity per family
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu-packed"])
def test_dinov2_layer_scale_and_packed_swiglu(swiglu):
    source = reference("Dinov2Model", "Dinov2Config", use_swiglu_ffn=swiglu)
    state_dict = dinov2_to_timm(source)
    assert state_dict["blocks.1.ls2.gamma"].shape == (32,)
    if swiglu:  # SwiGLUPacked: fc1 holds the gate rows, then the up rows
        width = source.state_dict()["encoder.layer.0.mlp.gate_proj.weight"].shape[0]
        assert state_dict["blocks.0.mlp.fc1.weight"].shape == (2 * width, 32)
    # timm's DINOv2 names: SwiGLUPacked is vit_giant's (SiLU), the plain MLP vit_small's. Their width rule is for
    # 1536 / 384 channels and none of timm's models is 32 wide, so the tiny model's 4 heads are passed.
    architecture = "vit_giant_patch14_dinov2" if swiglu else "vit_small_patch14_dinov2"
    config, converted = convert_from_timm(state_dict, architecture=architecture, num_heads=4)
    assert config.layer_scale_init_value is not None and config.layer_norm_eps == 1e-6
    assert (config.mlp_type, config.hidden_act) == (("glu", "silu") if swiglu else ("mlp", "gelu"))
    assert (config.class_token, config.num_prefix_tokens, config.pooling) == (True, 1, "cls")
    ours = build_model(config, converted)
    pixels = images()
    with torch.no_grad():
        expected, actual = source(pixels), ours(pixels)
    assert_max_diff(actual.last_hidden_state, expected.last_hidden_state)
    assert_max_diff(actual.pooler_output, expected.pooler_output)


def test_dinov2_registers_as_timm_folds_the_class_position():
    source = reference("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=4)
    state_dict = dinov2_to_timm(source)
    assert state_dict["pos_embed"].shape == (1, GRID, 32) and state_dict["reg_token"].shape == (1, 4, 32)
    config, converted = convert_from_timm(state_dict, architecture="vit_small_patch14_reg4_dinov2", num_heads=4)
    assert (config.no_embed_class, config.num_register_tokens, config.num_prefix_tokens) == (True, 4, 5)
    assert config.num_prefix_positions == 0 and to_pair(config.image_size) == (30, 30)
    ours = build_model(config, converted)
    pixels = images()
    with torch.no_grad():
        expected, actual = source(pixels), ours(pixels)
    # [class, 4 registers, 36 patches] in both.
    assert_max_diff(actual.last_hidden_state, expected.last_hidden_state)
    assert_max_diff(actual.pooler_output, expected.pooler_output)


def test_siglip_attention_pool_as_timm_attn_pool():
    source = reference("SiglipVisionModel", "SiglipVisionConfig")
    state_dict = siglip_to_timm(source)
    assert "cls_token" not in state_dict and state_dict["attn_pool.kv.weight"].shape == (64, 32)
    config, converted = convert_from_timm(state_dict, num_heads=4, hidden_act="gelu_pytorch_tanh")
    assert (config.class_token, config.pooling, config.num_prefix_tokens) == (False, "map", 0)
    assert (config.final_norm, config.fc_norm, config.no_embed_class) == (True, False, False)
    ours = build_model(config, converted)
    pixels = images()
    with torch.no_grad():
        expected, actual = source(pixels), ours(pixels)
    assert_max_diff(actual.last_hidden_state, expected.last_hidden_state)
    assert_max_diff(actual.pooler_output, expected.pooler_output)


def test_clip_tower_as_timm():
    source = reference("CLIPVisionModel", "CLIPVisionConfig")
    assert (source.config.hidden_act, source.config.layer_norm_eps) == ("quick_gelu", 1e-5)
    state_dict = clip_to_timm(source)
    assert "patch_embed.proj.bias" not in state_dict and "norm_pre.weight" in state_dict
    config, converted = convert_from_timm(state_dict, num_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    assert (config.pre_norm, config.patch_embedding_bias, config.pooling) == (True, False, "cls")
    assert (config.final_norm, config.fc_norm) == (True, False)  # timm's `norm` on every token, not `fc_norm`
    ours = build_model(config, converted)
    pixels = images()
    with torch.no_grad():
        expected, actual = source(pixels), ours(pixels)
        # transformers normalises the pooled class token only; timm (and so ours) every token.
        normalised = source.post_layernorm(expected.last_hidden_state)
    assert_max_diff(actual.pooler_output, expected.pooler_output)
    assert_max_diff(actual.last_hidden_state, normalised)


def test_timm_name_knobs():
    clip = _timm_name_knobs("vit_base_patch16_clip_quickgelu_224.openai", 768)
    assert clip == {"num_attention_heads": 12, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}
    siglip = _timm_name_knobs("vit_so400m_patch16_siglip_256.v2_webli", 1152)
    assert siglip == {"num_attention_heads": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
    # Neither quickgelu nor a SigLIP 2 name: the activation is left to the default (GELU, SiLU for SwiGLU).
    assert _timm_name_knobs("vit_base_patch16_clip_224.laion2b", 768) == {
        "num_attention_heads": 12,
        "layer_norm_eps": 1e-5,
    }
    assert _timm_name_knobs("vit_small_patch14_dinov2.lvd142m", 384) == {
        "num_attention_heads": 6,
        "layer_norm_eps": 1e-6,
    }
    assert _timm_name_knobs("vit_huge_patch14_clip_224", 1280)["num_attention_heads"] == 16
    assert _timm_name_knobs("vit_large_patch16_224", 1024)["num_attention_heads"] == 16
    assert _timm_name_knobs("vit_tiny_patch16_224", 192)["num_attention_heads"] == 3
    # A width none of timm's models has: no answer, so the conversion asks for `num_heads` (see the script tests).
    assert _timm_name_knobs("vit_small_patch14_dinov2", 32)["num_attention_heads"] is None


def test_deit_distilled_as_timm():
    # timm's DeiT LayerNorms use eps 1e-6 (transformers' DeiTConfig defaults to 1e-12): the reference uses timm's.
    source = reference("DeiTForImageClassificationWithTeacher", "DeiTConfig", layer_norm_eps=1e-6, num_labels=3)
    state_dict = deit_to_timm(source)
    assert state_dict["pos_embed"].shape == (1, 2 + GRID, 32)
    config, converted = convert_from_timm(state_dict, num_heads=4, id2label=source.config.id2label)
    assert (config.distillation_token, config.num_prefix_tokens, config.no_embed_class) == (True, 2, False)
    ours = build_model(config, converted)
    assert isinstance(ours, ViTCustomForImageClassification) and ours.config.id2label == source.config.id2label
    pixels = images()
    with torch.no_grad():
        expected, actual = source(pixels), ours(pixels)
        tokens = source.deit(pixels).last_hidden_state
    assert_max_diff(actual.logits, expected.logits)  # (head(class) + head_dist(distillation)) / 2
    assert_max_diff(ours.vit(pixels).last_hidden_state.detach(), tokens)


# ---------------------------------------------------------------------------------------------------------------------
# 6. timm's split SwiGLU
# ---------------------------------------------------------------------------------------------------------------------


def test_split_swiglu_converts_like_packed():
    source = reference("Dinov2Model", "Dinov2Config", use_swiglu_ffn=True)
    packed, split = dinov2_to_timm(source), dinov2_to_timm(source, split_swiglu=True)
    assert "blocks.0.mlp.fc1_g.weight" in split and "blocks.0.mlp.fc1.weight" not in split
    packed_config, from_packed = convert_from_timm(packed, num_heads=4)
    split_config, from_split = convert_from_timm(split, num_heads=4)
    assert split_config.to_dict() == packed_config.to_dict()
    assert set(from_split) == set(from_packed)
    for key, value in from_packed.items():
        assert torch.equal(from_split[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# 7-8. The script: a timm Hub snapshot in, and --to timm out
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["convert_checkpoint"] = module
    spec.loader.exec_module(module)
    return module


MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def snapshot(script, tmp_path_factory):
    """A timm Hub snapshot of a DINOv2-with-registers model with a class-token head, and its conversion."""
    root = tmp_path_factory.mktemp("timm_snapshot")
    source = reference("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", num_register_tokens=4)
    generator = torch.Generator().manual_seed(2)
    head = {"head.weight": torch.randn(3, 32, generator=generator), "head.bias": torch.randn(3, generator=generator)}
    state_dict = dinov2_to_timm(source) | head
    folder = root / "timm"
    folder.mkdir()
    save_file(state_dict, folder / "model.safetensors")
    timm_config = {
        # A real architecture's name; its width rule would say 1 head at 32 channels, `model_args` says 4.
        "architecture": "vit_small_patch14_reg4_dinov2",
        "num_classes": 3,
        "global_pool": "token",
        "label_names": LABELS,
        "model_args": {
            "img_size": 30,
            "patch_size": 5,
            "embed_dim": 32,
            "depth": 2,
            "num_heads": 4,
            "init_values": 1.0,
            "reg_tokens": 4,
            "no_embed_class": True,
        },
        "pretrained_cfg": {
            "input_size": [3, 30, 30],
            "crop_pct": 0.875,
            "interpolation": "bicubic",
            "mean": MEAN,
            "std": STD,
            "num_classes": 3,
        },
    }
    (folder / "config.json").write_text(json.dumps(timm_config))
    out = root / "vit_custom"
    script.main(["--from", "timm", str(folder), "--out", str(out)])
    return {"root": root, "source": source, "head": head, "state_dict": state_dict, "folder": folder, "out": out}


def reference_logits(snapshot, pixels):
    """timm's class-token head on transformers' pooled (normalised) class token."""
    with torch.no_grad():
        pooled = snapshot["source"](pixels).pooler_output
    return torch.nn.functional.linear(pooled, snapshot["head"]["head.weight"], snapshot["head"]["head.bias"])


def test_script_reads_a_timm_snapshot(snapshot):
    model = AutoModelForImageClassification.from_pretrained(snapshot["out"]).eval()
    assert isinstance(model, ViTCustomForImageClassification)
    assert model.config.num_attention_heads == 4 and model.config.num_register_tokens == 4
    assert model.config.layer_scale_init_value == 1.0  # model_args' init_values
    assert model.config.id2label == dict(enumerate(LABELS))
    pixels = images()
    with torch.no_grad():
        logits = model(pixels).logits
    assert_max_diff(logits, reference_logits(snapshot, pixels))

    processor = AutoImageProcessor.from_pretrained(snapshot["out"])
    assert processor.crop_size == {"height": 30, "width": 30}
    assert processor.size["shortest_edge"] == math.floor(30 / 0.875) == 34
    assert list(processor.image_mean) == MEAN and list(processor.image_std) == STD
    assert int(processor.resample) == 3  # PIL bicubic


def test_script_without_an_architecture_or_num_heads_is_refused(script, snapshot):
    root = snapshot["root"]
    bare = root / "bare.safetensors"
    save_file(snapshot["state_dict"], bare)
    with pytest.raises(ValueError, match="num_heads"):
        script.main(["--from", "timm", str(bare), "--out", str(root / "bare_no_name")])
    assert not (root / "bare_no_name").exists()
    out = root / "bare_heads"
    script.main(["--from", "timm", str(bare), "--out", str(out), "--num_heads", "4"])
    model = AutoModelForImageClassification.from_pretrained(out).eval()
    assert to_pair(model.config.image_size) == (30, 30)  # 36 positions: the grid, no prefix positions
    pixels = images()
    with torch.no_grad():
        assert_max_diff(model(pixels).logits, reference_logits(snapshot, pixels))


@pytest.mark.skipif(HAS_TIMM, reason="with timm the head count comes from timm's own model of the architecture")
@pytest.mark.parametrize("layout", ["bare-file", "snapshot-without-num_heads"])
def test_script_refuses_a_width_no_timm_model_has_without_num_heads(script, snapshot, layout):
    """An architecture name and no head count (no --num_heads, no model_args.num_heads) at a width none of timm's
    models has (32 channels): the head count cannot be inferred, so the script names the flag and writes nothing."""
    root = snapshot["root"] / layout
    root.mkdir()
    if layout == "bare-file":
        source = root / "weights.safetensors"
        save_file(snapshot["state_dict"], source)
        extra = ["--architecture", "vit_small_patch14_reg4_dinov2"]
    else:
        source = root / "snapshot"
        shutil.copytree(snapshot["folder"], source)
        timm_config = json.loads((source / "config.json").read_text())
        del timm_config["model_args"]["num_heads"]
        (source / "config.json").write_text(json.dumps(timm_config))
        extra = []
    with pytest.raises(ValueError, match=r"width 32 is none of timm's standard ones: pass `num_heads` \(--num_heads\)"):
        script.main(["--from", "timm", str(source), "--out", str(root / "out"), *extra])
    assert not (root / "out").exists()


def test_script_to_timm_writes_timm_names(script, snapshot):
    target = snapshot["root"] / "back_to_timm"
    script.main(["--from", "vit_custom", str(snapshot["out"]), "--to", "timm", "--out", str(target)])
    assert sorted(path.name for path in target.iterdir()) == ["config.json", "model.safetensors"]
    timm_config = json.loads((target / "config.json").read_text())
    assert timm_config["architecture"] == "vit_base_patch16_224"  # gelu, eps 1e-6: model_args say the rest
    model_args = timm_config["model_args"]
    assert {key: model_args[key] for key in ("embed_dim", "depth", "num_heads", "reg_tokens")} == {
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 4,
        "reg_tokens": 4,
    }
    assert model_args["no_embed_class"] is True and model_args["class_token"] is True
    assert model_args["global_pool"] == timm_config["global_pool"] == "token"
    assert model_args["init_values"] == 1.0 and model_args["act_layer"] == "gelu"
    pretrained_cfg = timm_config["pretrained_cfg"]
    assert pretrained_cfg["input_size"] == [3, 30, 30] and pretrained_cfg["interpolation"] == "bicubic"
    assert pretrained_cfg["mean"] == pytest.approx(MEAN) and pretrained_cfg["std"] == pytest.approx(STD)
    assert pretrained_cfg["crop_pct"] == pytest.approx(30 / 34)  # 30 / floor(30 / 0.875)
    assert timm_config["label_names"] == LABELS and timm_config["num_classes"] == 3

    written = load_file(target / "model.safetensors")
    assert {"blocks.0.attn.qkv.weight", "blocks.1.ls2.gamma", "reg_token", "cls_token", "head.weight"} <= set(written)
    # The very layout written by hand from timm's names, tensor for tensor.
    assert set(written) == set(snapshot["state_dict"])
    for key, value in snapshot["state_dict"].items():
        assert torch.equal(written[key], value), key

    ours = AutoModelForImageClassification.from_pretrained(snapshot["out"]).state_dict()
    _config, back = convert_from_timm(
        written,
        architecture=timm_config["architecture"],
        model_args=model_args,
        image_size=tuple(pretrained_cfg["input_size"][1:]),
        global_pool=timm_config["global_pool"],
        id2label=dict(enumerate(timm_config["label_names"])),
    )
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key

    with pytest.raises(FileExistsError, match="exists and is not empty; pass --overwrite"):
        script.main(["--from", "vit_custom", str(snapshot["out"]), "--to", "timm", "--out", str(target)])


@pytest.mark.parametrize(
    "knobs",
    [
        {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "pre_norm": True, "patch_embedding_bias": False},
        {"hidden_act": "gelu_pytorch_tanh", "class_token": False, "pooling": "map"},
    ],
    ids=["clip-quick-gelu", "siglip-gelu-tanh"],
)
def test_timm_snapshot_keeps_its_activation_without_timm(knobs):
    config = ViTCustomConfig(**SIZE, **knobs)
    torch.manual_seed(0)
    timm_config, timm_state_dict = convert_to_timm(config, ViTCustomModel(config).state_dict())
    back, _ = convert_from_timm(
        timm_state_dict,
        architecture=timm_config["architecture"],
        model_args=timm_config["model_args"],
        global_pool=timm_config["global_pool"],
    )
    assert back.hidden_act == config.hidden_act


def test_script_to_timm_of_a_clip_tower(script, tmp_path):
    source = reference("CLIPVisionModel", "CLIPVisionConfig")
    config, converted = convert_from_timm(
        clip_to_timm(source), num_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5
    )
    build_model(config, converted).save_pretrained(tmp_path / "clip")
    script.main(["--from", "vit_custom", str(tmp_path / "clip"), "--to", "timm", "--out", str(tmp_path / "timm")])
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"]["act_layer"] == "quick_gelu"


# ---------------------------------------------------------------------------------------------------------------------
# 9. What timm cannot hold
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"pooling": "cls_mean"}, r"pooling='cls_mean'"),
        ({"layer_norm_eps": 1e-12}, r"eps 1e-6.*1e-12"),
        ({"hidden_act": "relu"}, r"hidden_act='relu'"),
    ],
    ids=["cls-mean", "eps-1e-12", "relu"],
)
def test_convert_to_timm_refuses(knobs, message):
    config = ViTCustomConfig(**SIZE, **knobs)
    with pytest.raises(ValueError, match=message):
        convert_to_timm(config, ViTCustomModel(config).state_dict())
