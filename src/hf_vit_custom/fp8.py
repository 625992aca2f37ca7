"""FP8 training through Accelerate's torchao backend (`--fp8`): whether this machine can, and which layers convert.

With mixed precision "fp8", `Accelerator.prepare` swaps the chosen `nn.Linear`s for torchao's `Float8Linear`, whose
matmuls cast inputs, weights and gradients to FP8 with per-tensor dynamic scales and run `torch._scaled_mm` on the
FP8 tensor cores; everything else runs under bf16 autocast. The weights stay in their own dtype and keep their
names, so checkpoints and the saved model are those of a bf16 run. torchao rather than TransformerEngine: it is pure
PyTorch, composes with `torch.compile` and FSDP2, and needs no CUDA build of its own.

Which layers: the linears of the transformer blocks (query-key-value, output projection, MLP), nearly all of a
ViT's FLOPs. The classifier head and the attention pool stay in bf16 (a sliver of the work, and the logits are the
most sensitive to rounding, which is why Accelerate's default filter keeps the first and last linear as well); the
patch embedding is a convolution, which torchao does not convert.
"""

from __future__ import annotations

import torch
from accelerate.utils import AORecipeKwargs, is_torchao_available
from torch import nn

# FP8 tensor cores: Ada (8.9: L4, L40S) and Hopper (9.0: H100, H200) onwards.
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
# `torch._scaled_mm` takes matrices whose sizes are multiples of 16.
FP8_SIZE_MULTIPLE = 16


def fp8_unavailable_reason(use_cpu: bool = False) -> str | None:
    """Why this process cannot train in FP8 (no CUDA GPU, one without FP8 tensor cores, no torchao), or None."""
    gpus = "a CUDA GPU with FP8 tensor cores (compute capability 8.9 or later: L4, L40S, H100, H200, B200)"
    if use_cpu or not torch.cuda.is_available():
        return f"`--fp8` needs {gpus}; this run has none."
    capability = torch.cuda.get_device_capability()
    if capability < FP8_MIN_COMPUTE_CAPABILITY:
        name, (major, minor) = torch.cuda.get_device_name(), capability
        return f"`--fp8` needs {gpus}; the {name} has compute capability {major}.{minor}."
    if not is_torchao_available():
        return "`--fp8` trains through torchao, which is not installed: `pip install torchao`."
    return None


def converts_to_fp8(module: nn.Module, name: str) -> bool:
    """Whether `module` (at `name` in the model) trains in FP8: a transformer block's linear of FP8-sized shape."""
    return (
        isinstance(module, nn.Linear)
        and ".layers." in f".{name}"
        and module.in_features % FP8_SIZE_MULTIPLE == 0
        and module.out_features % FP8_SIZE_MULTIPLE == 0
    )


def fp8_recipe() -> AORecipeKwargs:
    """Accelerate's torchao FP8 recipe over the layers `converts_to_fp8` chooses (a kwargs handler).

    Padded matmuls: `torch._scaled_mm` needs inner dimensions that are multiples of 16, and in the weight gradient
    that is the batch's token count (197 per 224-pixel image at patch 16), so unpadded only batches of a multiple of 16
    images, and no epoch's partial last batch, could train. Without Accelerate's default FP8 all-gather for FSDP2: it
    wraps every converted weight in a tensor subclass that has no storage of its own, which safetensors cannot save,
    so no checkpoint or final model could be written.
    """
    return AORecipeKwargs(module_filter_func=converts_to_fp8, pad_inner_dim=True, enable_fsdp_float8_all_gather=False)


__all__ = ["converts_to_fp8", "fp8_recipe", "fp8_unavailable_reason"]
