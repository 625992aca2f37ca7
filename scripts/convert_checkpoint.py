"""Convert a transformers, timm or JAX ViT checkpoint to a `vit_custom` folder, or a `vit_custom` folder to timm.

    python scripts/convert_checkpoint.py --from transformers facebook/dinov2-small --out dinov2-s14
    python scripts/convert_checkpoint.py --from timm timm/vit_base_patch16_224.augreg2_in21k_ft_in1k --out vit-b16
    python scripts/convert_checkpoint.py --from jax ViT-B_16.npz --out vit-b16-384 --image_size 384
    python scripts/convert_checkpoint.py --from vit_custom vit-b16 --to timm --out vit-b16-timm

A vit_custom output loads with `AutoModel` / `AutoModelForImageClassification` (after `import hf_vit_custom`, or with
`trust_remote_code=True`) and holds the source's preprocessing as an image processor. A timm output is a timm Hub
snapshot (`config.json` with `architecture` and `model_args`, `model.safetensors`) that
`timm.create_model("local-dir:OUT", pretrained=True)` loads, or `hf-hub:REPO` once pushed. Either is written to a
temporary folder beside `--out` and moved into place only once the conversion and a reload check succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import zipfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPImageProcessorPil, ViTImageProcessorPil

import hf_vit_custom  # noqa: F401  (registers the Auto classes)
from hf_vit_custom.cli import raise_usage_errors, run
from hf_vit_custom.configuration_vit_custom import to_pair
from hf_vit_custom.conversion import (
    build_model,
    convert_from_jax,
    convert_from_timm,
    convert_from_transformers,
    convert_to_timm,
    resize_state_dict,
    transformers_family,
)
from hf_vit_custom.persistence import write_folder_atomically
from hf_vit_custom.visualize import load_saved_model

logger = logging.getLogger("convert_checkpoint")

IMAGENET_INCEPTION = [0.5, 0.5, 0.5]  # timm's default for ViT weights from the JAX release, and the JAX release's
# timm's `interpolation` names -> PIL's resampling filters, as transformers' image processors take them.
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


def parse_args(argv=None) -> argparse.Namespace:
    parser = raise_usage_errors(
        argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    )
    parser.add_argument(
        "--from", dest="source_format", required=True, choices=["transformers", "timm", "jax", "vit_custom"]
    )
    parser.add_argument("source", help="local folder or file, or a Hub id when online")
    parser.add_argument("--to", dest="target_format", default="vit_custom", choices=["vit_custom", "timm"])
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty, see --overwrite)")
    parser.add_argument("--image_size", type=int, nargs="+", help="target size H [W]; resamples position embeddings")
    parser.add_argument("--architecture", help="timm: the architecture of a bare weights file (no config.json)")
    parser.add_argument("--num_heads", type=int, help="timm: attention heads, where neither timm nor the name tells")
    parser.add_argument("--hidden_act", help="timm: MLP activation (gelu, quick_gelu, gelu_pytorch_tanh, silu)")
    parser.add_argument("--layer_norm_eps", type=float, help="timm: LayerNorm epsilon (1e-6, CLIP towers 1e-5)")
    parser.add_argument("--pooler", choices=["drop", "error"], default="drop", help="transformers ViTModel pooler")
    parser.add_argument("--no_head", action="store_true", help="jax: drop head (and pre_logits), keep the encoder")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--push_to_hub", metavar="REPO", help="also push the converted model and processor")
    args = parser.parse_args(argv)
    if args.source_format == "vit_custom" and args.target_format != "timm":
        parser.error("--from vit_custom converts to another format: pass --to timm.")
    return args


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


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a `.npz` file, or an `OSError` naming a file that is truncated or not an `.npz` at all."""
    try:
        with np.load(path) as arrays:
            return {key: arrays[key] for key in arrays.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError) as error:
        raise OSError(
            f"Cannot read {str(path)!r} as a .npz file ({error}): it is truncated or of another format."
        ) from error


def load_transformers(path: Path):
    """The source model through transformers itself, which renames older checkpoints' keys to the 5.x layout.

    Refuses a checkpoint that lacks weights its model needs: transformers would initialise them randomly.
    """
    source_config = AutoConfig.from_pretrained(path)
    transformers_family({"model_type": source_config.model_type})  # refuses an unsupported one before loading
    architecture = (source_config.architectures or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model, info = (model_class or AutoModel).from_pretrained(path, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"Cannot convert {path}: missing keys ({len(info['missing_keys'])}): {info['missing_keys']}")
    return model.state_dict(), model.config


def vit_processor(config, **kwargs) -> ViTImageProcessorPil:
    """transformers' ViT preprocessing (a plain resize) at the model's size."""
    height, width = to_pair(config.image_size)
    return ViTImageProcessorPil(size={"height": height, "width": width}, **kwargs)


def timm_processor(pretrained_cfg: dict, image_size: tuple[int, int]) -> CLIPImageProcessorPil:
    """timm's evaluation preprocessing: resize the short side to size / crop_pct, centre-crop, normalise."""
    crop_pct = pretrained_cfg.get("crop_pct", 1.0)
    return CLIPImageProcessorPil(
        size={"shortest_edge": math.floor(min(image_size) / crop_pct)},
        crop_size={"height": image_size[0], "width": image_size[1]},
        resample=PIL_RESAMPLE.get(pretrained_cfg.get("interpolation", "bicubic"), 3),
        image_mean=list(pretrained_cfg.get("mean", IMAGENET_INCEPTION)),
        image_std=list(pretrained_cfg.get("std", IMAGENET_INCEPTION)),
    )


def resize_processor(processor, image_size: tuple[int, int]) -> None:
    """Make `processor` produce `image_size` images, keeping its resize-then-crop ratio where it crops."""
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop = processor.crop_size
        ratio = processor.size.get("shortest_edge", crop["height"]) / crop["height"]
        processor.crop_size = {"height": image_size[0], "width": image_size[1]}
        processor.size = {"shortest_edge": round(min(image_size) * ratio)}
    else:
        processor.size = {"height": image_size[0], "width": image_size[1]}


def convert(args: argparse.Namespace):
    """Return (config, state_dict, processor) for the source."""
    path = resolve(args.source)
    if args.source_format == "transformers":
        state_dict, source_config = load_transformers(path)
        config, state_dict = convert_from_transformers(state_dict, source_config, pooler=args.pooler)
        if (path / "preprocessor_config.json").exists():
            processor = AutoImageProcessor.from_pretrained(path)
        else:  # transformers' ViT preprocessing, at the model's size
            processor = vit_processor(config)
    elif args.source_format == "timm":
        snapshot = {}
        if path.is_dir() and (path / "config.json").exists():
            snapshot = json.loads((path / "config.json").read_text())
        pretrained_cfg = snapshot.get("pretrained_cfg", {})
        input_size = pretrained_cfg.get("input_size")
        labels = snapshot.get("label_names") or pretrained_cfg.get("label_names")
        config, state_dict = convert_from_timm(
            load_tensors(path),
            architecture=args.architecture or snapshot.get("architecture"),
            model_args=snapshot.get("model_args"),
            image_size=tuple(input_size[1:]) if input_size else None,
            num_heads=args.num_heads,
            hidden_act=args.hidden_act,
            layer_norm_eps=args.layer_norm_eps,
            global_pool=snapshot.get("global_pool"),
            id2label=dict(enumerate(labels)) if labels else None,
        )
        processor = timm_processor(pretrained_cfg, to_pair(config.image_size))
    elif args.source_format == "jax":
        config, state_dict = convert_from_jax(load_npz(path), include_head=not args.no_head)
        processor = vit_processor(config, image_mean=IMAGENET_INCEPTION, image_std=IMAGENET_INCEPTION)
    else:
        model = load_saved_model(path)
        config, state_dict = model.config, model.state_dict()
        processor = AutoImageProcessor.from_pretrained(path) if (path / "preprocessor_config.json").exists() else None
    if args.image_size:
        config, state_dict = resize_state_dict(config, state_dict, to_pair(list(args.image_size) * 2)[:2])
        if processor is not None:
            resize_processor(processor, to_pair(config.image_size))
    return config, state_dict, processor


def processor_as_pretrained_cfg(processor) -> dict:
    """The parts of an image processor that timm's `pretrained_cfg` records."""
    if processor is None:
        return {}
    cfg = {"mean": list(processor.image_mean), "std": list(processor.image_std)}
    resample = {value: key for key, value in PIL_RESAMPLE.items()}.get(int(getattr(processor, "resample", 3)))
    if resample:
        cfg["interpolation"] = resample
    if getattr(processor, "do_center_crop", False) and "shortest_edge" in processor.size:
        cfg["crop_pct"] = processor.crop_size["height"] / processor.size["shortest_edge"]
    return cfg


def write_vit_custom(config, state_dict, processor):
    model = build_model(config, state_dict)
    processor = processor or vit_processor(config)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        # Check the written folder before it replaces anything: same class, same tensors.
        reloaded = type(model).from_pretrained(folder)
        for key, value in model.state_dict().items():
            if not torch.equal(reloaded.state_dict()[key], value):
                raise RuntimeError(f"{key} changed when saved and reloaded.")

    return model, processor, write


# The architecture a timm snapshot must give back when read (interpolation and dropout are not timm's to store).
TIMM_ROUND_TRIP_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
    "class_token",
    "num_register_tokens",
    "distillation_token",
    "no_embed_class",
    "pooling",
    "fc_norm",
    "final_norm",
    "qk_norm",
    "mlp_type",
    "pre_norm",
    "patch_embedding_bias",
)


def write_timm(config, state_dict, processor):
    timm_config, timm_state_dict = convert_to_timm(config, state_dict, processor_as_pretrained_cfg(processor))

    def write(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(timm_state_dict, folder / "model.safetensors")
        (folder / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
        # Check the written snapshot before it replaces anything: it converts back to the same model.
        labels = timm_config.get("label_names")
        back_config, back = convert_from_timm(
            load_file(folder / "model.safetensors"),
            architecture=timm_config["architecture"],
            model_args=timm_config["model_args"],
            image_size=tuple(timm_config["pretrained_cfg"]["input_size"][1:]),
            global_pool=timm_config["global_pool"],
            id2label=dict(enumerate(labels)) if labels else None,
        )
        for key, value in state_dict.items():
            if not torch.equal(back[key], value):
                raise RuntimeError(f"{key} changed when written as timm and read back.")
        changed = [name for name in TIMM_ROUND_TRIP_FIELDS if getattr(back_config, name) != getattr(config, name)]
        if changed:
            raise RuntimeError(f"{changed} changed when written as timm and read back.")

    return write


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    config, state_dict, processor = convert(args)
    if args.target_format == "timm":
        model = None
        write = write_timm(config, state_dict, processor)
    else:
        model, processor, write = write_vit_custom(config, state_dict, processor)
    try:
        write_folder_atomically(out, write, overwrite=args.overwrite)
    except FileExistsError as error:
        raise FileExistsError(f"{error}; pass --overwrite to replace it.") from None
    logger.info("Wrote %s (%s -> %s) to %s.", config.model_type, args.source_format, args.target_format, out)
    if args.push_to_hub:
        if model is None:
            from huggingface_hub import upload_folder

            upload_folder(repo_id=args.push_to_hub, folder_path=out)
        else:
            model.push_to_hub(args.push_to_hub)
            processor.push_to_hub(args.push_to_hub)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    run(main)
