"""FSDP2 worker: shards a tiny ViT over a CPU device mesh (gloo), trains it, gathers the full weights and reports.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR``; rank 0 writes
``fsdp_results.json``, ``initial.safetensors``, ``final.safetensors`` (the gathered full state dict),
``final_gradients.safetensors`` and ``logits.safetensors`` to OUT_DIR. Every check that needs the live process group
is asserted here, so a failing one ends the run with a non-zero status; the results are also written out for
`tests/test_fsdp.py` to assert on.

The model, data and optimiser helpers are importable so that the test can train the same model in one process,
unsharded, as a reference.
"""

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch
from conftest import tiny_config_kwargs  # this script's folder is on sys.path, as for the tests
from torch import nn

from hf_vit_custom import ViTCustomConfig, ViTCustomForImageClassification

CONFIG = tiny_config_kwargs(num_labels=10)
SEED = 0
BATCH_SIZE = 16  # the global batch; each of the two ranks trains on its own half
STEPS = 8
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 0.01
RESULTS = "fsdp_results.json"


def build_model() -> ViTCustomForImageClassification:
    """The same initial weights in every process: the seed is set right before the model is built."""
    torch.manual_seed(SEED)
    return ViTCustomForImageClassification(ViTCustomConfig(**CONFIG))


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of random images and labels, from its own generator so that it does not depend on the model."""
    generator = torch.Generator().manual_seed(SEED + 1)
    pixel_values = torch.randn(BATCH_SIZE, CONFIG["num_channels"], 16, 16, generator=generator)
    labels = torch.randint(0, CONFIG["num_labels"], (BATCH_SIZE,), generator=generator)
    return pixel_values, labels


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def train_steps(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, steps: int = STEPS) -> list[float]:
    """`steps` AdamW steps on one batch; returns the loss before each step."""
    optimizer = make_optimizer(model)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def expected_local_numel(full_shape: torch.Size, rank: int, world_size: int) -> int:
    """Local numel of a `Shard(0)` piece: dim 0 is split like `torch.chunk`, ceil(rows / world_size) per rank."""
    rows = full_shape[0]
    per_rank = -(-rows // world_size)
    local_rows = max(0, min(per_rank, rows - rank * per_rank))
    return local_rows * (full_shape.numel() // rows if rows else 0)


def main(out_dir: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    # A short timeout turns a collective that one rank never joins into an error instead of a 30-minute hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    model = build_model()
    initial = full_state_dict(model)
    # Same seed, same weights: prove it rather than assume it, since sharding silently keeps each rank's own half.
    fingerprints = [None] * world_size
    dist.all_gather_object(fingerprints, [round(t.double().square().sum().item(), 12) for t in initial.values()])
    assert all(f == fingerprints[0] for f in fingerprints), "ranks built different initial weights"

    full_shapes = {name: param.shape for name, param in model.named_parameters()}
    mesh = init_device_mesh("cpu", (world_size,))
    # The model's `_no_split_modules` is the wrap policy: each such module becomes its own FSDP unit (one all-gather
    # per unit), and the root takes whatever is left (the final LayerNorm and the classifier).
    wrapped = []
    for name, module in model.named_modules():
        if type(module).__name__ in model._no_split_modules:
            fully_shard(module, mesh=mesh)
            wrapped.append(name)
    fully_shard(model, mesh=mesh)

    shards = {}
    for name, param in model.named_parameters():
        assert isinstance(param, DTensor), f"{name} is a {type(param).__name__}, not a DTensor"
        assert tuple(param.placements) == (Shard(0),), f"{name}: {param.placements}"
        assert param.shape == full_shapes[name], f"{name}: global shape {param.shape} != {full_shapes[name]}"
        local = param.to_local()
        assert local.numel() == expected_local_numel(full_shapes[name], rank, world_size), name
        # The local shard holds exactly this rank's rows of the initial weights.
        rows = -(-full_shapes[name][0] // world_size)
        assert torch.equal(local, initial[name][rank * rows : (rank + 1) * rows]), f"{name}: wrong rows on rank {rank}"
        shards[name] = local.numel()
    all_shards = [None] * world_size
    dist.all_gather_object(all_shards, shards)

    pixel_values, labels = make_batch()
    # Data parallel: each rank trains on its own contiguous half of the batch, so the weights only match the
    # full-batch reference if FSDP averages the gradients across ranks in its reduce-scatter.
    local_pixels, local_labels = pixel_values.chunk(world_size)[rank], labels.chunk(world_size)[rank]
    local_losses = train_steps(model, local_pixels, local_labels)
    # The halves are the same size, so the mean of the ranks' losses is the loss over the whole batch.
    global_losses = torch.tensor(local_losses, dtype=torch.float64)
    dist.all_reduce(global_losses)
    global_losses /= world_size

    # One more backward at the final weights, without a step: the reduce-scattered gradient shards, put together,
    # must be the full-batch mean gradient. This checks the reduction directly; AdamW's steps are nearly scale-free,
    # so the trained weights feel a sum instead of a mean only through eps (measured 4.9e-4 after 8 steps).
    model(pixel_values=local_pixels, labels=local_labels).loss.backward()
    for name, param in model.named_parameters():
        assert isinstance(param.grad, DTensor) and tuple(param.grad.placements) == (Shard(0),), f"{name} gradient"
    gradients = {name: param.grad.full_tensor() for name, param in model.named_parameters()}
    model.zero_grad()

    model.eval()
    with torch.no_grad():
        sharded_logits = model(pixel_values=pixel_values).logits  # every rank must join the all-gathers
    all_logits = [torch.empty_like(sharded_logits) for _ in range(world_size)]
    dist.all_gather(all_logits, sharded_logits)

    # Two ways of gathering the full weights: the distributed-checkpoint API (to rank 0, on CPU), and `full_tensor()`.
    gathered = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    by_full_tensor = {name: param.full_tensor() for name, param in model.named_parameters()}

    if rank == 0:
        results = {
            "world_size": world_size,
            "wrapped_modules": wrapped,
            "fsdp_class": type(model).__name__,
            "full_numel": {name: shape.numel() for name, shape in full_shapes.items()},
            "local_numel": all_shards,  # one {name: numel} per rank
            "local_losses_rank0": local_losses,
            "losses": global_losses.tolist(),
            "logits_max_diff_between_ranks": max((other - all_logits[0]).abs().max().item() for other in all_logits),
        }
        gathered = {name: tensor.contiguous() for name, tensor in gathered.items()}
        results["gathered_keys"] = sorted(gathered)
        results["gathered_equals_full_tensor"] = gathered.keys() == by_full_tensor.keys() and all(
            torch.equal(gathered[name], by_full_tensor[name]) for name in by_full_tensor
        )
        results["gathered_is_plain_tensor"] = all(type(t) is torch.Tensor for t in gathered.values())

        plain = build_model()  # fresh, unsharded; its own (initial) weights are overwritten by the load
        incompatible = plain.load_state_dict(gathered, strict=False)
        results["missing_keys"] = list(incompatible.missing_keys)
        results["unexpected_keys"] = list(incompatible.unexpected_keys)
        plain.eval()
        with torch.no_grad():
            plain_logits = plain(pixel_values=pixel_values).logits
        results["logits_max_diff_plain_vs_sharded"] = (plain_logits - all_logits[0]).abs().max().item()
        results["logits_equal_plain_vs_sharded"] = torch.equal(plain_logits, all_logits[0])

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file(initial, out_dir / "initial.safetensors")
        save_file(gathered, out_dir / "final.safetensors")
        save_file(gradients, out_dir / "final_gradients.safetensors")
        save_file({"sharded": all_logits[0], "plain": plain_logits}, out_dir / "logits.safetensors")
        (out_dir / RESULTS).write_text(json.dumps(results, indent=2))
        print(
            f"world size {world_size}, FSDP units {wrapped} + root, losses {[round(x, 4) for x in results['losses']]}"
        )

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
