"""On a CUDA GPU: fused attention kernels, no host synchronisation in the forward, bf16 accuracy, checkpointing memory.

Skipped on machines without a GPU (CI has none); run them with `python -m pytest tests/test_cuda.py` on one.
"""

import pytest
import torch
from conftest import tiny_config_kwargs
from torch.nn.attention import SDPBackend, sdpa_kernel

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.benchmark import build_contenders, run_benchmark

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FUSED_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def config(**overrides) -> ViTCustomConfig:
    """Four 64-wide heads: a head size the fused kernels take."""
    sizes = {"hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 512, "image_size": 32}
    return ViTCustomConfig(**tiny_config_kwargs(**{**sizes, **overrides}))


def model(backend: str = "sdpa", **overrides) -> ViTCustomForImageClassification:
    torch.manual_seed(0)
    return ViTCustomForImageClassification._from_config(config(**overrides), attn_implementation=backend).cuda()


def pixels(batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)).cuda()


def test_sdpa_trains_through_fused_kernels_only():
    """With the math fallback switched off, a bf16 forward and backward can only run on flash, efficient or cuDNN."""
    classifier = model().train()
    with sdpa_kernel(FUSED_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = classifier(pixels()).logits
    logits.float().sum().backward()
    assert all(parameter.grad is not None for parameter in classifier.parameters())


def test_forward_and_backward_never_wait_for_the_gpu():
    """A host read (such as a NaN check's) would stall the queue of kernels at every batch."""
    classifier = model().train()
    batch = pixels()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = classifier(batch).logits
        logits.float().sum().backward()
        classifier.eval()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            classifier(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_sdpa_logits_match_fp32_eager_within_bf16_tolerance():
    batch = pixels()
    with torch.no_grad():
        reference = model("eager").eval()(batch).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model("sdpa").eval()(batch).logits.float()
    assert torch.allclose(logits, reference, atol=5e-2, rtol=5e-2)


def test_activation_checkpointing_cuts_peak_memory_and_keeps_the_gradients():
    batch = pixels(64)
    peaks, gradients = [], []
    for checkpointing in (False, True):
        classifier = model(num_hidden_layers=6).train()
        if checkpointing:
            classifier.activation_checkpointing_enable()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        classifier(batch).logits.sum().backward()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        gradients.append([parameter.grad.clone() for parameter in classifier.parameters()])
    assert peaks[1] < 0.5 * peaks[0]
    for plain, checkpointed in zip(*gradients, strict=True):
        assert torch.allclose(plain, checkpointed, atol=1e-5, rtol=1e-4)


def test_benchmark_measures_every_contender_on_the_gpu():
    contenders = build_contenders(config(), ["sdpa"], include_timm=False)
    report = run_benchmark(
        config(), contenders, batch_size=8, device="cuda", dtype="bf16", rounds=2, warmup=1, profile=True
    )
    assert report["device_name"] == torch.cuda.get_device_name()
    for row in report["results"]:
        assert row["inference_images_per_s"] > 0 and 0 < row["training_flops_share"] < 1
        assert row["peak_training_memory_mb"] > 0
    for passes in report["profile"].values():  # GPU time of the kernels each operator launched
        assert passes["training"]["matmuls"] > 0 and passes["training"]["attention"] > 0
