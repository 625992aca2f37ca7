"""The CPU fast paths: oneDNN fused linears for inference, matmul attention for training, bf16 residual sums."""

import pytest
import torch
from conftest import tiny_config_kwargs

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom import modeling_vit_custom as modeling
from hf_vit_custom.modeling_vit_custom import ViTCustomLinear, eager_attention_forward

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


@needs_onednn_bf16
@pytest.mark.parametrize("activation", [None, "gelu", "gelu_pytorch_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 64)])
def test_fused_linear_under_autocast_computes_linear_then_activation_in_bf16(activation, bias, shape):
    torch.manual_seed(0)
    linear = ViTCustomLinear(64, 96, bias=bias, activation=activation).eval()
    inputs = torch.randn(shape)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.fused_dtype(inputs) == torch.bfloat16
        fused = linear(inputs)
        expected = reference_linear(linear, inputs)  # autocast's own bf16 linear, then the activation
    assert fused.dtype == expected.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    torch.testing.assert_close(fused.float(), expected.float(), rtol=0, atol=BF16_RELATIVE_TOLERANCE * scale)


@needs_onednn_bf16
def test_the_fused_path_is_only_taken_for_bf16_inference():
    linear = ViTCustomLinear(8, 8)
    inputs = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.fused_dtype(inputs) is None  # training mode
        linear.eval()
        assert linear.fused_dtype(inputs) is None  # the weight requires a gradient
        with torch.no_grad():
            assert linear.fused_dtype(inputs) == torch.bfloat16
        linear.requires_grad_(False)
        assert linear.fused_dtype(inputs) == torch.bfloat16  # a frozen layer records nothing either
        assert linear.fused_dtype(inputs.clone().requires_grad_()) is None
    with torch.no_grad():
        assert linear.fused_dtype(inputs) is None  # fp32: MKL's matmul
        assert linear.fused_dtype(inputs.to(torch.bfloat16)) == torch.bfloat16  # a bf16 model
        assert linear.fused_dtype(inputs.to(torch.float16)) is None  # no fp16 oneDNN path


@needs_onednn_bf16
def test_an_optimiser_step_that_leaves_version_counters_alone_shows_in_the_next_evaluation(monkeypatch):
    """Fused AdamW (Trainer's default) updates weights without bumping their version counters (torch 2.13), so a
    packed-weight cache keyed on them would serve the old weights here."""
    model = build()
    pixels = images()

    def evaluate(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(modeling, "ONEDNN_LINEAR_AVAILABLE", fused)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.eval()(pixels).logits.float()

    before = evaluate(fused=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()(pixels, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    after, plain = evaluate(fused=True), evaluate(fused=False)
    assert (after - before).abs().max() > 0.1
    torch.testing.assert_close(after, plain, rtol=0, atol=BF16_RELATIVE_TOLERANCE * plain.abs().max().item())


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
