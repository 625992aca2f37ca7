"""ViTCustomModel and ViTCustomForImageClassification: architecture, backends, outputs, saving and loading."""

import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import out_of_the_memory_map, tiny_config_kwargs
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTImageProcessorPil,
    pipeline,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from hf_vit_custom import (
    ViTCustomConfig,
    ViTCustomForImageClassification,
    ViTCustomForMaskedImageModeling,
    ViTCustomModel,
)
from hf_vit_custom.modeling_vit_custom import ViTCustomDropPath

BACKENDS = ["eager", "sdpa", "flex_attention"]
FP32_TOLERANCE = 1e-5  # different summation orders of the same fp32 maths


def build(model_class=ViTCustomForImageClassification, attn_implementation="sdpa", seed=0, **overrides):
    torch.manual_seed(seed)
    config = ViTCustomConfig(**tiny_config_kwargs(**overrides))
    return model_class._from_config(config, attn_implementation=attn_implementation).eval()


def images(batch=2, channels=3, height=16, width=16, seed=1):
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_output_shapes(pooling):
    model = build(ViTCustomModel, pooling=pooling)
    outputs = model(images(batch=3))
    assert isinstance(outputs, BaseModelOutputWithPooling)
    assert outputs.last_hidden_state.shape == (3, 16 + 1, 32)
    assert outputs.pooler_output.shape == (3, 32)
    assert outputs.hidden_states is None and outputs.attentions is None


def test_cls_pooling_takes_the_class_token_and_mean_pooling_skips_it():
    cls_model = build(ViTCustomModel, pooling="cls")
    mean_model = build(ViTCustomModel, pooling="mean")
    mean_model.load_state_dict(cls_model.state_dict())
    pixels = images()
    cls_out, mean_out = cls_model(pixels), mean_model(pixels)
    torch.testing.assert_close(cls_out.last_hidden_state, mean_out.last_hidden_state)
    torch.testing.assert_close(cls_out.pooler_output, cls_out.last_hidden_state[:, 0])
    torch.testing.assert_close(mean_out.pooler_output, mean_out.last_hidden_state[:, 1:].mean(dim=1))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classification_output_shapes(pooling):
    model = build(pooling=pooling, num_labels=7)
    outputs = model(images(batch=4))
    assert isinstance(outputs, ImageClassifierOutput)
    assert outputs.logits.shape == (4, 7)
    assert outputs.loss is None


def test_hidden_states_and_attentions_on_request():
    model = build(ViTCustomModel)
    outputs = model(images(), output_hidden_states=True, output_attentions=True)
    assert len(outputs.hidden_states) == 2 + 1  # the embeddings, then each layer
    assert all(state.shape == (2, 17, 32) for state in outputs.hidden_states)
    assert len(outputs.attentions) == 2
    assert all(weights.shape == (2, 4, 17, 17) for weights in outputs.attentions)
    torch.testing.assert_close(outputs.attentions[0].sum(-1), torch.ones(2, 4, 17))


def test_tuple_outputs_when_return_dict_is_false():
    model = build()
    labels = torch.tensor([0, 3])
    as_dict = model(images(), labels=labels)
    as_tuple = model(images(), labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)
    encoder_tuple = build(ViTCustomModel)(images(), return_dict=False)
    assert len(encoder_tuple) == 2 and encoder_tuple[0].shape == (2, 17, 32)


def test_single_label_loss_is_cross_entropy():
    model = build(num_labels=5)
    labels = torch.tensor([1, 4])
    outputs = model(images(), labels=labels)
    torch.testing.assert_close(outputs.loss, torch.nn.functional.cross_entropy(outputs.logits, labels))
    assert model.config.problem_type == "single_label_classification"


def test_multi_label_loss_is_binary_cross_entropy():
    model = build(num_labels=5, problem_type="multi_label_classification")
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0, 1.0]])
    outputs = model(images(), labels=labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, labels)
    torch.testing.assert_close(outputs.loss, expected)


def test_regression_loss_is_mean_squared_error():
    model = build(num_labels=1)
    labels = torch.tensor([0.5, -1.5])
    outputs = model(images(), labels=labels)
    assert model.config.problem_type == "regression"
    torch.testing.assert_close(outputs.loss, torch.nn.functional.mse_loss(outputs.logits.squeeze(), labels))


@pytest.mark.parametrize("output_attentions", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "flex_attention"])
def test_backends_match_eager(backend, output_attentions):
    eager = build(attn_implementation="eager")
    other = build(attn_implementation=backend)
    assert other.config._attn_implementation == backend
    pixels = images()
    # FlexAttention has no CPU backward, so compare inference outputs.
    with torch.no_grad():
        expected = eager(pixels, output_attentions=output_attentions, output_hidden_states=True)
        actual = other(pixels, output_attentions=output_attentions, output_hidden_states=True)
    assert (expected.logits - actual.logits).abs().max() <= FP32_TOLERANCE
    assert (expected.hidden_states[-1] - actual.hidden_states[-1]).abs().max() <= FP32_TOLERANCE
    if output_attentions:
        # Real weights whatever the backend (transformers' own ViT returns none under SDPA).
        assert len(actual.attentions) == 2
        for expected_weights, actual_weights in zip(expected.attentions, actual.attentions, strict=True):
            assert (expected_weights - actual_weights).abs().max() <= FP32_TOLERANCE


def test_sdpa_gradients_match_eager():
    eager, sdpa = build(attn_implementation="eager"), build(attn_implementation="sdpa")
    # Eval mode: SDPA's own kernel (on the CPU, training mode takes the eager maths)
    labels = torch.tensor([0, 2])
    eager(images(), labels=labels).loss.backward()
    sdpa(images(), labels=labels).loss.backward()
    for (name, eager_param), sdpa_param in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(eager_param.grad, sdpa_param.grad, atol=FP32_TOLERANCE, rtol=0, msg=name)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = build(), build()
    checkpointed.activation_checkpointing_enable()
    checkpointed.train()
    plain.train()
    assert checkpointed.is_activation_checkpointing
    labels = torch.tensor([1, 3])
    plain(images(), labels=labels).loss.backward()
    checkpointed(images(), labels=labels).loss.backward()
    for (name, param), checkpointed_param in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(param.grad, checkpointed_param.grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_every_parameter_receives_a_gradient(pooling):
    """DDP's unused-parameter check fails on any module the forward does not use."""
    model = build(pooling=pooling).train()
    model(images(), labels=torch.tensor([0, 1])).loss.backward()
    unused = [name for name, param in model.named_parameters() if param.grad is None]
    assert unused == []


def test_architecture_follows_the_paper():
    model = build(ViTCustomModel)
    layer = model.layers[0]
    assert isinstance(model.embeddings.patch_embeddings.projection, torch.nn.Conv2d)
    assert model.embeddings.cls_token.shape == (1, 1, 32)
    assert model.embeddings.position_embeddings.shape == (1, 17, 32)
    assert layer.attention.qkv.out_features == 3 * 32  # one fused projection
    assert layer.mlp.fc1.out_features == 64 and layer.mlp.fc2.out_features == 32
    assert isinstance(model.layernorm, torch.nn.LayerNorm)
    assert not hasattr(model, "pooler")
    # Pre-norm residual: with zeroed branches, a layer is the identity.
    with torch.no_grad():
        layer.attention.proj.weight.zero_()
        layer.attention.proj.bias.zero_()
        layer.mlp.fc2.weight.zero_()
        layer.mlp.fc2.bias.zero_()
    tokens = torch.randn(2, 17, 32)
    torch.testing.assert_close(layer(tokens), tokens)


@pytest.mark.parametrize("size", [(16, 16), (19, 22)])
def test_patch_embedding_is_the_strided_convolution(size):
    patches = build(ViTCustomModel).embeddings.patch_embeddings
    pixels = torch.randn(2, 3, *size)
    expected = patches.projection(pixels).flatten(2).transpose(1, 2)  # leftover rows and columns dropped
    torch.testing.assert_close(patches(pixels), expected, atol=FP32_TOLERANCE, rtol=0)


def test_mlp_has_no_activation_after_its_second_linear_layer():
    mlp = build(ViTCustomModel).layers[0].mlp
    tokens = torch.randn(2, 5, 32)
    linear = torch.nn.functional.linear
    expected = linear(
        torch.nn.functional.gelu(linear(tokens, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias
    )
    torch.testing.assert_close(mlp(tokens), expected)
    assert (mlp(tokens) < 0).any()


def test_qkv_bias_switch():
    assert build(ViTCustomModel, qkv_bias=False).layers[0].attention.qkv.bias is None
    assert build(ViTCustomModel, qkv_bias=True).layers[0].attention.qkv.bias is not None


def test_weight_initialisation_is_truncated_normal_with_zero_biases():
    model = build(hidden_size=64, intermediate_size=256, initializer_range=0.02)
    positions = model.vit.embeddings.position_embeddings
    assert positions.abs().max() <= 2 * 0.02
    assert 0.012 < positions.std() < 0.025  # a 2-sigma truncated normal has std 0.88 sigma
    assert model.vit.embeddings.cls_token.abs().max() <= 2 * 0.02
    fc1 = model.vit.layers[0].mlp.fc1
    assert fc1.weight.abs().max() <= 2 * 0.02 and 0.012 < fc1.weight.std() < 0.025
    assert torch.count_nonzero(fc1.bias) == 0
    assert torch.count_nonzero(model.vit.layers[0].attention.qkv.bias) == 0
    assert torch.equal(model.vit.layernorm.weight, torch.ones(64))


def test_same_seed_gives_same_weights():
    first, second, other = build(seed=3), build(seed=3), build(seed=4)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert not torch.equal(first.vit.layers[0].attention.qkv.weight, other.vit.layers[0].attention.qkv.weight)


def test_model_builds_on_the_meta_device():
    config = ViTCustomConfig(**tiny_config_kwargs(drop_path_rate=0.1))
    with torch.device("meta"):
        model = ViTCustomForImageClassification(config)
    assert model.vit.layers[0].attention.qkv.weight.is_meta
    assert model.classifier.weight.shape == (5, 32)


def test_stochastic_depth_rates_rise_linearly_and_only_act_in_training():
    model = build(ViTCustomModel, num_hidden_layers=3, drop_path_rate=0.2)
    assert [layer.drop_path.drop_prob for layer in model.layers] == pytest.approx([0.0, 0.1, 0.2])
    drop_path = ViTCustomDropPath(0.5)
    tokens = torch.ones(400, 3, 2)
    assert torch.equal(drop_path.eval()(tokens), tokens)
    dropped = drop_path.train()(tokens)
    per_sample = dropped[:, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, 2.0}  # kept samples are rescaled by 1 / keep_prob
    assert torch.all(dropped == per_sample[:, None, None])  # whole samples, not single elements
    assert 0.35 < (per_sample == 0).float().mean() < 0.65


@pytest.mark.parametrize(
    ("height", "width"),
    [(32, 32), (16, 28), (24, 8)],  # 2x, and non-square both ways
)
def test_interpolated_position_embeddings(height, width):
    model = build(ViTCustomModel)
    outputs = model(images(height=height, width=width), interpolate_pos_encoding=True)
    assert outputs.last_hidden_state.shape == (2, (height // 4) * (width // 4) + 1, 32)


def test_interpolation_at_the_trained_size_is_the_identity():
    model = build(ViTCustomModel)
    pixels = images()
    torch.testing.assert_close(model(pixels, interpolate_pos_encoding=True).last_hidden_state, model(pixels)[0])


def test_interpolation_resamples_a_non_square_grid_without_transposing_it():
    """A position embedding that varies only along the width must still vary only along the width."""
    model = build(ViTCustomModel, image_size=[8, 16], patch_size=[4, 2])  # 2 x 8 grid
    embeddings = model.embeddings
    grid_height, grid_width = embeddings.grid_size
    assert (grid_height, grid_width) == (2, 8)
    column = torch.arange(grid_width, dtype=torch.float32).repeat(grid_height)
    with torch.no_grad():
        embeddings.position_embeddings[0, 1:] = column[:, None].expand(-1, 32)
    resampled = embeddings.interpolate_pos_encoding(4, 16)[0, 1:, 0].reshape(4, 16)
    assert torch.allclose(resampled, resampled[:1].expand(4, -1))  # rows identical
    assert resampled[0, -1] > resampled[0, 0]  # increasing along the width
    outputs = model(images(height=16, width=32), interpolate_pos_encoding=True)
    assert outputs.last_hidden_state.shape == (2, 4 * 16 + 1, 32)


def test_config_flag_makes_interpolation_the_default():
    model = build(ViTCustomModel, interpolate_pos_encoding=True)
    assert model(images(height=24, width=32)).last_hidden_state.shape == (2, 6 * 8 + 1, 32)
    with pytest.raises(ValueError, match="does not match"):
        model(images(height=24, width=32), interpolate_pos_encoding=False)


@pytest.mark.parametrize(
    ("pixels", "kwargs", "message"),
    [
        (torch.randn(2, 1, 16, 16), {}, "has 1 channels but the model expects 3"),
        (torch.randn(2, 3, 32, 32), {}, r"Input size 32x32 does not match the model's 16x16.*interpolate_pos_encoding"),
        (torch.randn(3, 16, 16), {}, r"must have shape \(batch, channels, height, width\), got \(3, 16, 16\)"),
        (torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), {}, "must be a floating-point tensor"),
        (torch.randn(2, 3, 18, 16), {"interpolate_pos_encoding": True}, "18x16 must be divisible by the patch size"),
        (None, {}, "`pixel_values` is required"),
    ],
)
def test_bad_input_names_the_problem(pixels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build()(pixels, **kwargs)


def test_save_and_reload_through_auto_classes_is_bit_identical(tmp_path):
    model = build(num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    pixels = images()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(reloaded) is ViTCustomForImageClassification
    assert torch.equal(out_of_the_memory_map(reloaded)(pixels).logits, model(pixels).logits)
    assert reloaded.config.id2label == {0: "a", 1: "b", 2: "c"}
    encoder = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert type(encoder) is ViTCustomModel
    assert torch.equal(encoder(pixels).last_hidden_state, model.vit(pixels).last_hidden_state)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), ViTCustomConfig)


def test_save_writes_remote_code_files_and_complete_auto_map(tmp_path):
    build().save_pretrained(tmp_path)
    assert (tmp_path / "configuration_vit_custom.py").exists()
    assert (tmp_path / "modeling_vit_custom.py").exists()
    auto_map = AutoConfig.from_pretrained(tmp_path).auto_map
    assert auto_map == {
        "AutoConfig": "configuration_vit_custom.ViTCustomConfig",
        "AutoModel": "modeling_vit_custom.ViTCustomModel",
        "AutoModelForImageClassification": "modeling_vit_custom.ViTCustomForImageClassification",
    }
    assert not (tmp_path / "modeling_vit_custom_mae.py").exists()  # shipped with masked-autoencoder saves only


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backend_chosen_at_load_time(tmp_path, backend):
    build().save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, attn_implementation=backend)
    assert model.config._attn_implementation == backend
    with torch.no_grad():
        assert model(images()).logits.shape == (2, 5)


def test_bfloat16_and_device_map_loading(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    bf16 = AutoModelForImageClassification.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.vit.layers[0].attention.qkv.weight.dtype == torch.bfloat16
    logits = bf16(images()).logits  # float32 pixels are cast to the weights' dtype
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), model(images()).logits, atol=0.1, rtol=0.05)
    mapped = AutoModelForImageClassification.from_pretrained(tmp_path, device_map="auto")
    assert {parameter.device.type for parameter in mapped.parameters()} == {"cpu"}
    assert torch.equal(mapped(images()).logits, model(images()).logits)


def test_image_processor_is_registered_with_auto_image_processor(tmp_path):
    ViTCustomConfig(**tiny_config_kwargs()).save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(processor, ViTImageProcessorPil)
    image = Image.fromarray(np.zeros((40, 30, 3), dtype=np.uint8))
    assert processor(image, return_tensors="pt").pixel_values.shape == (1, 3, 16, 16)


def test_pipeline_classifies_a_pil_image(tmp_path):
    labels = {0: "cat", 1: "dog", 2: "bird"}
    model = build(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    with torch.no_grad():  # make "dog" win for any input
        model.classifier.bias.copy_(torch.tensor([0.0, 10.0, 0.0]))
    model.save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path)
    classifier = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8))
    predictions = classifier(image)
    assert predictions[0]["label"] == "dog"
    assert {p["label"] for p in predictions} == {"cat", "dog", "bird"}
    assert predictions[0]["score"] > 0.99


def test_trust_remote_code_loading_without_the_package(tmp_path):
    """A user with only transformers installed loads a saved folder through the copied code files."""
    model = build(num_labels=3)
    model.save_pretrained(tmp_path / "model")
    expected = model(images()).logits
    torch.save(images(), tmp_path / "pixels.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_vit_custom"] = None  # importing the package now fails: only the saved files can serve
        import torch
        from transformers import AutoConfig, AutoModel, AutoModelForImageClassification
        folder = {str(tmp_path / "model")!r}
        try:
            AutoConfig.from_pretrained(folder)
        except ValueError as error:
            assert "trust_remote_code" in str(error), error
        else:
            raise AssertionError("loaded custom code without trust_remote_code=True")
        model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        encoder = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(encoder).__name__ == "ViTCustomModel"
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        torch.save(model.eval()(pixels).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), expected)


def test_set_attn_implementation_switches_the_backend_of_a_built_model():
    model = build().eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa_logits = model(images()).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        assert model.vit.layers[0].attention.config._attn_implementation == "eager"
        torch.testing.assert_close(model(images()).logits, sdpa_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model_class", [ViTCustomModel, ViTCustomForImageClassification, ViTCustomForMaskedImageModeling]
)
def test_from_pretrained_without_a_checkpoint_initialises_every_weight_as_the_config_does(monkeypatch, model_class):
    """transformers' contract (`ModelTesterMixin.test_can_init_all_missing_weights`): with each module's
    initialisation seeded alike, `from_pretrained(None, config=..., state_dict={})` equals a model built from the
    config, so `_init_weights` covers every parameter."""
    original = PreTrainedModel._initialize_weights

    def seeded(self, module, *args):
        torch.manual_seed(0)
        original(self, module, *args)

    monkeypatch.setattr(PreTrainedModel, "_initialize_weights", seeded)
    config = ViTCustomConfig(**tiny_config_kwargs(decoder_hidden_size=16, decoder_num_attention_heads=2))
    from_config = model_class(copy.deepcopy(config))
    from_nothing = model_class.from_pretrained(None, config=config, state_dict={})
    assert not [name for name, parameter in from_nothing.named_parameters() if parameter.is_meta]
    expected, actual = from_config.state_dict(), from_nothing.state_dict()
    assert expected.keys() == actual.keys()
    assert [key for key in expected if not torch.equal(expected[key], actual[key])] == []


def test_loading_info_shows_missing_encoder_weights_instead_of_raising(tmp_path):
    model = build()
    state_dict = {key: value for key, value in model.state_dict().items() if not key.startswith("vit.layers.1.")}
    model.save_pretrained(tmp_path, state_dict=state_dict)
    with pytest.raises(OSError, match="lacks 12 encoder weights"):
        ViTCustomForImageClassification.from_pretrained(tmp_path)
    loaded, info = ViTCustomForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is ViTCustomForImageClassification
    assert sorted(info["missing_keys"]) == sorted(key for key in model.state_dict() if key.startswith("vit.layers.1."))


def test_a_training_step_with_labels_compiles_as_one_graph():
    """Trainer's `--torch_compile true` compiles exactly this call; the label checks must not break the graph."""
    model = build().train()
    explanation = torch._dynamo.explain(model)(images(), labels=torch.tensor([0, 3]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_out_of_range_labels_are_still_named_on_the_cpu():
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\).*\[7\]"):
        build()(images(), labels=torch.tensor([0, 7]))
