"""Side-by-side throughput of this package's ViT against transformers' ViT (and timm's, when it imports).

On the CPU the deployment paths join them: the CPU speed-ups in bf16 autocast, and onnxruntime (fp32 and dynamic
int8) on this package's ONNX export. Every contender gets the same architecture, batch and random weights, and the
run's dtype unless it is named after its own. Rounds are interleaved
(A B C A B C ...) after a warm-up and medians are reported, so that a noisy, shared machine slows every contender alike;
figures are only comparable inside one run. A large matmul timed in the same run gives the practical FLOP/s ceiling.
"""

import concurrent.futures
import contextlib
import copy
import ctypes
import math
import multiprocessing
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .configuration_vit_custom import ViTCustomConfig, to_pair
from .conversion import config_to_transformers
from .cpu_speed import ONEDNN_BF16_LINEAR, optimize_for_cpu
from .fp8 import fp8_recipe
from .modeling_vit_custom import ViTCustomForImageClassification
from .onnx_export import ONNX_FILE, cpu_session, quantize_int8, write_onnx_graph

# A contender's dtype -> the autocast dtype it runs under; "int8" is an inference runtime's own quantised arithmetic,
# "fp8" torchao's FP8 linears (`fp8.converts_to_fp8`'s layers) with the rest under bf16 autocast, as `--fp8` trains.
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "int8": None, "fp8": torch.bfloat16}
# The dtypes whose large-matmul ceiling a run measures; an int8 contender's share of a float ceiling would mislead.
CEILING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Contender:
    """A named model factory; `build()` returns a fresh classifier taking `pixel_values` and returning logits.

    `dtype` fixes the contender's precision ("fp32", "bf16" for autocast, "int8" for a quantised runtime, "fp8" for
    FP8 linears; None takes the run's). `trains=False` marks an inference runtime (onnxruntime): timed for inference
    only, never compiled.
    """

    name: str
    build: Callable[[], nn.Module]
    logits: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    dtype: str | None = None
    trains: bool = True


@dataclass
class Measurement:
    name: str
    dtype: str
    inference_images_per_s: float
    training_images_per_s: float | None  # None for an inference runtime
    # Achieved FLOP/s over the same run's large-matmul FLOP/s in the contender's dtype (None for int8 and fp8)
    inference_flops_share: float | None
    training_flops_share: float | None
    # CUDA: torch.cuda.max_memory_allocated; CPU: growth of the resident set during one step (`--cpu_memory`)
    peak_training_memory_mb: float | None
    # Median over rounds of the reference's time over this contender's in the same round (None without a reference):
    # paired within a round, the ratio stays steady while a shared machine's speed drifts between rounds.
    inference_speedup: float | None = None
    training_speedup: float | None = None


def vit_forward_flops(config: ViTCustomConfig, num_classes: int) -> float:
    """Multiply-adds x 2 of one image's forward pass (matmuls and convolution only, as MFU counts them)."""
    grid_height, grid_width = config.grid_size
    num_patches = grid_height * grid_width
    tokens = config.num_prefix_tokens + num_patches
    patch_height, patch_width = to_pair(config.patch_size)
    hidden, intermediate = config.hidden_size, config.intermediate_size
    patch_embedding = num_patches * patch_height * patch_width * config.num_channels * hidden
    per_layer = tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * tokens * tokens * hidden
    return 2.0 * (patch_embedding + config.num_hidden_layers * per_layer + hidden * num_classes)


def matmul_flops_per_second(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10
) -> float:
    """The FLOP/s of a large square matmul: what this device sustains on the dominant op of a ViT.

    A GPU needs 8192-wide operands to reach its rate (at 2048, launch overhead is a large part of each product).
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2.0 * size**3 * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session called as a module, so that the runner times it as it times the PyTorch models."""

    def __init__(self, session, keep_alive=None):
        super().__init__()
        self.session = session
        self.keep_alive = keep_alive  # the temporary folder holding the graph

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        (logits,) = self.session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        return torch.from_numpy(logits)


def onnxruntime_contenders(build_model: Callable[[], nn.Module]) -> list[Contender]:
    """`onnxruntime` and `onnxruntime-int8`: the model `build_model` makes, exported once, run on onnxruntime's CPU
    kernels with the run's thread count (fp32, and `quantize_int8`'s dynamic quantisation of that graph)."""
    folder = tempfile.TemporaryDirectory(prefix="benchmark-onnx-")
    graph = Path(folder.name) / ONNX_FILE

    def session(int8: bool) -> nn.Module:
        if not graph.exists():
            write_onnx_graph(build_model(), graph)
        path = graph.with_name("model_int8.onnx") if int8 else graph
        if int8 and not path.exists():
            quantize_int8(graph, path)
        return OnnxRuntimeModel(cpu_session(path, torch.get_num_threads()), keep_alive=folder)

    return [
        Contender(name, lambda int8=int8: session(int8), lambda model, pixels: model(pixels), dtype, trains=False)
        for name, int8, dtype in (("onnxruntime", False, "fp32"), ("onnxruntime-int8", True, "int8"))
    ]


def build_contenders(
    config: ViTCustomConfig,
    backends: list[str],
    include_transformers: bool = True,
    include_timm: bool = True,
    gradient_checkpointing: bool = False,
    cpu_paths: bool = False,
    fp8: bool = False,
) -> list[Contender]:
    """This package with each attention backend, transformers' ViT (sdpa, eager), and timm when it imports.

    `gradient_checkpointing` adds this package's first backend with activation checkpointing on. `cpu_paths` adds the
    CPU deployment paths: `hf_vit_custom-cpu`, the SDPA model with `cpu_speed.optimize_for_cpu` applied, the same in
    bf16 autocast where the CPU has native bf16 (`hf_vit_custom-cpu-bf16`), and, when onnxruntime imports,
    `onnxruntime_contenders`. `fp8` adds `hf_vit_custom-sdpa-fp8`, the SDPA model with the layers `--fp8` trains in
    FP8 converted as Accelerate converts them (`as_fp8_training`). Each model gets its own copy of the configuration:
    `_from_config` records the backend on the configuration it is given, so models sharing one would all run the
    backend of the last one built.
    """

    def ours(backend: str, checkpointing: bool = False) -> nn.Module:
        model = ViTCustomForImageClassification._from_config(copy.deepcopy(config), attn_implementation=backend)
        if checkpointing:
            model.activation_checkpointing_enable()
        return model

    contenders = [
        Contender(f"hf_vit_custom-{backend}", lambda backend=backend: ours(backend), lambda model, x: model(x).logits)
        for backend in backends
    ]
    if cpu_paths:
        # bf16 only where the CPU computes it natively: emulated, a ViT-S/16 forward took 7x fp32's (AVX2 AMD EPYC).
        precisions = (("hf_vit_custom-cpu", None), ("hf_vit_custom-cpu-bf16", "bf16"))[: 2 if ONEDNN_BF16_LINEAR else 1]
        contenders += [
            Contender(name, lambda: optimize_for_cpu(ours("sdpa")), lambda model, x: model(x).logits, dtype)
            for name, dtype in precisions
        ]
        with contextlib.suppress(ImportError):
            import onnxruntime  # noqa: F401

            contenders += onnxruntime_contenders(lambda: ours("sdpa"))
    if fp8:
        contenders.append(
            Contender(
                "hf_vit_custom-sdpa-fp8", lambda: as_fp8_training(ours("sdpa")), lambda model, x: model(x).logits, "fp8"
            )
        )
    if gradient_checkpointing:
        contenders.append(
            Contender(
                f"hf_vit_custom-{backends[0]}-checkpointing",
                lambda: ours(backends[0], checkpointing=True),
                lambda model, pixels: model(pixels).logits,
            )
        )
    if include_transformers:
        from transformers import ViTConfig, ViTForImageClassification

        reference_config = ViTConfig(**config_to_transformers(config, with_head=True))
        contenders += [
            Contender(
                f"transformers-{backend}",
                lambda backend=backend: ViTForImageClassification._from_config(
                    copy.deepcopy(reference_config), attn_implementation=backend
                ),
                lambda model, pixels: model(pixels).logits,
            )
            for backend in ("sdpa", "eager")
        ]
    if include_timm:
        with contextlib.suppress(ImportError):
            import timm

            contenders.append(
                Contender(
                    "timm",
                    lambda: timm.models.vision_transformer.VisionTransformer(
                        img_size=to_pair(config.image_size),
                        patch_size=to_pair(config.patch_size)[0],
                        in_chans=config.num_channels,
                        embed_dim=config.hidden_size,
                        depth=config.num_hidden_layers,
                        num_heads=config.num_attention_heads,
                        mlp_ratio=config.intermediate_size / config.hidden_size,
                        qkv_bias=config.qkv_bias,
                        num_classes=config.num_labels,
                    ),
                    lambda model, pixels: model(pixels),
                )
            )
    return contenders


def as_fp8_training(model: nn.Module) -> nn.Module:
    """`model` with the linears `fp8.converts_to_fp8` picks swapped for torchao's `Float8Linear`, by the recipe and
    the function `Accelerator.prepare` uses under `--fp8`."""
    from accelerate.utils.ao import convert_model_to_fp8_ao

    recipe = fp8_recipe()
    convert_model_to_fp8_ao(model, config=recipe.config, module_filter_func=recipe.module_filter_func)
    return model


def select_contenders(contenders: list[Contender], names: list[str] | None) -> list[Contender]:
    """The named contenders, in the order given (all of them for None); an unknown name is an error that lists them."""
    if names is None:
        return contenders
    by_name = {contender.name: contender for contender in contenders}
    unknown = [name for name in names if name not in by_name]
    if unknown:
        raise ValueError(f"Unknown contender(s) {unknown}; this run has {list(by_name)}.")
    return [by_name[name] for name in names]


class Runner:
    """One contender on the device: an inference closure and a training-step closure (forward, backward, AdamW).

    The contender runs in its own dtype, or else in `dtype`, the run's; compiled with `torch.compile`'s `compile_mode`
    unless that is None. Compiled, every call starts a new step (`cudagraph_mark_step_begin`), which
    "reduce-overhead" (CUDA graphs) needs: a graph replay overwrites the outputs of the last, which a training step
    would otherwise still hold.
    """

    def __init__(
        self,
        contender: Contender,
        batch: torch.Tensor,
        labels: torch.Tensor,
        dtype: str,
        compile_mode: str | None = None,
    ):
        self.contender = contender
        self.device = batch.device
        torch.manual_seed(0)
        model = contender.build().to(self.device)
        self.compiled = compile_mode is not None and contender.trains
        self.model = torch.compile(model, mode=compile_mode) if self.compiled else model
        # Fused AdamW, the optimiser Trainer uses by default (`optim="adamw_torch_fused"`).
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) if contender.trains else None
        self.batch, self.labels = batch, labels
        self.dtype = contender.dtype or dtype
        self.autocast = AUTOCAST_DTYPES[self.dtype]

    def autocast_context(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def infer(self) -> None:
        self.model.eval()
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad(), self.autocast_context():
            self.contender.logits(self.model, self.batch)

    def train_step(self) -> None:
        self.model.train()
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with self.autocast_context():
            loss = nn.functional.cross_entropy(self.contender.logits(self.model, self.batch).float(), self.labels)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _resident_memory_bytes(field_name: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024


def _training_step_memory_mb(config_values: dict, name: str, batch_size: int, dtype: str, **contender_options) -> float:
    """In a fresh process: the resident memory one training step adds on top of the model and its optimiser.

    Large tensors are then allocated with mmap and returned to the system when freed, so that the resident set
    follows what is live (glibc's adaptive threshold would otherwise keep freed blocks); the peak (VmHWM) is reset
    right before the step through /proc/self/clear_refs.
    """
    mallopt, m_mmap_threshold = ctypes.CDLL("libc.so.6").mallopt, -3
    mallopt(m_mmap_threshold, 64 * 1024)
    config = ViTCustomConfig(**config_values)
    contender = {c.name: c for c in build_contenders(config, **contender_options)}[name]
    height, width = to_pair(config.image_size)
    batch = torch.randn(batch_size, config.num_channels, height, width)
    labels = torch.randint(0, config.num_labels, (batch_size,))
    runner = Runner(contender, batch, labels, dtype)
    for parameter in runner.model.parameters():  # the optimiser's state, allocated before the measured step
        runner.optimizer.state[parameter] = {
            "step": torch.tensor(0.0),
            "exp_avg": torch.zeros_like(parameter),
            "exp_avg_sq": torch.zeros_like(parameter),
        }
    baseline = _resident_memory_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
    runner.train_step()
    return (_resident_memory_bytes("VmHWM") - baseline) / 2**20


def cpu_training_step_memory_mb(
    config: ViTCustomConfig, names: list[str], batch_size: int, dtype: str, **contender_options
) -> dict[str, float]:
    """`_training_step_memory_mb` of each contender, each in its own fresh process (Linux only)."""
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for name in names:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            job = pool.submit(_training_step_memory_mb, config.to_dict(), name, batch_size, dtype, **contender_options)
            results[name] = job.result()
    return results


# The `--profile` breakdown: an operator's self time goes to the first group with a fragment of its name. Only PyTorch
# operators (`aten::`, `mkldnn::`) are grouped; Python and autograd bookkeeping count as "other".
OP_GROUPS = {
    "attention": ("attention", "bmm"),  # fused kernels, or the eager path's batched matmuls
    "matmuls": ("mm", "linear", "convolution"),  # the linear layers and the patch embedding
    "casts and copies": ("copy",),
    "layer norm": ("layer_norm",),
    "activation": ("gelu", "relu"),
    "softmax": ("softmax",),
    "optimizer": ("adam", "_foreach_"),
}
OPERATOR_NAMESPACES = ("aten::", "mkldnn::")


def op_group(op_name: str) -> str:
    """The `OP_GROUPS` group of a profiler event name, or "other"."""
    if not op_name.startswith(OPERATOR_NAMESPACES):
        return "other"
    name = op_name.lower()
    return next((group for group, fragments in OP_GROUPS.items() if any(part in name for part in fragments)), "other")


def milliseconds_by_op_group(function: Callable[[], None], device: torch.device) -> dict[str, float]:
    """Self time of one `function()` call in each op group.

    Self times add up to the whole call without counting nested operators twice. On a GPU the time is the kernels'
    (what each operator launched), which is what bounds the step there.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        function()
        synchronize(device)
    milliseconds = dict.fromkeys([*OP_GROUPS, "other"], 0.0)
    for event in profiler.key_averages():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # GPU kernels: their time is already each launching operator's device time
        self_time = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        milliseconds[op_group(event.key)] += self_time / 1e3
    return milliseconds


def profile_by_op_group(runners: list[Runner], device: torch.device, rounds: int = 3) -> dict:
    """Each runner's `milliseconds_by_op_group` for an inference call and a training step.

    Profiled in interleaved rounds like the timings, keeping the round with the median total: a call profiled once
    would carry whatever load a shared machine had at that moment.
    """
    samples = {runner.contender.name: {"inference": []} for runner in runners}
    for _ in range(rounds):
        for runner in runners:
            samples[runner.contender.name]["inference"].append(milliseconds_by_op_group(runner.infer, device))
            if runner.contender.trains:
                training = samples[runner.contender.name].setdefault("training", [])
                training.append(milliseconds_by_op_group(runner.train_step, device))

    def median_round(runs: list[dict[str, float]]) -> dict[str, float]:
        return sorted(runs, key=lambda milliseconds: sum(milliseconds.values()))[len(runs) // 2]

    return {
        name: {pass_name: median_round(runs) for pass_name, runs in passes.items()} for name, passes in samples.items()
    }


def time_call(function: Callable[[], None], device: torch.device, iterations: int) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / iterations


def run_benchmark(
    config: ViTCustomConfig,
    contenders: list[Contender],
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "fp32",
    rounds: int = 9,
    iterations: int = 1,
    warmup: int = 2,
    compile_mode: str | None = None,
    cpu_memory_options: dict | None = None,
    reference: str = "transformers-sdpa",
    profile: bool = False,
    ceiling_matmul_size: int | None = None,
) -> dict:
    """Measure every contender in interleaved rounds and return the medians, the ceiling and the environment.

    Speed-ups are against `reference`, when it is among the contenders; inference runtimes get no training figures.
    `compile_mode` compiles every contender that trains with that `torch.compile` mode (`Runner`). `profile` adds,
    after the timed rounds, where each contender's inference call and training step spend their time
    (`profile_by_op_group`).

    `cpu_memory_options` (the `build_contenders` arguments that rebuild `contenders` in a fresh process) also
    measures each contender's training-step memory on the CPU; CUDA peaks are always measured.
    `ceiling_matmul_size` overrides the width of the ceiling's matmul (`matmul_flops_per_second`): a dtype this CPU
    only emulates takes minutes at the default width.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(0)
    height, width = to_pair(config.image_size)
    batch = torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(device)
    labels = torch.randint(0, config.num_labels, (batch_size,), generator=generator).to(device)
    runners = [Runner(contender, batch, labels, dtype, compile_mode) for contender in contenders]
    for runner in runners:
        for _ in range(warmup):
            runner.infer()
            if runner.contender.trains:
                runner.train_step()

    inference_times = {runner.contender.name: [] for runner in runners}
    training_times = {runner.contender.name: [] for runner in runners}
    peak_memory = {}
    for round_index in range(rounds):
        # Interleaved, so that a burst of load on the machine hits every contender alike, and rotated, so that none
        # always runs first. Each turn starts with an untimed call: the first call after another model pays for the
        # memory that model left behind, a cost a real loop, running one model step after step, does not have.
        shift = round_index % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            if device.type == "cuda":
                # Every turn starts from an empty cache, as a lone model would. Otherwise the blocks the other models
                # left cached, sized for their tensors, can fill the GPU: a request that none of them fits then frees
                # the whole cache (a synchronising cudaFree per block) and allocates again, inside the timed calls.
                torch.cuda.empty_cache()
            runner.infer()
            inference_times[runner.contender.name].append(time_call(runner.infer, device, iterations))
            if not runner.contender.trains:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            runner.train_step()
            training_times[runner.contender.name].append(time_call(runner.train_step, device, iterations))
            if device.type == "cuda":
                peak_memory[runner.contender.name] = torch.cuda.max_memory_allocated(device) / 2**20

    if device.type == "cpu" and cpu_memory_options is not None:
        trainers = [runner.contender.name for runner in runners if runner.contender.trains]
        peak_memory = cpu_training_step_memory_mb(config, trainers, batch_size, dtype, **cpu_memory_options)
    ceilings = {
        name: matmul_flops_per_second(device, CEILING_DTYPES[name], ceiling_matmul_size)
        for name in sorted({dtype, *(runner.dtype for runner in runners)} & set(CEILING_DTYPES))
    }
    forward_flops = vit_forward_flops(config, config.num_labels)

    def speedup(times: dict[str, list[float]], name: str) -> float | None:
        if not times.get(reference) or not times[name]:
            return None
        pairs = zip(times[reference], times[name], strict=True)
        return statistics.median(reference_time / contender_time for reference_time, contender_time in pairs)

    measurements = []
    for runner in runners:
        name, ceiling = runner.contender.name, ceilings.get(runner.dtype)
        inference_rate = batch_size / statistics.median(inference_times[name])
        training_rate = batch_size / statistics.median(training_times[name]) if training_times[name] else None
        measurements.append(
            Measurement(
                name=name,
                dtype=runner.dtype,
                inference_images_per_s=inference_rate,
                training_images_per_s=training_rate,
                inference_flops_share=inference_rate * forward_flops / ceiling if ceiling else None,
                # backward ~ 2x forward
                training_flops_share=training_rate * 3 * forward_flops / ceiling if ceiling and training_rate else None,
                peak_training_memory_mb=peak_memory.get(name),
                inference_speedup=speedup(inference_times, name),
                training_speedup=speedup(training_times, name),
            )
        )
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "dtype": dtype,
        "batch_size": batch_size,
        "rounds": rounds,
        "compiled": compile_mode,  # `torch.compile`'s mode, None when not compiled
        "reference": reference,
        "matmul_flops_per_second": ceilings[dtype],
        "matmul_flops_per_second_by_dtype": ceilings,
        "forward_flops_per_image": forward_flops,
        "results": [asdict(measurement) for measurement in measurements],
    }
    if profile:
        report["profile"] = profile_by_op_group(runners, device)
    return report


def fp8_loss_agreement(
    config: ViTCustomConfig,
    steps: int = 200,
    seeds: int = 3,
    batch_size: int = 32,
    device: str = "cuda",
    learning_rate: float = 1e-4,
    pool_batches: int = 8,
    final_steps: int = 10,
) -> dict:
    """Train the SDPA classifier `steps` AdamW steps in bf16 autocast and with `--fp8`'s FP8 linears, from the same
    weights and data at each of `seeds` seeds, on random images and labels (a pool of `pool_batches` batches taken
    in turn, so that the loss falls as the model memorises them). Each run's loss is the mean of its last
    `final_steps` steps; FP8 agrees when its mean over the seeds lies within bf16's run-to-run spread (the largest
    minus the smallest bf16 loss) of bf16's mean."""
    if steps < final_steps or seeds < 2:
        raise ValueError(
            f"An FP8 loss check needs at least {final_steps} steps and 2 seeds (a spread), got {steps} and {seeds}."
        )
    device = torch.device(device)
    height, width = to_pair(config.image_size)
    losses: dict[str, list[float]] = {"bf16": [], "fp8": []}
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        pool = [
            (
                torch.randn(batch_size, config.num_channels, height, width, generator=generator).to(device),
                torch.randint(0, config.num_labels, (batch_size,), generator=generator).to(device),
            )
            for _ in range(pool_batches)
        ]
        for precision in losses:
            torch.manual_seed(seed)
            model = ViTCustomForImageClassification._from_config(copy.deepcopy(config), attn_implementation="sdpa")
            model = (as_fp8_training(model) if precision == "fp8" else model).to(device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=device.type == "cuda")
            step_losses = []
            for step in range(steps):
                pixels, labels = pool[step % pool_batches]
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(pixels).logits
                loss = nn.functional.cross_entropy(logits.float(), labels)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step_losses.append(loss.detach())
            losses[precision].append(torch.stack(step_losses[-final_steps:]).mean().item())
    bf16_mean, fp8_mean = statistics.mean(losses["bf16"]), statistics.mean(losses["fp8"])
    spread = max(losses["bf16"]) - min(losses["bf16"])
    return {
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "losses": losses,
        "bf16_spread": spread,
        "fp8_minus_bf16": fp8_mean - bf16_mean,
        "within_bf16_spread": abs(fp8_mean - bf16_mean) <= spread,
    }


def fp8_loss_table(report: dict) -> str:
    """The per-seed final losses of `fp8_loss_agreement` and its verdict."""
    lines = [
        f"{report['device_name']}, {report['steps']} AdamW steps (lr {report['learning_rate']:g}) at batch "
        f"{report['batch_size']} on random data; loss = mean of the last steps",
        "",
        "| precision | " + " | ".join(f"seed {seed}" for seed in range(len(report["losses"]["bf16"]))) + " |",
        "|---|" + "---|" * len(report["losses"]["bf16"]),
    ]
    lines += [
        f"| {name} | " + " | ".join(f"{loss:.4f}" for loss in row) + " |" for name, row in report["losses"].items()
    ]
    verdict = "within" if report["within_bf16_spread"] else "outside"
    lines += [
        "",
        f"FP8 minus bf16 (means over the seeds): {report['fp8_minus_bf16']:+.4f}, {verdict} bf16's spread over the "
        f"seeds ({report['bf16_spread']:.4f}).",
    ]
    return "\n".join(lines)


def training_transform_throughput(
    num_images: int = 64, image_size: int = 224, batch_size: int = 32, rounds: int = 5, photo_scales=(1, 2)
) -> dict:
    """Images/s that one data-loader worker delivers on the training path of both loops (random resized crop, scale
    0.08-1, and resize in one PIL call, normalisation by the image processor), in this process and one thread.

    Measured on scikit-learn's two sample photos (640x427 JPEGs) repeated to `num_images`, and on the same photos
    enlarged `photo_scales` times and saved as JPEGs again (camera-sized pictures), each three ways in interleaved
    rounds (medians): the decode alone (what `datasets` does before a transform sees a PIL image); the transform on
    images `datasets` decoded; and the training path itself, which decodes each JPEG at the smallest scale its crop
    allows (`ImageClassificationTransform.augment`).
    """
    import tempfile

    import sklearn.datasets
    from transformers import ViTImageProcessorPil

    from .data import ImageClassificationTransform, seed_from

    photos = sorted(Path(sklearn.datasets.__file__).parent.joinpath("images").glob("*.jpg"))
    processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size})
    transform = ImageClassificationTransform(processor, num_channels=3, train=True, crop_scale=(0.08, 1.0))
    seeds = [seed_from(0, index) for index in range(num_images)]
    batches = [range(start, min(start + batch_size, num_images)) for start in range(0, num_images, batch_size)]
    rows = []
    with tempfile.TemporaryDirectory() as folder, _torch_threads(1):
        for scale in photo_scales:
            files = []
            for photo in photos:
                file = Path(folder) / f"{photo.stem}-x{scale}.jpg"
                with Image.open(photo) as image:
                    image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC).save(
                        file, quality=90
                    )
                files.append(str(file))
            rows.append(_photo_row(files, transform, seeds, batches, rounds))
    return {"image_size": image_size, "rounds": rounds, "rows": rows, **rows[0]}


def _photo_row(files: list[str], transform, seeds: list[int], batches: list[range], rounds: int) -> dict:
    """One row of `training_transform_throughput`: its three stages on `files`, timed in interleaved rounds."""
    import datasets

    num_images = len(seeds)
    split = datasets.Dataset.from_dict(
        {"image": [files[index % len(files)] for index in range(num_images)], "label": [0] * num_images},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["photo"])}),
    )
    encoded = split.cast_column("image", datasets.Image(decode=False))

    def transformed(source, batch):
        return transform(source[list(batch)], example_seeds=[seeds[index] for index in batch])

    stages = {
        "decode_images_per_s": lambda batch: [image.convert("RGB") for image in split[list(batch)]["image"]],
        "full_decode_transform_images_per_s": lambda batch: transformed(split, batch),
        "training_transform_images_per_s": lambda batch: transformed(encoded, batch),
    }
    times = {name: [] for name in stages}
    for _ in range(rounds):
        for name, step in stages.items():
            start = time.perf_counter()
            for batch in batches:
                step(batch)
            times[name].append(time.perf_counter() - start)
    with Image.open(files[0]) as image:
        size = list(image.size)
    return {"photo_size": size, **{name: num_images / statistics.median(spent) for name, spent in times.items()}}


def workers_per_gpu(transform_images_per_s: float, training_images_per_s: float) -> int:
    """Data-loader workers that keep a GPU training at `training_images_per_s` fed, one worker per process."""
    return math.ceil(training_images_per_s / transform_images_per_s)


@contextlib.contextmanager
def _torch_threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)  # a data-loader worker runs one thread
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def data_table(report: dict, gpu_training_images_per_s: float) -> str:
    """The `--data` report as a markdown table; the workers a GPU needs follow from the sample photos' row."""
    workers = workers_per_gpu(report["training_transform_images_per_s"], gpu_training_images_per_s)
    lines = [
        f"Training transform, one worker (1 thread), JPEGs to {report['image_size']} px, images/s, median of "
        f"{report['rounds']} interleaved rounds\n",
        "| photos | JPEG decode | transform after a full decode | training path (reduced decode) |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        width, height = row["photo_size"]
        lines.append(
            f"| {width}x{height} | {row['decode_images_per_s']:.1f} | {row['full_decode_transform_images_per_s']:.1f} "
            f"| {row['training_transform_images_per_s']:.1f} |"
        )
    width, height = report["photo_size"]
    lines.append(
        f"\nWorkers one GPU needs at {gpu_training_images_per_s:,.0f} training images/s ({width}x{height}): {workers}"
    )
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    """The report as a markdown table, with each contender's paired speed-up over the reference when it ran."""
    reference = report["reference"]
    ceilings = ", ".join(
        f"{flops / 1e9:.1f} GFLOP/s ({dtype})" for dtype, flops in report["matmul_flops_per_second_by_dtype"].items()
    )

    def cell(value: float | None, form: str, unit: str = "") -> str:
        return "-" if value is None else format(value, form) + unit

    compiled = f", compiled ({report['compiled']})" if report["compiled"] else ""
    lines = [
        f"{report['device_name']}, {report['dtype']}{compiled}, batch {report['batch_size']}, "
        f"{report['threads']} threads, median of {report['rounds']} interleaved rounds; "
        f"large-matmul ceiling {ceilings}",
        "",
        "| contender | dtype | inference img/s | (share of ceiling) | training img/s | (share of ceiling) "
        f"| inference vs {reference} | training vs {reference} | peak training MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        cells = [
            cell(row["inference_images_per_s"], ".1f"),
            cell(row["inference_flops_share"], ".0%"),
            cell(row["training_images_per_s"], ".1f"),
            cell(row["training_flops_share"], ".0%"),
            cell(row["inference_speedup"], ".2f", "x"),
            cell(row["training_speedup"], ".2f", "x"),
            cell(row["peak_training_memory_mb"], ".0f"),
        ]
        lines.append(f"| {row['name']} | {row['dtype']} | {' | '.join(cells)} |")
    if "profile" in report:
        lines += ["", profile_table(report["profile"])]
    return "\n".join(lines)


def profile_table(profile: dict[str, dict[str, dict[str, float]]]) -> str:
    """Milliseconds per call in each op group, a row per contender and pass, with each group's share of the total."""
    groups = [*OP_GROUPS, "other"]
    lines = [
        "Self time per call by op group, ms (share of the call):",
        "",
        f"| contender | pass | {' | '.join(groups)} | total |",
        "|---|---|" + "---|" * (len(groups) + 1),
    ]
    for name, passes in profile.items():
        for pass_name, milliseconds in passes.items():
            total = sum(milliseconds.values())
            cells = [f"{milliseconds[group]:.1f} ({milliseconds[group] / (total or 1):.0%})" for group in groups]
            lines.append(f"| {name} | {pass_name} | {' | '.join(cells)} | {total:.1f} |")
    return "\n".join(lines)


def count_graph_breaks(config: ViTCustomConfig, batch_size: int = 2) -> int:
    """Graph breaks `torch.compile` meets in the classifier's training forward with labels, the call that Trainer's
    `--torch_compile true` compiles (0 means one whole graph)."""
    model = ViTCustomForImageClassification._from_config(copy.deepcopy(config), attn_implementation="sdpa").train()
    height, width = to_pair(config.image_size)
    pixels = torch.randn(batch_size, config.num_channels, height, width)
    labels = torch.randint(0, max(config.num_labels, 1), (batch_size,))
    explanation = torch._dynamo.explain(model)(pixels, labels=labels)
    return explanation.graph_break_count


# What a user's program imports to get each model, timed from a fresh interpreter; "python" is the interpreter alone.
IMPORT_STATEMENTS = {
    "python": "pass",
    "torch": "import torch",
    "transformers ViT": "from transformers import ViTForImageClassification, ViTImageProcessorPil",
    "hf_vit_custom": "import hf_vit_custom",
}


def import_seconds(rounds: int = 7, statements: dict[str, str] = IMPORT_STATEMENTS) -> dict[str, float]:
    """Median wall time of each import statement in a fresh interpreter, in interleaved rounds."""
    times = {name: [] for name in statements}
    for _ in range(rounds):
        for name, statement in statements.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], check=True)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(samples) for name, samples in times.items()}


def import_table(seconds: dict[str, float]) -> str:
    """Import times as a markdown table; each row's increment is what its import adds over the row above."""
    lines = ["| import | seconds | added over the row above |", "|---|---|---|"]
    previous = None
    for name, value in seconds.items():
        value = round(value, 2)  # increments of the printed figures, so that the table adds up
        added = "-" if previous is None else f"{value - previous:+.2f}"
        lines.append(f"| {name} | {value:.2f} | {added} |")
        previous = value
    return "\n".join(lines)
