"""CPU speed-ups for a built model, decided once: `optimize_for_cpu(model)`.

The model files hold the paper only; what makes it fast on a particular CPU lives here, applied to a model after it
is built (or loaded) and never needed by the files that `trust_remote_code` users receive. Each piece was kept because
the benchmark showed it (`scripts/benchmark.py`, contender `hf_vit_custom-cpu` against `hf_vit_custom-sdpa`, the same
model without them; figures and CPU in the README):

- **Attention while training**: PyTorch's CPU flash-attention backward costs several times its forward, so the
  registered attention function `sdpa_cpu` runs the eager maths (batched matmuls, which keep the tokens x tokens
  probabilities for the backward) in training mode and SDPA's flash kernel in eval mode, the faster forward. Routing on
  the module's mode rather than on gradients keeps both passes of reentrant activation checkpointing on one path.
- **Fused linears for bf16 inference**: the linear layers of the encoder become `OneDNNLinear`, which under bf16
  (autocast or bf16 weights) with no gradient recorded runs oneDNN's matmul with the bias and the MLP's activation
  fused in (`torch.ops.mkldnn._linear_pointwise`, the private op inductor emits for frozen weights), and otherwise
  is a plain `nn.Linear`. Where the op or bf16 support is missing, nothing is swapped.
- **bf16 residual sums in bf16 inference**: under CPU bf16 autocast in eval mode without gradients, the embeddings'
  output is cast to bf16 once, so the layer norms, residual sums and linear inputs skip their casts (a bf16 model's
  numbers; the logits stay within bf16 tolerance of fp32, tested).

Module swaps change classes, not parameters: the state dict, saving and loading are exactly those of the plain model,
and PEFT or accelerate's hooks wrap the swapped modules as they wrap `nn.Linear`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .modeling_vit_custom import ViTCustomMLP, ViTCustomModel, eager_attention_forward

CPU_SDPA = "sdpa_cpu"
# oneDNN's fused linear and a CPU that computes bf16 natively, looked up once.
ONEDNN_BF16_LINEAR = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
# `config.hidden_act` -> the oneDNN post-op (name, algorithm) that `OneDNNLinear` fuses into its matmul.
ONEDNN_POST_OPS = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def cpu_sdpa_attention(module: nn.Module, query: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA, except while training on the CPU, where the eager maths' backward is several times faster."""
    if module.training and query.device.type == "cpu":
        return eager_attention_forward(module, query, *args, **kwargs)
    return sdpa_attention_forward(module, query, *args, **kwargs)


AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention)


def bf16_cpu_inference(hidden_states: torch.Tensor) -> bool:
    """bf16 (autocast or a bf16 tensor) on the CPU, outside `torch.compile`."""
    if hidden_states.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    autocast = torch.is_autocast_enabled("cpu")
    return (torch.get_autocast_dtype("cpu") if autocast else hidden_states.dtype) == torch.bfloat16


class OneDNNLinear(nn.Linear):
    """`activation(linear(x))`, as one oneDNN matmul with bias and activation fused in for bf16 CPU inference.

    Made from an `nn.Linear` by `as_onednn_linear`, which sets `activation` (a module, `nn.Identity` for none) and
    `post_op`, the oneDNN name of that activation, `("none", "")` where oneDNN cannot fuse it. The weight is cast on
    every call, never kept packed between calls: fused optimisers and `.data` edits change weights without bumping
    their version counters, so no cache could tell when a packed copy went stale.
    """

    activation: nn.Module
    post_op: tuple[str, str]

    def fuses(self, hidden_states: torch.Tensor) -> bool:
        """Eval mode, bf16 on the CPU, outside `torch.compile`, and nothing here records a gradient."""
        if self.training or not torch.backends.mkldnn.enabled or not bf16_cpu_inference(hidden_states):
            return False
        tensors = (hidden_states, *self.parameters())
        return not (torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.fuses(hidden_states):
            return self.activation(super().forward(hidden_states))
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        name, algorithm = self.post_op
        output = torch.ops.mkldnn._linear_pointwise(
            hidden_states.to(torch.bfloat16), self.weight.to(torch.bfloat16), bias, name, [], algorithm
        )
        return self.activation(output) if name == "none" else output


def as_onednn_linear(linear: nn.Linear, activation: nn.Module | None = None, hidden_act: str | None = None) -> None:
    """Turn `linear` into a `OneDNNLinear` in place (same parameters), computing `activation` after it."""
    linear.__class__ = OneDNNLinear
    linear.activation = nn.Identity() if activation is None else activation
    linear.post_op = ONEDNN_POST_OPS.get(hidden_act, ("none", "")) if activation is not None else ("none", "")


def _cast_to_bf16_for_inference(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on the embeddings: carry the tokens in bf16 through a bf16 inference forward."""
    autocast = torch.is_autocast_enabled("cpu")
    if not module.training and autocast and not torch.is_grad_enabled() and bf16_cpu_inference(output):
        return output.to(torch.bfloat16)
    return output


def _fuse_linears(model: nn.Module, hidden_act: str) -> None:
    """Swap the encoder's linears for `OneDNNLinear`, moving each MLP's activation into its first linear."""
    for module in list(model.modules()):
        if isinstance(module, ViTCustomMLP) and type(module.fc1) is nn.Linear:
            as_onednn_linear(module.fc1, module.activation, hidden_act)
            module.activation = nn.Identity()
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear and name in ("qkv", "proj", "fc2"):
                as_onednn_linear(child)


def optimize_for_cpu(model: PreTrainedModel) -> PreTrainedModel:
    """Apply this module's CPU speed-ups to `model` in place (idempotent) and return it.

    The attention becomes `sdpa_cpu` where it was `sdpa`; the linears become `OneDNNLinear` and the encoder's tokens
    are carried in bf16 during bf16 inference where the CPU has oneDNN's bf16 kernels. Outputs equal the plain
    model's in fp32 (to summation order) and stay within bf16 tolerance under bf16 autocast.
    """
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(CPU_SDPA)
    if ONEDNN_BF16_LINEAR:
        _fuse_linears(model, model.config.hidden_act)
        for module in model.modules():
            if isinstance(module, ViTCustomModel) and not getattr(module.embeddings, "_bf16_hook", None):
                module.embeddings._bf16_hook = module.embeddings.register_forward_hook(_cast_to_bf16_for_inference)
    return model


__all__ = [
    "CPU_SDPA",
    "ONEDNN_BF16_LINEAR",
    "OneDNNLinear",
    "as_onednn_linear",
    "cpu_sdpa_attention",
    "optimize_for_cpu",
]
