"""Compare this package's ViT with transformers' (and timm's, when it imports) on the same architecture and batch.

    python scripts/benchmark.py --preset vit-small-patch16-224 --batch_size 8 --dtype fp32
    python scripts/benchmark.py --preset vit-base-patch16-224 --device cuda --dtype bf16 --batch_size 64 \\
        --contenders hf_vit_custom-sdpa transformers-sdpa timm
    python scripts/benchmark.py --batch_size 32 --gradient_checkpointing --cpu_memory --no_transformers --backends sdpa
    python scripts/benchmark.py --dtype bf16 --profile   # and where each call spends its time, by op group
    python scripts/benchmark.py --import_time --rounds 7   # how long `import hf_vit_custom` takes
    python scripts/benchmark.py --data   # images/s of one data-loader worker, and the workers a GPU needs
    python scripts/benchmark.py --preset vit-large-patch16-224 --device cuda --dtype bf16 --batch_size 128 \\
        --compile --fp8 --contenders hf_vit_custom-sdpa hf_vit_custom-sdpa-fp8 --reference hf_vit_custom-sdpa
    python scripts/benchmark.py --preset vit-large-patch16-224 --fp8_loss_steps 200   # FP8's loss against bf16's

Prints a markdown table (images/s, share of the same run's large-matmul FLOP/s, ratio to transformers-sdpa) and
writes it with the raw figures to `--output` (`.md` and `.json`). Compare figures only within one run.
"""

import argparse
import json
from pathlib import Path

import torch

from hf_vit_custom.benchmark import (
    build_contenders,
    count_graph_breaks,
    data_table,
    fp8_loss_agreement,
    fp8_loss_table,
    import_seconds,
    import_table,
    markdown_table,
    run_benchmark,
    select_contenders,
    training_transform_throughput,
)
from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.configuration_vit_custom import ViTCustomConfig
from hf_vit_custom.fp8 import fp8_unavailable_reason
from hf_vit_custom.training import GPU_TRAINING_IMAGES_PER_S


def main(args: list[str] | None = None) -> dict:
    parser = raise_usage_errors(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.add_argument("--preset", default="vit-small-patch16-224", help="ViTCustomConfig preset name")
    parser.add_argument("--num_labels", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 runs under autocast")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "eager"], help="our attention backends to time")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--iterations", type=int, default=1, help="calls timed together in each turn")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        help="time torch.compile'd models, in this mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="add hf_vit_custom-sdpa-fp8: the linears `--fp8` trains in FP8 (needs an FP8 GPU and torchao)",
    )
    parser.add_argument(
        "--fp8_loss_steps",
        type=int,
        default=None,
        help="instead of throughput, train this many steps in bf16 and in FP8 from the same start (--seeds seeds) "
        "and compare the losses",
    )
    parser.add_argument("--seeds", type=int, default=3, help="with --fp8_loss_steps: runs per precision")
    parser.add_argument("--reference", default="transformers-sdpa", help="the contender the speed-ups are against")
    parser.add_argument("--no_transformers", action="store_true", help="time this package only")
    parser.add_argument(
        "--contenders", nargs="+", default=None, help="time only these, by name (e.g. hf_vit_custom-sdpa timm)"
    )
    parser.add_argument(
        "--gradient_checkpointing", action="store_true", help="add our first backend with activation checkpointing"
    )
    parser.add_argument(
        "--cpu_memory", action="store_true", help="CPU: measure each training step's memory in a fresh process"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also show where each call spends its time, by op group (torch.profiler)"
    )
    parser.add_argument(
        "--import_time",
        action="store_true",
        help="instead of throughput, time the imports of torch, transformers' ViT and this package (--rounds rounds)",
    )
    parser.add_argument(
        "--data",
        action="store_true",
        help="instead of the models, time the training transform of one data-loader worker on JPEG photos",
    )
    parser.add_argument(
        "--gpu_training_images_per_s",
        type=float,
        default=GPU_TRAINING_IMAGES_PER_S,
        help="with --data: the training throughput the workers must feed (default: ViT-B/16 compiled on an H200)",
    )
    parser.add_argument("--output", default="benchmark", help="writes OUTPUT.md and OUTPUT.json")
    options = parser.parse_args(args)

    if options.import_time:
        seconds = import_seconds(rounds=options.rounds)
        table = f"Imports, each in a fresh interpreter (median of {options.rounds} interleaved rounds):\n\n"
        table += import_table(seconds)
        return write_report({"import_seconds": seconds, "rounds": options.rounds}, table, options.output)
    if options.data:
        report = training_transform_throughput(rounds=options.rounds)
        report["gpu_training_images_per_s"] = options.gpu_training_images_per_s
        return write_report(report, data_table(report, options.gpu_training_images_per_s), options.output)
    if options.threads:
        torch.set_num_threads(options.threads)
    config = ViTCustomConfig.from_preset(options.preset, num_labels=options.num_labels)
    wants_fp8 = options.fp8 or options.fp8_loss_steps is not None
    if wants_fp8 and (fp8_reason := fp8_unavailable_reason(use_cpu=options.device == "cpu")) is not None:
        raise ValueError(fp8_reason)
    if options.fp8_loss_steps is not None:
        report = fp8_loss_agreement(config, options.fp8_loss_steps, options.seeds, options.batch_size, options.device)
        report["preset"] = options.preset
        return write_report(report, f"{options.preset}: " + fp8_loss_table(report), options.output)
    contender_options = {
        "backends": options.backends,
        "include_transformers": not options.no_transformers,
        "gradient_checkpointing": options.gradient_checkpointing,
        "cpu_paths": options.device == "cpu",
        "fp8": options.fp8,
    }
    contenders = select_contenders(build_contenders(config, **contender_options), options.contenders)
    report = run_benchmark(
        config,
        contenders,
        batch_size=options.batch_size,
        device=options.device,
        dtype=options.dtype,
        rounds=options.rounds,
        iterations=options.iterations,
        compile_mode=options.compile,
        reference=options.reference,
        cpu_memory_options=contender_options if options.cpu_memory else None,
        profile=options.profile,
    )
    report["preset"] = options.preset
    if options.compile:
        report["graph_breaks"] = count_graph_breaks(config)
    return write_report(report, f"{options.preset}: " + markdown_table(report), options.output)


def write_report(report: dict, table: str, output: str) -> dict:
    print(table)
    Path(f"{output}.md").write_text(table + "\n")
    Path(f"{output}.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run(main)
