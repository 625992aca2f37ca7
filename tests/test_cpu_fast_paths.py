"""The CPU fast paths: oneDNN fused linears for inference, matmul attention for training, bf16 residual sums."""

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers.activations import ACT2FN

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, ViTCustomForMaskedImageModeling
from hf_vit_custom import modeling_vit_custom as modeling
from hf_vit_custom.modeling_vit_custom import eager_attention_forward, fused_linear_applies, linear_forward

needs_onednn_bf16 = pytest.mark.skipif(not modeling.ONEDNN_BF16_LINEAR, reason="no oneDNN bf16 linear on this CPU")
# bf16 keeps 8 significant bits: one rounding of a value is up to 2^-8 of it, a few in a row add up.
BF16_RELATIVE_TOLERANCE = 2**-5


def build(seed=0, attn_implementation="sdpa", **overrides) -> ViTCustomForImageClassification:
    torch.manual_seed(seed)
    config = ViTCustomConfig(**tiny_config_kwargs(**overrides))
    return ViTCustomForImageClassification._from_config(config, attn_implementation=attn_implementation).eval()


def images(batch=2, seed=1) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def assert_bf16_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual.float(), expected.float(), rtol=0, atol=BF16_RELATIVE_TOLERANCE * scale)


@needs_onednn_bf16
@pytest.mark.parametrize("hidden_act", [None, "gelu", "gelu_pytorch_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 64)])
def test_fused_linear_under_autocast_computes_linear_then_activation_in_bf16(hidden_act, bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 96, bias=bias).eval()
    activation = ACT2FN[hidden_act] if hidden_act else None
    inputs = torch.randn(shape)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_linear_applies(linear, inputs)
        fused = linear_forward(linear, inputs, activation, hidden_act)
        expected = linear(inputs) if activation is None else activation(linear(inputs))  # autocast's own bf16 linear
    assert fused.dtype == expected.dtype == torch.bfloat16
    assert_bf16_close(fused, expected)


@needs_onednn_bf16
def test_the_fused_path_is_only_taken_for_bf16_inference():
    linear = torch.nn.Linear(8, 8)
    inputs = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_linear_applies(linear, inputs)  # training mode
        linear.eval()
        assert not fused_linear_applies(linear, inputs)  # the weight requires a gradient
        with torch.no_grad():
            assert fused_linear_applies(linear, inputs)
        linear.requires_grad_(False)
        assert fused_linear_applies(linear, inputs)  # a frozen layer records nothing either
        assert not fused_linear_applies(linear, inputs.clone().requires_grad_())
    with torch.no_grad():
        assert not fused_linear_applies(linear, inputs)  # fp32: MKL's matmul
        assert fused_linear_applies(linear, inputs.to(torch.bfloat16))  # a bf16 model
        assert not fused_linear_applies(linear, inputs.to(torch.float16))  # no fp16 oneDNN path


@needs_onednn_bf16
def test_wrapped_or_hooked_modules_are_called_not_bypassed():
    """PEFT and quantisers swap in subclasses; accelerate's offloading patches `forward`; users add hooks."""
    inputs = torch.randn(2, 8)

    class Subclass(torch.nn.Linear):
        pass

    hooked, patched, subclassed = torch.nn.Linear(8, 8).eval(), torch.nn.Linear(8, 8).eval(), Subclass(8, 8).eval()
    calls = []
    hooked.register_forward_hook(lambda module, args, output: calls.append("hook"))
    patched.forward = lambda hidden_states: calls.append("patched") or torch.zeros(2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_linear_applies(torch.nn.Linear(8, 8).eval(), inputs)
        for module in (hooked, patched, subclassed):
            assert not fused_linear_applies(module, inputs)
            linear_forward(module, inputs)
    assert calls == ["hook", "patched"]

    model = build()
    model.vit.embeddings.patch_embeddings.projection.register_forward_hook(
        lambda module, args, output: calls.append("patch embedding hook")
    )
    model(images())
    assert calls[-1] == "patch embedding hook"


@needs_onednn_bf16
def test_an_optimiser_step_that_leaves_version_counters_alone_shows_in_the_next_evaluation(monkeypatch):
    """Fused AdamW (Trainer's default) updates weights without bumping their version counters (torch 2.13): this
    guards against caching packed weights keyed on those counters, which served the old weights here."""
    model = build()
    pixels = images()

    def evaluate(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(modeling, "ONEDNN_BF16_LINEAR", fused)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return model.eval()(pixels).logits.float()

    before = evaluate(fused=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()(pixels, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    after, plain = evaluate(fused=True), evaluate(fused=False)
    assert (after - before).abs().max() > 0.1
    assert_bf16_close(after, plain)


def test_sdpa_trains_through_the_matmul_attention_on_the_cpu(monkeypatch):
    calls = []

    def counting_eager(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return eager_attention_forward(*args, **kwargs)

    monkeypatch.setattr(modeling, "eager_attention_forward", counting_eager)
    model = build().train()
    model(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [True, True]  # both layers
    model.eval()(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [True, True]  # eval mode keeps PyTorch's flash kernel, gradients or not

    # Reentrant checkpointing runs the forward without gradients, then again with: both passes take one path.
    calls.clear()
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model(images().requires_grad_(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [False, False, True, True]


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
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_cpu_autocast_inference_stays_within_bf16_tolerance_of_fp32(qkv_bias):
    model = build(hidden_size=64, intermediate_size=256, num_hidden_layers=4, qkv_bias=qkv_bias)
    pixels = images(batch=4)
    with torch.no_grad():
        expected = model(pixels, output_hidden_states=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(pixels, output_hidden_states=True)
    assert actual.hidden_states[1].dtype == torch.bfloat16  # the residual sums run in bf16
    assert_bf16_close(actual.logits, expected.logits)
    assert (actual.logits.argmax(-1) == expected.logits.argmax(-1)).all()


@needs_onednn_bf16
def test_mae_under_cpu_autocast_inference_stays_within_bf16_tolerance_of_fp32():
    config = ViTCustomConfig(
        **tiny_config_kwargs(
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=4,
            decoder_intermediate_size=64,
        )
    )
    torch.manual_seed(0)
    model = ViTCustomForMaskedImageModeling._from_config(config, attn_implementation="sdpa").eval()
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(images(), noise=noise)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(images(), noise=noise)
    assert_bf16_close(actual.logits, expected.logits)
    assert_bf16_close(actual.loss, expected.loss)


def test_cpu_autocast_training_keeps_fp32_residual_sums():
    model = build().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images(), output_hidden_states=True)
    assert all(state.dtype == torch.float32 for state in outputs.hidden_states)
