"""On a CUDA GPU: fused attention kernels, no host synchronisation in the forward or in a compiled Trainer step, bf16
accuracy, checkpointing memory, CUDA-graph benchmarks, and FP8 training where the GPU has FP8 tensor cores.

Skipped on machines without a GPU (CI has none); run them with `python -m pytest tests/test_cuda.py` on one (the FP8
ones also need torchao: `pip install torchao`).
"""

import pytest
import torch
from conftest import script_arguments, small_run_args, tiny_config_kwargs
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import TrainerCallback

import hf_vit_custom.training as training
from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification
from hf_vit_custom.benchmark import build_contenders, fp8_loss_agreement, run_benchmark
from hf_vit_custom.fp8 import fp8_unavailable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_fp8 = pytest.mark.skipif(fp8_unavailable_reason() is not None, reason=str(fp8_unavailable_reason()))

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


class StepRecorder(TrainerCallback):
    """Runs every training step from `checked_from` on under `torch.cuda.set_sync_debug_mode("error")`, so that a
    host synchronisation anywhere in it (forward, backward, clipping, optimiser, scheduler) raises; keeps the trained
    model's layer classes."""

    def __init__(self, checked_from: int | None):
        self.checked_from, self.checked_steps, self.layer_classes = checked_from, 0, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if self.checked_from is not None and state.global_step >= self.checked_from:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            self.checked_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.set_sync_debug_mode("default")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.layer_classes = {name: type(module).__name__ for name, module in model.named_modules()}


def compiled_trainer_run(tmp_path, monkeypatch, *flags: str, checked_from: int | None = None) -> StepRecorder:
    """`scripts/train.py --torch_compile true` (inductor) on the tiny model and 16 steps of digits, with `flags`."""
    recorder = StepRecorder(checked_from)
    callbacks = training.trainer_callbacks
    monkeypatch.setattr(training, "trainer_callbacks", lambda arguments: [*callbacks(arguments), recorder])
    args = [
        *small_run_args(tmp_path),
        *("--torch_compile", "true", "--dataloader_num_workers", "0", "--disable_tqdm", "true"),
        *("--eval_strategy", "no", "--save_strategy", "no", "--num_demo_predictions", "0", *flags),
    ]
    try:
        metrics = training.train(*script_arguments(training.ViTTrainingArguments, args))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    return recorder


def test_a_compiled_trainer_step_is_one_graph_per_pass_and_never_waits_for_the_gpu(
    tmp_path, monkeypatch, compile_counters
):
    """From the third step on (the first two compile and create the optimiser state). Trainer's NaN filter of the
    logged loss reads it on the host at every step, so it is off, as a GPU run wants it."""
    recorder = compiled_trainer_run(
        tmp_path, monkeypatch, "--bf16", "true", "--logging_nan_inf_filter", "false", checked_from=2
    )
    assert recorder.checked_steps == 14
    assert compile_counters["stats"]["calls_captured"] > 0 and dict(compile_counters["graph_break"]) == {}


def compiled_benchmark(contenders, compile_mode: str, **options) -> dict:
    """Two short rounds of the benchmark in bf16 at batch 16, every contender compiled in `compile_mode`."""
    return run_benchmark(
        config(),
        contenders,
        batch_size=16,
        device="cuda",
        dtype="bf16",
        rounds=2,
        warmup=2,
        compile_mode=compile_mode,
        **options,
    )


def test_cuda_graph_benchmark_trains_every_contender():
    """`--compile reduce-overhead`: a replayed graph overwrites the outputs of the last, so every call marks a step."""
    report = compiled_benchmark(build_contenders(config(), ["sdpa"], include_timm=False), "reduce-overhead")
    assert report["compiled"] == "reduce-overhead"
    assert all(row["training_images_per_s"] > 0 and row["inference_images_per_s"] > 0 for row in report["results"])


@needs_fp8
def test_fp8_trainer_runs_the_blocks_on_the_fp8_tensor_cores_compiled(tmp_path, monkeypatch, compile_counters):
    recorder = compiled_trainer_run(tmp_path, monkeypatch, "--fp8", "true")
    classes = recorder.layer_classes
    assert classes["vit.layers.0.mlp.fc1"] == "Float8Linear" and classes["classifier"] == "Linear"
    assert compile_counters["stats"]["calls_captured"] > 0 and dict(compile_counters["graph_break"]) == {}


@needs_fp8
def test_fp8_benchmark_contender_and_loss_check_run_on_the_gpu():
    contenders = build_contenders(config(), ["sdpa"], include_transformers=False, include_timm=False, fp8=True)
    report = compiled_benchmark(contenders, "default", reference="hf_vit_custom-sdpa")
    fp8_row = report["results"][1]
    assert fp8_row["name"] == "hf_vit_custom-sdpa-fp8" and fp8_row["training_images_per_s"] > 0
    agreement = fp8_loss_agreement(config(), steps=20, seeds=2, batch_size=16, learning_rate=1e-3)
    assert agreement["device_name"] == torch.cuda.get_device_name()
    assert abs(agreement["fp8_minus_bf16"]) < 0.5  # the same model, data and start: FP8 rounding only
