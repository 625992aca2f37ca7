"""The CPU fast paths: oneDNN fused linears for inference, matmul attention for training, bf16 residual sums."""

import copy
import pickle

import pytest
import torch
from conftest import tiny_config_kwargs

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom import modeling_vit_custom as modeling
from hf_vit_custom.modeling_vit_custom import ViTCustomLinear, eager_attention_forward

needs_onednn = pytest.mark.skipif(not modeling.ONEDNN_LINEAR_AVAILABLE, reason="torch built without oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(
    not modeling.ONEDNN_LINEAR_AVAILABLE or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
    reason="no oneDNN bf16 on this CPU",
)
# bf16 keeps 8 significant bits: one rounding of a value is up to 2^-8 of it, a few in a row add up.
BF16_RELATIVE_TOLERANCE = 2**-5


def build(seed=0, attn_implementation="sdpa", **overrides) -> ViTCustomForImageClassification:
    torch.manual_seed(seed)
    config = ViTCustomConfig(**tiny_config_kwargs(**overrides))
    return ViTCustomForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


def images(batch=2, seed=1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def reference_linear(linear: ViTCustomLinear, inputs: torch.Tensor) -> torch.Tensor:
    output = torch.nn.functional.linear(inputs, linear.weight, linear.bias)
    return output if linear.activation is None else linear.activation(output)


def count_packings(monkeypatch) -> list:
    packings = []
    reorder = torch.ops.mkldnn._reorder_linear_weight

    def counting_reorder(weight, rows):
        packings.append(tuple(weight.shape))
        return reorder(weight, rows)

    monkeypatch.setattr(modeling.torch.ops.mkldnn, "_reorder_linear_weight", counting_reorder)
    return packings


@needs_onednn
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_pytorch_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
def test_fused_linear_computes_linear_then_activation(activation, bias, shape):
    torch.manual_seed(0)
    linear = ViTCustomLinear(24, 40, bias=bias, activation=activation).eval()
    inputs = torch.randn(shape)
    with torch.no_grad():
        assert linear.fused_dtype(inputs) == torch.float32
        torch.testing.assert_close(linear(inputs), reference_linear(linear, inputs), atol=1e-5, rtol=1e-5)


@needs_onednn_bf16
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_fused_linear_under_autocast_computes_in_bf16(activation):
    torch.manual_seed(0)
    linear = ViTCustomLinear(64, 96, activation=activation).eval()
    inputs = torch.randn(4, 9, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.fused_dtype(inputs) == torch.bfloat16
        fused = linear(inputs)
    expected = reference_linear(linear, inputs)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(
        fused.float(), expected, rtol=0, atol=BF16_RELATIVE_TOLERANCE * expected.abs().max().item()
    )


@needs_onednn
def test_the_fused_path_is_only_taken_in_eval_mode_without_gradients():
    linear = ViTCustomLinear(8, 8)
    inputs = torch.randn(2, 8)
    assert linear.fused_dtype(inputs) is None  # training mode
    linear.eval()
    assert linear.fused_dtype(inputs) is None  # the weight requires a gradient
    assert linear.fused_dtype(inputs.to(torch.float16)) is None  # no fp16 oneDNN path
    with torch.no_grad():
        assert linear.fused_dtype(inputs) == torch.float32
    linear.requires_grad_(False)
    assert linear.fused_dtype(inputs) == torch.float32  # a frozen layer records nothing either
    assert linear.fused_dtype(inputs.requires_grad_()) is None


@needs_onednn
def test_the_packed_weight_follows_every_change_of_the_weights(monkeypatch):
    packings = count_packings(monkeypatch)
    model = build()
    pixels = images()
    with torch.no_grad():
        first = model(pixels).logits
        assert model(pixels).logits.equal(first)
    layers_packed = len(packings)
    assert layers_packed == 4 * model.config.num_hidden_layers  # qkv, proj, fc1, fc2: packed once, then reused

    # An optimiser step on the weights (in training mode, with gradients: the plain path) ...
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(pixels, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    assert len(packings) == layers_packed
    # ... shows in the next evaluation, which packs again and agrees with the plain path.
    model.eval()
    with torch.no_grad():
        stepped = model(pixels).logits
        monkeypatch.setattr(modeling, "ONEDNN_LINEAR_AVAILABLE", False)
        plain = model(pixels).logits
        monkeypatch.setattr(modeling, "ONEDNN_LINEAR_AVAILABLE", True)
    assert len(packings) == 2 * layers_packed
    assert not stepped.equal(first)
    torch.testing.assert_close(stepped, plain, atol=1e-5, rtol=1e-5)

    # Loading other weights, or changing only a bias, is seen too.
    other = build(seed=1)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, other(pixels).logits, atol=1e-5, rtol=1e-5)
        model.vit.layers[0].mlp.fc2.bias.add_(1.0)
        other.vit.layers[0].mlp.fc2.bias.add_(1.0)
        torch.testing.assert_close(model(pixels).logits, other(pixels).logits, atol=1e-5, rtol=1e-5)


@needs_onednn
def test_a_model_that_has_packed_weights_can_be_copied_and_pickled():
    model = build()
    with torch.no_grad():
        expected = model(images()).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.vit.layers[0].attention.qkv.packed.weight is None  # packs its own
        with torch.no_grad():
            assert clone(images()).logits.equal(expected)


def test_sdpa_records_gradients_through_the_matmul_attention_on_the_cpu(monkeypatch):
    calls = []

    def counting_eager(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return eager_attention_forward(*args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", counting_eager)
    model = build().train()
    model(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [True, True]  # both layers
    with torch.no_grad():
        model.eval()(images())
    assert calls == [True, True]  # inference keeps PyTorch's flash kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_attention_gradients_match_pytorch_sdpa(dtype):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 17, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    upstream = torch.randn(2, 17, 3, 8, generator=generator, dtype=torch.float64)

    def gradients(attention, inputs):
        inputs = [tensor.detach().requires_grad_() for tensor in inputs]
        output = attention(*inputs)
        return [output, *torch.autograd.grad(output, inputs, upstream.to(output.dtype))]

    module = torch.nn.Module()
    exact = gradients(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2),
        (query, key, value),
    )
    low = [tensor.to(dtype) for tensor in (query, key, value)]
    pytorch = gradients(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2), low)
    ours = gradients(lambda q, k, v: eager_attention_forward(module, q, k, v, None, scaling=8**-0.5)[0], low)
    for exact_tensor, pytorch_tensor, our_tensor in zip(exact, pytorch, ours, strict=True):
        # No further from the exact result than PyTorch's own kernel, give or take one rounding.
        pytorch_error = (pytorch_tensor.double() - exact_tensor).abs().max().item()
        our_error = (our_tensor.double() - exact_tensor).abs().max().item()
        rounding = torch.finfo(dtype).eps * exact_tensor.abs().max().item()
        assert our_error <= pytorch_error + rounding


@needs_onednn_bf16
def test_cpu_autocast_inference_stays_within_bf16_tolerance_of_fp32():
    model = build(hidden_size=64, intermediate_size=256, num_hidden_layers=4)
    pixels = images(batch=4)
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(pixels, output_hidden_states=True)
    assert actual.hidden_states[1].dtype == torch.bfloat16  # the residual sums run in bf16
    scale = expected.logits.abs().max().item()
    torch.testing.assert_close(actual.logits.float(), expected.logits, rtol=0, atol=BF16_RELATIVE_TOLERANCE * scale)
    assert (actual.logits.argmax(-1) == expected.logits.argmax(-1)).all()


def test_cpu_autocast_training_keeps_fp32_residual_sums():
    model = build().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images(), output_hidden_states=True)
    assert all(state.dtype == torch.float32 for state in outputs.hidden_states)
