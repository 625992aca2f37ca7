"""Convert a transformers ViT, timm VisionTransformer or JAX `.npz` checkpoint to a `vit_custom` folder.

    python scripts/convert_checkpoint.py --from transformers google/vit-base-patch16-224 --out vit-b16
    python scripts/convert_checkpoint.py --from timm model.safetensors --out vit-s16 --num_heads 6
    python scripts/convert_checkpoint.py --from jax ViT-B_16.npz --out vit-b16-384 --image_size 384

The output folder loads with `AutoModel` / `AutoModelForImageClassification` (after `import hf_vit_custom`, or with
`trust_remote_code=True`) and holds a `ViTImageProcessorPil` whose size, mean and std match the source. It is written
to a temporary folder beside `--out` and moved into place only once the conversion and a reload check succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import ViTConfig, ViTImageProcessorPil

import hf_vit_custom  # noqa: F401  (registers the Auto classes)
from hf_vit_custom.configuration_vit_custom import to_pair
from hf_vit_custom.conversion import (
    build_model,
    convert_from_jax,
    convert_from_timm,
    convert_from_transformers,
    resize_state_dict,
)
from hf_vit_custom.persistence import write_folder_atomically

logger = logging.getLogger("convert_checkpoint")

IMAGENET_INCEPTION = [0.5, 0.5, 0.5]  # timm's default for ViT weights from the JAX release, and the JAX release's


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source_format", required=True, choices=["transformers", "timm", "jax"])
    parser.add_argument("source", help="local folder or file, or a Hub id when online")
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty, see --overwrite)")
    parser.add_argument("--image_size", type=int, nargs="+", help="target size H [W]; resamples position embeddings")
    parser.add_argument("--num_heads", type=int, help="timm only: attention heads (not stored in timm state dicts)")
    parser.add_argument("--pooler", choices=["drop", "error"], default="drop", help="transformers ViTModel pooler")
    parser.add_argument("--no_head", action="store_true", help="jax: drop head (and pre_logits), keep the encoder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also push the converted model and processor")
    return parser.parse_args(argv)


def resolve(source: str) -> Path:
    """A local path as it is; otherwise a Hub repository id, downloaded (needs network access)."""
    if Path(source).exists():
        return Path(source)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors / torch file, or a folder's (possibly sharded) weights."""
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return {key: value for shard in shards for key, value in load_file(path / shard).items()}
        for name in ("model.safetensors", "pytorch_model.bin", "model.pth", "open_clip_pytorch_model.bin"):
            if (path / name).exists():
                return load_tensors(path / name)
        raise FileNotFoundError(f"No weights (model.safetensors, pytorch_model.bin, ...) in {path}.")
    if path.suffix == ".safetensors":
        return load_file(path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
            state_dict = state_dict[wrapper]
    return state_dict


def convert(args: argparse.Namespace):
    """Return (config, state_dict, processor_kwargs) for the source."""
    path = resolve(args.source)
    if args.source_format == "transformers":
        vit_config = ViTConfig.from_pretrained(path)
        config, state_dict = convert_from_transformers(load_tensors(path), vit_config, pooler=args.pooler)
        if (path / "preprocessor_config.json").exists():
            processor = ViTImageProcessorPil.from_pretrained(path)
            processor_kwargs = {"image_mean": list(processor.image_mean), "image_std": list(processor.image_std)}
        else:
            processor_kwargs = {}  # ViTImageProcessorPil's defaults, transformers' ViT preprocessing
    elif args.source_format == "timm":
        pretrained_cfg = {}
        timm_config_path = path / "config.json" if path.is_dir() else None
        if timm_config_path is not None and timm_config_path.exists():
            pretrained_cfg = json.loads(timm_config_path.read_text()).get("pretrained_cfg", {})
        input_size = pretrained_cfg.get("input_size")
        image_size = tuple(input_size[1:]) if input_size else None
        config, state_dict = convert_from_timm(load_tensors(path), num_heads=args.num_heads, image_size=image_size)
        processor_kwargs = {
            "image_mean": list(pretrained_cfg.get("mean", IMAGENET_INCEPTION)),
            "image_std": list(pretrained_cfg.get("std", IMAGENET_INCEPTION)),
        }
    else:
        with np.load(path) as arrays:
            config, state_dict = convert_from_jax(dict(arrays), include_head=not args.no_head)
        processor_kwargs = {"image_mean": IMAGENET_INCEPTION, "image_std": IMAGENET_INCEPTION}
    if args.image_size:
        config, state_dict = resize_state_dict(config, state_dict, to_pair(list(args.image_size) * 2)[:2])
    height, width = to_pair(config.image_size)
    processor_kwargs["size"] = {"height": height, "width": width}
    return config, state_dict, processor_kwargs


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    config, state_dict, processor_kwargs = convert(args)
    model = build_model(config, state_dict)
    processor = ViTImageProcessorPil(**processor_kwargs)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        # Check the written folder before it replaces anything: same class, same tensors.
        reloaded = type(model).from_pretrained(folder)
        for key, value in model.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise RuntimeError(f"{key} changed when saved and reloaded.")

    try:
        write_folder_atomically(out, write, overwrite=args.overwrite)
    except FileExistsError as error:
        raise SystemExit(f"{error}; pass --overwrite to replace it.") from None
    logger.info("Wrote %s (%s) to %s.", type(model).__name__, args.source_format, out)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        processor.push_to_hub(args.push_to_hub)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
