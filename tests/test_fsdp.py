"""Sharded training with PyTorch FSDP2 on CPU: two gloo processes, `fully_shard` driven by `_no_split_modules`.

Trainer and Accelerate fall back to DDP on a machine without GPUs, so this calls `torch.distributed.fsdp.fully_shard`
directly, over a CPU device mesh: `tests/fsdp_worker.py` runs under torchrun once per module and writes what it saw;
the tests below check it against the model class and against the same training in one unsharded process.
"""

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_bounded
from safetensors.torch import load_file

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="FSDP on CPU needs torch.distributed with the gloo backend, which this torch build lacks",
)

REPO = Path(__file__).resolve().parents[1]
WORKER_PATH = Path(__file__).with_name("fsdp_worker.py")
_spec = importlib.util.spec_from_file_location("fsdp_worker", WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

WORLD_SIZE = 2

# Tolerances, from measurements (torch 2.13 CPU, 8 AdamW steps at lr 3e-3, global batch 16 split 8 + 8):
# - Weights, FSDP vs one process: the ranks' half-batch gradients are averaged, a sum in another order than the
#   one-process full batch, so the runs differ by float32 rounding, which Adam's per-element normalisation amplifies
#   where a gradient is small: measured 1.8e-6 at most (2e-7 outside the attention projections). 1e-5 sits ~5x above
#   that and ~4700x below the negative control (the same run on one half of the batch only, as if no gradient were
#   exchanged: 4.7e-2).
# - The attention key bias is the exception: its exact gradient is zero (softmax ignores a constant shift of the
#   scores), so what each run computes there is rounding noise (~1e-10), and Adam turns noise into steps of up to
#   lr * |g| / (|g| + eps) each. Measured 4.7e-5 apart (5.1e-5 with 2 threads in the test process); both stay near
#   zero. It gets its own bound, 1e-3, ~20x the measurement and still ~50x below the negative control.
# - Losses: measured 3.6e-7 apart; logits of the gathered weights vs the sharded model: bitwise equal in the worker.
WEIGHT_TOLERANCE = 1e-5
KEY_BIAS_TOLERANCE = 1e-3
LOSS_TOLERANCE = 1e-5
# Gradients at the final weights, FSDP (two halves, reduce-scattered) vs one process (full batch): float32 rounding
# of values up to 0.35, measured 8.9e-8 apart; rank 0's half-batch gradient alone is 0.22 away, and a sum instead of
# a mean would be off by the gradient itself.
GRADIENT_TOLERANCE = 1e-6


def run_worker(out_dir: Path, timeout: int = 300) -> str:
    """torchrun the worker in its own process group, ending it with SIGTERM, then SIGKILL, if it hangs."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(WORLD_SIZE),
        str(WORKER_PATH),
        str(out_dir),
    ]
    return run_bounded(command, timeout)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict, str]:
    out_dir = tmp_path_factory.mktemp("fsdp")
    output = run_worker(out_dir)
    return out_dir, json.loads((out_dir / worker.RESULTS).read_text()), output


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return worker.make_batch()


def plain_model_with(weights: dict[str, torch.Tensor]) -> ViTCustomForImageClassification:
    model = ViTCustomForImageClassification(ViTCustomConfig(**worker.CONFIG))
    incompatible = model.load_state_dict(weights, strict=False)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys, incompatible
    return model


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], names) -> float:
    return max((first[name] - second[name]).abs().max().item() for name in names)


def test_two_ranks_shard_the_model_by_its_no_split_modules(fsdp_run):
    _, results, output = fsdp_run
    assert results["world_size"] == WORLD_SIZE
    assert f"world size {WORLD_SIZE}, FSDP units" in output
    assert output.count("FSDP units") == 1  # printed by rank 0 alone
    # One FSDP unit per `_no_split_modules` instance (the embeddings and each encoder layer), then the root.
    layers = worker.CONFIG["num_hidden_layers"]
    assert ViTCustomForImageClassification._no_split_modules == ["ViTCustomEmbeddings", "ViTCustomEncoderLayer"]
    assert results["wrapped_modules"] == ["vit.embeddings", *(f"vit.layers.{i}" for i in range(layers))]
    assert results["fsdp_class"] == "FSDPViTCustomForImageClassification"


def test_every_encoder_layer_parameter_is_split_in_half(fsdp_run):
    _, results, _ = fsdp_run
    full, local = results["full_numel"], results["local_numel"]
    assert len(local) == WORLD_SIZE
    plain = ViTCustomForImageClassification(ViTCustomConfig(**worker.CONFIG))
    assert full == {name: param.numel() for name, param in plain.named_parameters()}
    layer_parameters = [name for name in full if name.startswith("vit.layers.")]
    assert len(layer_parameters) == worker.CONFIG["num_hidden_layers"] * 12
    for name in layer_parameters:
        halves = sorted(local[rank][name] for rank in range(WORLD_SIZE))
        assert halves == [full[name] // 2, -(-full[name] // 2)], (name, halves, full[name])
    # Every parameter (the worker checked each is a DTensor with a `Shard(0)` placement) is split along dim 0, with
    # nothing lost or duplicated. Dim 0 is split like `torch.chunk`: a parameter with one row, such as the class
    # token (1, 1, hidden), lives whole on rank 0 and rank 1 holds an empty shard.
    for name, numel in full.items():
        assert sum(shards[name] for shards in local) == numel, name
    assert local[0]["vit.embeddings.cls_token"] == full["vit.embeddings.cls_token"]
    assert local[1]["vit.embeddings.cls_token"] == 0
    # About half the model per rank.
    total = sum(full.values())
    for shards in local:
        assert 0.4 * total < sum(shards.values()) < 0.6 * total


def test_sharded_training_lowers_the_loss(fsdp_run):
    _, results, _ = fsdp_run
    losses = results["losses"]
    assert len(losses) == worker.STEPS
    # Measured 2.317 -> 1.690, falling at every step: 8 AdamW steps on one fixed batch of 16.
    assert all(later < earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[-1] < losses[0] - 0.3, losses


def test_gathered_state_dict_loads_into_a_plain_model_and_reproduces_the_logits(fsdp_run, batch):
    out_dir, results, _ = fsdp_run
    # The worker's own checks: both ways of gathering agree, the result holds plain tensors, and loading it into a
    # fresh unsharded model leaves no key missing or unexpected and gives rank 0's logits bit for bit.
    assert results["gathered_equals_full_tensor"]
    assert results["gathered_is_plain_tensor"]
    assert results["missing_keys"] == [] and results["unexpected_keys"] == []
    assert results["logits_equal_plain_vs_sharded"], results["logits_max_diff_plain_vs_sharded"]
    assert results["logits_max_diff_between_ranks"] == 0.0

    # And again here, in a process that never saw a process group.
    final = load_file(out_dir / "final.safetensors")
    plain = ViTCustomForImageClassification(ViTCustomConfig(**worker.CONFIG))
    assert sorted(final) == sorted(plain.state_dict()) == results["gathered_keys"]
    for name, tensor in plain.state_dict().items():
        assert final[name].shape == tensor.shape, name
    plain = plain_model_with(final).eval()
    logits = load_file(out_dir / "logits.safetensors")
    with torch.no_grad():
        reproduced = plain(pixel_values=batch[0]).logits
    torch.testing.assert_close(reproduced, logits["sharded"], rtol=0, atol=1e-6)
    # Trained: the gathered weights are not the initial ones.
    initial = load_file(out_dir / "initial.safetensors")
    assert max_difference(final, initial, final) > 1e-2


def test_sharded_training_matches_one_unsharded_process(fsdp_run, batch):
    out_dir, results, _ = fsdp_run
    initial = load_file(out_dir / "initial.safetensors")
    final = load_file(out_dir / "final.safetensors")
    pixel_values, labels = batch

    reference = worker.build_model()
    assert all(torch.equal(tensor, initial[name]) for name, tensor in reference.state_dict().items())
    reference_losses = worker.train_steps(reference, pixel_values, labels)
    expected = reference.state_dict()
    assert results["losses"] == pytest.approx(reference_losses, abs=LOSS_TOLERANCE)

    hidden = worker.CONFIG["hidden_size"]
    key_biases = [name for name in final if name.endswith("attention.qkv.bias")]
    assert len(key_biases) == worker.CONFIG["num_hidden_layers"]
    # Compare everything at the weight tolerance, with the key third of the fused qkv bias swapped out (see above).
    masked_final, masked_expected = dict(final), dict(expected)
    for name in key_biases:
        for weights in (masked_final, masked_expected):
            weights[name] = torch.cat((weights[name][:hidden], weights[name][2 * hidden :]))
    assert max_difference(masked_final, masked_expected, final) <= WEIGHT_TOLERANCE
    key_bias_difference = max(
        (final[name][hidden : 2 * hidden] - expected[name][hidden : 2 * hidden]).abs().max().item()
        for name in key_biases
    )
    assert key_bias_difference <= KEY_BIAS_TOLERANCE

    # Negative control: training on rank 0's half alone (what a rank would do if no gradient were exchanged) ends far
    # outside both tolerances, so they can tell a sharded run that averages gradients from one that does not.
    half = worker.build_model()
    worker.train_steps(half, pixel_values[: worker.BATCH_SIZE // 2], labels[: worker.BATCH_SIZE // 2])
    control = max_difference(half.state_dict(), final, final)
    assert control > 10 * KEY_BIAS_TOLERANCE > 100 * WEIGHT_TOLERANCE


def test_reduce_scattered_gradients_are_the_full_batch_mean(fsdp_run, batch):
    out_dir, _, _ = fsdp_run
    gradients = load_file(out_dir / "final_gradients.safetensors")
    model = plain_model_with(load_file(out_dir / "final.safetensors")).train()
    pixel_values, labels = batch
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    expected = {name: param.grad for name, param in model.named_parameters()}
    assert gradients.keys() == expected.keys()
    assert max_difference(gradients, expected, expected) <= GRADIENT_TOLERANCE
    # Negative controls: rank 0's half of the batch alone (no exchange), and the sum over the ranks (no division).
    model.zero_grad()
    model(pixel_values=pixel_values[: worker.BATCH_SIZE // 2], labels=labels[: worker.BATCH_SIZE // 2]).loss.backward()
    half = {name: param.grad for name, param in model.named_parameters()}
    assert max_difference(gradients, half, half) > 1000 * GRADIENT_TOLERANCE
    summed = {name: 2 * grad for name, grad in expected.items()}
    assert max_difference(gradients, summed, summed) > 1000 * GRADIENT_TOLERANCE
