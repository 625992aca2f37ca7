"""The benchmark library: FLOP count, interleaved measurement, table, and a compile check without graph breaks."""

import importlib.util

import pytest
import torch
from conftest import REPO, needs_torchao, tiny_config_kwargs

from hf_vit_custom import ViTCustomConfig
from hf_vit_custom.benchmark import (
    Contender,
    build_contenders,
    count_graph_breaks,
    cpu_training_step_memory_mb,
    data_table,
    fp8_loss_agreement,
    fp8_loss_table,
    import_seconds,
    import_table,
    markdown_table,
    milliseconds_by_op_group,
    op_group,
    run_benchmark,
    select_contenders,
    training_transform_throughput,
    vit_forward_flops,
    workers_per_gpu,
)
from hf_vit_custom.cli import run
from hf_vit_custom.cpu_speed import ONEDNN_BF16_LINEAR


def test_forward_flops_match_a_hand_count():
    config = ViTCustomConfig(**tiny_config_kwargs(num_labels=5))  # 16 patches of 4x4x3, width 32, MLP 64, 2 layers
    tokens = 17
    patch_embedding = 16 * (4 * 4 * 3) * 32
    layer = tokens * (3 * 32 * 32) + tokens * (32 * 32) + 2 * tokens * tokens * 32 + 2 * tokens * (32 * 64)
    assert vit_forward_flops(config, 5) == 2 * (patch_embedding + 2 * layer + 32 * 5)


def test_run_benchmark_measures_every_contender_and_compares_to_transformers():
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa", "eager"], include_timm=False)
    names = [contender.name for contender in contenders]
    assert names == ["hf_vit_custom-sdpa", "hf_vit_custom-eager", "transformers-sdpa", "transformers-eager"]
    report = run_benchmark(config, contenders, batch_size=2, rounds=2, iterations=1, warmup=1)
    assert [row["name"] for row in report["results"]] == names
    for row in report["results"]:
        assert row["inference_images_per_s"] > 0 and row["training_images_per_s"] > 0
        assert 0 < row["inference_flops_share"] < 10  # a share of the measured ceiling, not an absolute number
    assert report["matmul_flops_per_second"] > 1e8
    rows = {row["name"]: row for row in report["results"]}
    assert rows["transformers-sdpa"]["inference_speedup"] == rows["transformers-sdpa"]["training_speedup"] == 1.0
    assert all(row["inference_speedup"] > 0 and row["training_speedup"] > 0 for row in rows.values())
    table = markdown_table(report)
    assert "| transformers-sdpa |" in table and "| 1.00x | 1.00x |" in table
    assert table.count("\n| hf_vit_custom-") == 2


def test_cpu_paths_add_the_speed_ups_bf16_where_native_and_onnxruntime():
    config = ViTCustomConfig(**tiny_config_kwargs())
    names = [c.name for c in build_contenders(config, ["sdpa"], include_transformers=False, cpu_paths=True)]
    bf16 = ["hf_vit_custom-cpu-bf16"] if ONEDNN_BF16_LINEAR else []
    assert names == ["hf_vit_custom-sdpa", "hf_vit_custom-cpu", *bf16, "onnxruntime", "onnxruntime-int8"]


def test_onnxruntime_runs_the_same_weights_for_inference_only():
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa"], include_transformers=False, include_timm=False, cpu_paths=True)
    ours, onnxruntime, int8 = select_contenders(contenders, ["hf_vit_custom-sdpa", "onnxruntime", "onnxruntime-int8"])
    pixels = torch.randn(3, 3, 16, 16)
    torch.manual_seed(0)  # as the runner seeds every build
    with torch.no_grad():
        expected = ours.build().eval()(pixels).logits
    torch.manual_seed(0)
    torch.testing.assert_close(onnxruntime.logits(onnxruntime.build(), pixels), expected, atol=1e-4, rtol=0)
    assert int8.logits(int8.build(), pixels).shape == expected.shape

    report = run_benchmark(config, [ours, onnxruntime, int8], batch_size=2, rounds=1, warmup=0)
    rows = {row["name"]: row for row in report["results"]}
    assert (rows["onnxruntime"]["dtype"], rows["onnxruntime-int8"]["dtype"]) == ("fp32", "int8")
    for name in ("onnxruntime", "onnxruntime-int8"):
        assert rows[name]["inference_images_per_s"] > 0
        assert rows[name]["training_images_per_s"] is rows[name]["training_flops_share"] is None
    assert rows["onnxruntime"]["inference_flops_share"] > 0
    assert rows["onnxruntime-int8"]["inference_flops_share"] is None  # no int8 ceiling is measured
    assert rows["hf_vit_custom-sdpa"]["training_images_per_s"] > 0
    assert set(report["matmul_flops_per_second_by_dtype"]) == {"fp32"}
    table = markdown_table(report)
    assert "| onnxruntime | fp32 |" in table and "| onnxruntime-int8 | int8 |" in table
    assert table.count("| - | - | - | - | - |") == 2  # no training figures, speed-ups or memory


def test_a_contender_with_its_own_dtype_runs_and_is_measured_in_it():
    """A bf16 contender in an fp32 run: timed under bf16 autocast, its share taken of the bf16 matmul ceiling."""
    config = ViTCustomConfig(**tiny_config_kwargs())
    (plain,) = build_contenders(config, ["sdpa"], include_transformers=False, include_timm=False)
    bf16 = Contender("hf_vit_custom-sdpa-bf16", plain.build, plain.logits, dtype="bf16")
    # A narrow ceiling matmul: where bf16 is emulated (AVX2), the default 2048-wide one takes minutes.
    report = run_benchmark(config, [plain, bf16], batch_size=2, rounds=1, warmup=0, ceiling_matmul_size=256)
    assert [row["dtype"] for row in report["results"]] == ["fp32", "bf16"]
    assert set(report["matmul_flops_per_second_by_dtype"]) == {"fp32", "bf16"}
    assert report["matmul_flops_per_second"] == report["matmul_flops_per_second_by_dtype"]["fp32"]
    assert "(bf16)" in markdown_table(report)


def test_every_contender_runs_the_backend_it_is_named_after():
    """Built one after the other from one configuration, as a run builds them, each keeps its own backend."""
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa", "eager"], include_timm=False)
    models = [contender.build() for contender in contenders]
    backends = [model.config._attn_implementation for model in models]
    assert backends == ["sdpa", "eager", "sdpa", "eager"]
    assert config._attn_implementation == ViTCustomConfig(**tiny_config_kwargs())._attn_implementation  # untouched
    pixels = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    with torch.no_grad(), torch.profiler.profile() as profiler:
        models[0].eval()(pixels)
    assert any("scaled_dot_product" in event.key for event in profiler.key_averages())


def test_without_the_reference_there_are_no_speedups():
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa"], include_transformers=False, include_timm=False)
    report = run_benchmark(config, contenders, batch_size=2, rounds=1, iterations=1, warmup=0)
    assert report["results"][0]["inference_speedup"] is None
    assert markdown_table(report).endswith("| - | - | - |")


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classifier_compiles_as_one_graph(pooling):
    assert count_graph_breaks(ViTCustomConfig(**tiny_config_kwargs(pooling=pooling))) == 0


def test_cpu_training_memory_is_measured_and_activation_checkpointing_lowers_it():
    """Each contender's step is measured in its own fresh process; 6 layers at batch 64 leave room to see the saving."""
    config = ViTCustomConfig(
        image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=256
    )
    options = {"backends": ["sdpa"], "include_transformers": False, "include_timm": False}
    names = ["hf_vit_custom-sdpa", "hf_vit_custom-sdpa-checkpointing"]
    memory = cpu_training_step_memory_mb(config, names, 64, "fp32", gradient_checkpointing=True, **options)
    assert set(memory) == set(names)
    assert memory["hf_vit_custom-sdpa"] > 20  # activations of 6 layers x 64 images x 65 tokens, in MB
    assert memory["hf_vit_custom-sdpa-checkpointing"] < 0.75 * memory["hf_vit_custom-sdpa"]


def test_import_times_come_from_fresh_interpreters_and_the_table_shows_each_increment():
    """A module imported by an earlier statement would be free in a shared interpreter; each run starts empty."""
    fresh = "import sys; assert 'sqlite3' not in sys.modules"  # fails in an interpreter that imported it before
    statements = {"python": "pass", "sqlite3": "import sqlite3", "fresh": fresh}
    seconds = import_seconds(rounds=2, statements=statements)
    assert list(seconds) == list(statements) and all(value > 0 for value in seconds.values())
    table = import_table({"python": 0.02, "torch": 1.25, "hf_vit_custom": 1.5})
    rows = ["| python | 0.02 | - |", "| torch | 1.25 | +1.23 |", "| hf_vit_custom | 1.50 | +0.25 |"]
    assert table.splitlines()[2:] == rows


def test_contenders_are_chosen_by_name_and_an_unknown_name_lists_the_real_ones():
    contenders = build_contenders(ViTCustomConfig(**tiny_config_kwargs()), ["sdpa", "eager"], include_timm=False)
    chosen = select_contenders(contenders, ["transformers-sdpa", "hf_vit_custom-sdpa"])
    assert [contender.name for contender in chosen] == ["transformers-sdpa", "hf_vit_custom-sdpa"]
    assert select_contenders(contenders, None) == contenders
    with pytest.raises(ValueError, match=r"Unknown contender\(s\) \['timm'\]; this run has \['hf_vit_custom-sdpa'"):
        select_contenders(contenders, ["timm"])


def benchmark_script():
    spec = importlib.util.spec_from_file_location("benchmark_script", REPO / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_script_refuses_an_unknown_contender_with_a_usage_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: benchmark_script().main(["--contenders", "hf_vit_custom-sdpa", "timmm"]))
    assert exit_info.value.code == 2
    assert "Unknown contender(s) ['timmm']; this run has ['hf_vit_custom-sdpa'" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--fp8"], ["--fp8_loss_steps", "200"]], ids=["contender", "loss-check"])
def test_script_refuses_fp8_on_the_cpu(capsys, tmp_path, flags):
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: benchmark_script().main(["--device", "cpu", "--output", str(tmp_path / "out"), *flags]))
    assert exit_info.value.code == 2
    assert "`--fp8` needs a CUDA GPU with FP8 tensor cores" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_compile_mode_compiles_every_trainer_and_starts_a_step_per_call(monkeypatch):
    """CUDA graphs (`reduce-overhead`) replay into the same output buffers: each call must say a new step begins."""
    modes, steps = [], []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa", "eager"], include_transformers=False, include_timm=False)
    report = run_benchmark(config, contenders, batch_size=2, rounds=2, warmup=1, compile_mode="reduce-overhead")
    assert modes == ["reduce-overhead", "reduce-overhead"] and report["compiled"] == "reduce-overhead"
    calls_per_contender = 2 * (1 + 2 * 2)  # inference and training: the warm-up, then an untimed and a timed call
    assert len(steps) == 2 * calls_per_contender
    assert ", compiled (reduce-overhead)," in markdown_table(report)


@pytest.mark.parametrize(
    ("op_name", "group"),
    [
        ("aten::addmm", "matmuls"),
        ("mkldnn::_linear_pointwise", "matmuls"),
        ("aten::convolution_backward", "matmuls"),
        ("aten::bmm", "attention"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
        ("aten::_to_copy", "casts and copies"),
        ("aten::native_layer_norm_backward", "layer norm"),
        ("aten::gelu_backward", "activation"),
        ("aten::_softmax_backward_data", "softmax"),
        ("aten::_fused_adamw_", "optimizer"),
        ("aten::add", "other"),
        ("autograd::engine::evaluate_function: MmBackward0", "other"),  # bookkeeping, not the matmul itself
    ],
)
def test_op_group_names_the_work_an_operator_does(op_name, group):
    assert op_group(op_name) == group


def test_profile_puts_each_operator_in_its_group():
    first, second = torch.randn(256, 256), torch.randn(256, 256)
    milliseconds = milliseconds_by_op_group(lambda: torch.softmax(first @ second, dim=-1), torch.device("cpu"))
    assert milliseconds["matmuls"] > 0 and milliseconds["softmax"] > 0
    assert all(value == 0 for group, value in milliseconds.items() if group not in ("matmuls", "softmax", "other"))


def test_run_benchmark_profiles_both_passes_of_every_contender_on_request():
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa"], include_timm=False)
    report = run_benchmark(config, contenders, batch_size=2, rounds=1, iterations=1, warmup=1, profile=True)
    assert list(report["profile"]) == [contender.name for contender in contenders]
    for passes in report["profile"].values():
        assert passes["inference"]["optimizer"] == 0 < passes["training"]["optimizer"]
        assert passes["inference"]["matmuls"] > 0 and passes["training"]["attention"] > 0
    table = markdown_table(report)
    assert "| attention | matmuls | casts and copies |" in table
    assert table.count("| training |") == len(contenders)
    assert "profile" not in run_benchmark(config, contenders[:1], batch_size=2, rounds=1, warmup=0)


def test_the_data_benchmark_times_the_training_transform_on_the_sample_photos():
    report = training_transform_throughput(num_images=4, image_size=32, batch_size=2, rounds=1, photo_scales=(1, 2))
    assert report["photo_size"] == [640, 427]
    assert [row["photo_size"] for row in report["rows"]] == [[640, 427], [1280, 854]]
    for row in report["rows"]:
        for stage in ("decode", "full_decode_transform", "training_transform"):
            assert row[f"{stage}_images_per_s"] > 0
    table = data_table(report, gpu_training_images_per_s=1e9)
    assert "JPEGs to 32 px" in table and "| 1280x854 |" in table
    assert table.endswith(f"(640x427): {workers_per_gpu(report['training_transform_images_per_s'], 1e9)}")


def test_workers_per_gpu_rounds_up():
    assert workers_per_gpu(100.0, 3493.0) == 35
    assert workers_per_gpu(3493.0, 3493.0) == 1


@needs_torchao
def test_the_fp8_contender_runs_the_blocks_linears_in_fp8():
    """On the CPU torchao emulates the FP8 matmul: slow, but the same conversion as on an FP8 GPU."""
    config = ViTCustomConfig(**tiny_config_kwargs())
    contenders = build_contenders(config, ["sdpa"], include_transformers=False, include_timm=False, fp8=True)
    assert [contender.name for contender in contenders] == ["hf_vit_custom-sdpa", "hf_vit_custom-sdpa-fp8"]
    model = contenders[1].build()
    assert type(model.vit.layers[0].mlp.fc1).__name__ == "Float8Linear" and type(model.classifier) is torch.nn.Linear
    report = run_benchmark(config, contenders, batch_size=2, rounds=1, warmup=1, reference="hf_vit_custom-sdpa")
    row = report["results"][1]
    assert row["dtype"] == "fp8" and row["training_images_per_s"] > 0 and row["training_speedup"] > 0
    assert row["training_flops_share"] is None  # no FP8 ceiling is measured


@needs_torchao
def test_the_fp8_loss_check_trains_both_precisions_from_the_same_start():
    config = ViTCustomConfig(**tiny_config_kwargs())
    report = fp8_loss_agreement(config, steps=12, seeds=2, batch_size=4, device="cpu", learning_rate=1e-3)
    bf16, fp8 = report["losses"]["bf16"], report["losses"]["fp8"]
    assert len(bf16) == len(fp8) == 2 and all(0 < loss < 10 for loss in bf16 + fp8)
    assert report["bf16_spread"] == max(bf16) - min(bf16)
    assert report["within_bf16_spread"] == (abs(report["fp8_minus_bf16"]) <= report["bf16_spread"])
    assert abs(report["fp8_minus_bf16"]) < 0.5  # the same model, data and start: FP8 rounding only
    table = fp8_loss_table(report)
    assert "| seed 0 | seed 1 |" in table and table.count("\n| bf16 | ") == table.count("\n| fp8 | ") == 1


def test_the_fp8_loss_check_needs_a_spread():
    with pytest.raises(ValueError, match="2 seeds"):
        fp8_loss_agreement(ViTCustomConfig(**tiny_config_kwargs()), steps=200, seeds=1, device="cpu")
