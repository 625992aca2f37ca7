"""`optimize_for_cpu`: oneDNN fused linears for bf16 inference, matmul attention for training, bf16 residual sums."""

import copy

import pytest
import torch
from conftest import tiny_config_kwargs
from transformers.activations import ACT2FN

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification, ViTCustomForMaskedImageModeling, cpu_speed
from hf_vit_custom.cpu_speed import CPU_SDPA, ONEDNN_BF16_LINEAR, OneDNNLinear, as_onednn_linear, optimize_for_cpu
from hf_vit_custom.modeling_vit_custom import eager_attention_forward

needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16_LINEAR, reason="no oneDNN bf16 linear on this CPU")
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


def onednn_linear(in_features=8, out_features=8, bias=True, hidden_act=None) -> OneDNNLinear:
    linear = torch.nn.Linear(in_features, out_features, bias=bias).eval()
    as_onednn_linear(linear, ACT2FN[hidden_act] if hidden_act else None, hidden_act)
    return linear


def test_optimized_model_keeps_its_parameters_outputs_and_saved_files(tmp_path):
    model = build()
    plain = copy.deepcopy(model)
    assert optimize_for_cpu(model) is model
    optimize_for_cpu(model)  # a second call changes nothing
    assert model.config._attn_implementation == CPU_SDPA
    assert model.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(model(images()).logits, plain(images()).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = ViTCustomForImageClassification.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"  # the CPU choice is not saved with the model
    assert all(type(module) is not OneDNNLinear for module in reloaded.modules())


@needs_onednn_bf16
@pytest.mark.parametrize("hidden_act", [None, "gelu", "gelu_pytorch_tanh", "relu", "silu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 64)])
def test_fused_linear_under_autocast_computes_linear_then_activation_in_bf16(hidden_act, bias, shape):
    torch.manual_seed(0)
    linear = onednn_linear(64, 96, bias=bias, hidden_act=hidden_act)
    activation = ACT2FN[hidden_act] if hidden_act else None
    inputs = torch.randn(shape)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear.fuses(inputs)
        fused = linear(inputs)
        plain = torch.nn.functional.linear(inputs, linear.weight, linear.bias)  # autocast's own bf16 linear
        expected = plain if activation is None else activation(plain)
    assert fused.dtype == expected.dtype == torch.bfloat16
    assert_bf16_close(fused, expected)


@needs_onednn_bf16
def test_the_fused_path_is_only_taken_for_bf16_inference():
    linear = onednn_linear()
    inputs = torch.randn(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not linear.train().fuses(inputs)  # training mode
        linear.eval()
        assert not linear.fuses(inputs)  # the weight requires a gradient
        with torch.no_grad():
            assert linear.fuses(inputs)
        linear.requires_grad_(False)
        assert linear.fuses(inputs)  # a frozen layer records nothing either
        assert not linear.fuses(inputs.clone().requires_grad_())
    with torch.no_grad():
        assert not linear.fuses(inputs)  # fp32: MKL's matmul
        assert linear.fuses(inputs.to(torch.bfloat16))  # a bf16 model
        assert not linear.fuses(inputs.to(torch.float16))  # no fp16 oneDNN path


@needs_onednn_bf16
def test_hooks_still_run_and_wrapped_modules_are_left_alone():
    """Users add hooks (accelerate's offloading too): a swapped linear is still called through them. PEFT and
    quantisers install subclasses of `nn.Linear`: those are not swapped."""

    class Subclass(torch.nn.Linear):
        pass

    model = build()
    model.vit.layers[1].attention.qkv = Subclass(32, 96)
    calls = []
    model.vit.layers[0].attention.qkv.register_forward_hook(lambda module, args, output: calls.append("hook"))
    optimize_for_cpu(model)
    assert type(model.vit.layers[0].attention.qkv) is OneDNNLinear
    assert type(model.vit.layers[1].attention.qkv) is Subclass
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images())
    assert calls == ["hook"]


@needs_onednn_bf16
def test_an_optimiser_step_that_leaves_version_counters_alone_shows_in_the_next_evaluation():
    """Fused AdamW (Trainer's default) updates weights without bumping their version counters (torch 2.13): this
    guards against caching packed weights keyed on those counters, which served the old weights here."""
    model = optimize_for_cpu(build())
    pixels = images()

    def evaluate(evaluated) -> torch.Tensor:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return evaluated.eval()(pixels).logits.float()

    before = evaluate(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model.train()(pixels, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    plain = build()
    plain.load_state_dict(model.state_dict())
    after = evaluate(model)
    assert (after - before).abs().max() > 0.1
    assert_bf16_close(after, evaluate(plain))


def test_sdpa_trains_through_the_matmul_attention_on_the_cpu(monkeypatch):
    calls = []

    def counting_eager(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return eager_attention_forward(*args, **kwargs)

    monkeypatch.setattr(cpu_speed, "eager_attention_forward", counting_eager)
    model = optimize_for_cpu(build()).train()
    model(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [True, True]  # both layers
    model.eval()(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [True, True]  # eval mode keeps PyTorch's flash kernel, gradients or not

    # Reentrant checkpointing runs the forward without gradients, then again with: both passes take one path.
    calls.clear()
    model.train().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model(images().requires_grad_(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == [False, False, True, True]


def test_the_plain_model_trains_through_the_configured_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_speed, "eager_attention_forward", lambda *args, **kwargs: calls.append(1))
    build().train()(images(), labels=torch.tensor([0, 1])).loss.backward()
    assert calls == []  # without `optimize_for_cpu`, SDPA is SDPA


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
        optimize_for_cpu(model)
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
        optimize_for_cpu(model)
        assert model.decoder.config._attn_implementation == CPU_SDPA
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = model(images(), noise=noise)
    assert_bf16_close(actual.logits, expected.logits)
    assert_bf16_close(actual.loss, expected.loss)


def test_cpu_autocast_training_keeps_fp32_residual_sums():
    model = optimize_for_cpu(build()).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images(), output_hidden_states=True)
    assert all(state.dtype == torch.float32 for state in outputs.hidden_states)
